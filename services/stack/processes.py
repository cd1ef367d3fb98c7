"""Background processes of the native stack: started detached, tracked by pid files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    # Run as ``python -m <module>``; with ``argv``, the argument of it that marks our process.
    module: str
    pid_dir: Path
    log_dir: Path
    argv: tuple[str, ...] = ()  # a program that is not one of our modules (Vault's server)

    @property
    def pid_file(self) -> Path:
        return self.pid_dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid from the pid file if that process still runs our module."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if self.module.encode() in cmdline else None

    def running(self) -> bool:
        return self.pid() is not None

    def environment(self) -> dict[str, str] | None:
        """The environment the running process was started with (None if it is not running),
        so that it can be started again exactly as it was."""
        pid = self.pid()
        if pid is None:
            return None
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return None
        pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
        return {os.fsdecode(name): os.fsdecode(value) for name, _, value in pairs}

    def start(self, env: Mapping[str, str]) -> int:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            process = subprocess.Popen(
                list(self.argv) or [sys.executable, "-m", self.module],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the terminal that ran `make up`
            )
        self.pid_file.write_text(f"{process.pid}\n")
        # Until exec completes /proc shows our own command line, and pid() would not know it.
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.pid() is None and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return process.pid

    def exited(self) -> bool:
        """True if the process we started has already died (reaps it if it is our child)."""
        pid = self.pid()
        if pid is None:
            return True
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        return False

    def stop(self) -> bool:
        """SIGTERM, wait, SIGKILL; True if something was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and not self._gone(pid):
            time.sleep(0.05)
        if not self._gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while not self._gone(pid):
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    @staticmethod
    def _gone(pid: int) -> bool:
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state == "Z"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
