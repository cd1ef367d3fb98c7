"""Labs started from the console: one at a time, as the ``ztbank lab NAME`` a trainee would type,
its narration streamed line by line to the page.  One at a time on the stack too: the console
takes the stack's lab lock for a lab (``services.labs.support.LabLock``, which ``ztbank lab``
takes) and hands it to the lab it starts."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.console.errors import ConsoleError, LabBusyError, LabStartError, UnknownLabError
from services.labs.support import LAB_LOCK_FD, LabHolder, LabLock

# The labs mint SVIDs and customer tokens; none is meant to be printed, and none may reach the
# page if one ever is.
_KEY_BEGIN = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_KEY_END = re.compile(r"-----END [A-Z ]*PRIVATE KEY-----")
_TOKEN = re.compile(r"\beyJ[\w-]+\.[\w-]+\.[\w-]*")
# A lab that has not ended by then is stopped and reported as failed.
LAB_TIMEOUT_SECONDS = 300.0
PASSED, FAILED = "passed", "failed"

Publish = Callable[[str, dict[str, Any]], None]


class Redactor:
    """Line by line, as a lab prints: private key blocks become one line saying so, and bearer
    tokens (JWTs) are replaced."""

    def __init__(self) -> None:
        self._in_key = False

    def __call__(self, line: str) -> str | None:
        """The line as the page may see it; None for a line to leave out."""
        if self._in_key:
            self._in_key = not _KEY_END.search(line)
            return None
        if _KEY_BEGIN.search(line):
            self._in_key = not _KEY_END.search(line)
            return "<private key hidden>"
        return _TOKEN.sub("<token>", line)


def lab_command(name: str) -> list[str]:
    """``ztbank lab NAME`` with this interpreter (no reliance on a script on PATH)."""
    return [
        sys.executable,
        "-c",
        "from services.cli.main import main; raise SystemExit(main())",
        "lab",
        name,
    ]


@dataclass
class LabRun:
    name: str
    started: float  # epoch seconds
    lines: list[str] = field(default_factory=list)
    exit_code: int | None = None
    pid: int | None = None  # the lab's process, once started

    @property
    def verdict(self) -> str | None:
        if self.exit_code is None:
            return None
        return PASSED if self.exit_code == 0 else FAILED

    def document(self) -> dict[str, Any]:
        return {
            "lab": self.name,
            "started": self.started,
            "lines": self.lines,
            "exit_code": self.exit_code,
            "verdict": self.verdict,
        }


class LabRunner:
    """Starts labs on the console's event loop; ``publish`` tells the page each line and the
    end.  The last run is kept so that a page opened later sees it."""

    def __init__(
        self,
        labs: Mapping[str, str],
        env: Mapping[str, str],
        publish: Publish,
        *,
        command: Callable[[str], Sequence[str]] = lab_command,
        timeout: float = LAB_TIMEOUT_SECONDS,
    ) -> None:
        self.labs = dict(labs)
        self._env = dict(env)
        self._publish = publish
        self._command = command
        self._timeout = timeout
        self.last: LabRun | None = None
        self._task: asyncio.Task[None] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._lock: LabLock | None = None  # the stack's lab lock, held for the running lab

    @property
    def running(self) -> LabRun | None:
        return self.last if self.last is not None and self.last.exit_code is None else None

    def check(self, name: str) -> None:
        """Raise the reason ``name`` cannot start now (unknown, or another lab is running)."""
        if name not in self.labs:
            known = ", ".join(sorted(self.labs))
            raise UnknownLabError(f"there is no lab {name!r}; the labs are: {known}")
        if (running := self.running) is not None:
            # As a lab holding the stack's lab lock is named; its pid: the console's until the
            # lab's own process runs.
            pid = running.pid or os.getpid()
            raise LabBusyError(LabHolder(running.name, pid, running.started, "console").refusal())

    async def start(self, name: str, lock: LabLock | None = None) -> LabRun:
        """Start lab ``name``; with ``lock`` (the stack's lab lock, taken for it), the lab is
        handed the lock (an inherited descriptor, LAB_LOCK_FD) and it is released when the lab
        has ended: the lock is held from the start to the end of the run, by the console and
        the lab both, so that neither's end alone lets another lab in while this one runs."""
        try:
            self.check(name)
        except ConsoleError:
            if lock is not None:
                lock.release()
            raise
        # Taken before the first await: a second click in between finds this lab running.
        run = self.last = LabRun(name, time.time())
        env: Mapping[str, str] = self._env
        handed: tuple[int, ...] = ()
        if lock is not None:
            env, handed = {**env, LAB_LOCK_FD: str(lock.fileno())}, (lock.fileno(),)
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command(name),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                pass_fds=handed,
            )
        except OSError as error:
            if lock is not None:
                lock.release()
            run.lines.append(f"the lab could not be started: {error}")
            run.exit_code = -1
            self._publish("lab", run.document())
            raise LabStartError(f"lab {name!r} could not be started: {error}") from None
        self._lock = lock
        run.pid = process.pid
        self._publish("lab", run.document())
        self._process = process
        self._task = asyncio.get_running_loop().create_task(self._follow(run, process))
        return run

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _follow(self, run: LabRun, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        redact = Redactor()
        try:
            async with asyncio.timeout(self._timeout):
                while raw := await process.stdout.readline():
                    line = redact(raw.decode(errors="replace").rstrip("\n"))
                    if line is None:
                        continue
                    run.lines.append(line)
                    self._publish("lab_line", {"lab": run.name, "line": line})
                run.exit_code = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            run.lines.append(f"lab stopped: it did not end within {self._timeout:g} s")
            run.exit_code = -1
        finally:
            if process.returncode is not None:  # else aclose kills it, then releases
                self._release()
            self._publish("lab", run.document())

    async def wait(self) -> None:
        """Until the lab started last has ended."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        """Stop a lab still running (the console is shutting down): it ends as failed."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        process, run = self._process, self.running
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        self._release()
        if run is not None:
            run.lines.append("lab stopped: the console shut down")
            run.exit_code = -1
