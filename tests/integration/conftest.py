"""Fixtures that run the real issuer (``ztbank issuer run``) as a subprocess.

Every issuer gets its own short directory under /tmp (unix socket paths must stay under 108
bytes, which pytest's ``tmp_path`` does not guarantee), its own root CA made by
``ztbank certs init``, and a clean environment: no ``ZTBANK_*``, ``SPIFFE_*`` or ``VAULT_*``
variable of the developer's shell leaks in.  Readiness and every other wait poll with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import pytest

TRUST_DOMAIN = "ztbank.example"
DEFAULT_SVID_TTL = "10s"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
_LEAKY_PREFIXES = ("ZTBANK_", "SPIFFE_", "VAULT_")

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    message: str | Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


def socket_accepts(path: Path) -> bool:
    """True if something is listening on the unix socket ``path``."""
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def ztbank_executable() -> str:
    """The ``ztbank`` console script of the interpreter running the tests."""
    beside = Path(sys.executable).with_name("ztbank")
    if beside.exists():
        return str(beside)
    found = shutil.which("ztbank")
    if found is None:
        raise RuntimeError("the ztbank console script is not installed (pip install -e .)")
    return found


def one_line(stderr: str) -> str:
    """The single line of ``stderr``; fail (showing it) if it has more, none, or a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return lines[0]


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_PREFIXES)}


class IssuerProcess:
    """One ``ztbank issuer run`` subprocess and the CLI that talks to it.

    ``env`` is the complete environment of the issuer and of every ``cli`` call.
    """

    def __init__(self, base_dir: Path, env: dict[str, str]) -> None:
        self.base_dir = base_dir
        self.env = env
        self.home = Path(env["ZTBANK_HOME"])
        self.certs_dir = Path(env["ZTBANK_CERTS_DIR"])
        self.log_path = base_dir / "issuer.log"
        self.ready_at: float | None = None  # time.time() when the sockets last became ready
        self._process: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return Path(self.env["SPIFFE_ENDPOINT_SOCKET"].removeprefix("unix://"))

    @property
    def socket_uri(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def admin_socket(self) -> Path:
        return self.home / "run" / "issuer" / "admin.sock"

    def workload_socket_for(self, name: str) -> Path:
        return self.home / "run" / name / "agent.sock"

    @property
    def log(self) -> str:
        """Everything the issuer wrote to stdout/stderr so far (all runs), for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no issuer log>"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError("issuer already running")
        with self.log_path.open("ab") as log:
            log.write(f"--- ztbank issuer run ({time.strftime('%H:%M:%S')}) ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [ztbank_executable(), "issuer", "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                self._ready,
                timeout=STARTUP_TIMEOUT,
                message=lambda: f"issuer not ready after {STARTUP_TIMEOUT}s; log:\n{self.log}",
            )
        except BaseException:
            self.stop()
            raise
        self.ready_at = time.time()

    def _ready(self) -> bool:
        assert self._process is not None
        code = self._process.poll()
        if code is not None:
            raise AssertionError(f"issuer exited with {code} during startup; log:\n{self.log}")
        return socket_accepts(self.socket_path) and socket_accepts(self.admin_socket)

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL on timeout; the exit code (None if it was not started)."""
        process, self._process = self._process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        return process.returncode

    def kill(self) -> None:
        """SIGKILL: the issuer gets no chance to remove its sockets."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> int | None:
        """Stop (returning that exit code) and start again with the same environment."""
        code = self.stop()
        self.start()
        return code

    # -- CLI ---------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``ztbank ARGS`` with the issuer's environment; never raises on a non-zero exit."""
        return subprocess.run(
            [ztbank_executable(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.cli(*args)
        assert result.returncode == 0, (
            f"ztbank {' '.join(args)} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nissuer log:\n{self.log}"
        )
        return result

    def create_entry(self, spiffe_id: str, *selectors: str) -> str:
        """``ztbank entry create``; the new entry's id."""
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--json"]
        for selector in selectors:
            args += ["--selector", selector]
        entry = json.loads(self.cli_ok(*args).stdout)
        assert entry["spiffe_id"] == spiffe_id
        return str(entry["id"])

    def entry_ids(self) -> list[str]:
        entries = json.loads(self.cli_ok("entry", "list", "--json").stdout)
        return [str(entry["id"]) for entry in entries]


class IssuerFactory:
    """Makes issuers in fresh short temp dirs; ``close`` stops them all and removes the dirs."""

    def __init__(self) -> None:
        self._issuers: list[IssuerProcess] = []
        self._dirs: list[Path] = []

    def prepare(self, **env: str) -> IssuerProcess:
        """An issuer with its root CA created but not started; ``env`` overrides variables."""
        base = Path(tempfile.mkdtemp(prefix="zt", dir="/tmp"))
        self._dirs.append(base)
        home = base / "home"
        full_env = clean_environment()
        full_env.update(
            {
                "ZTBANK_HOME": str(home),
                "ZTBANK_CERTS_DIR": str(base / "certs"),
                "ZTBANK_TRUST_DOMAIN": TRUST_DOMAIN,
                "ZTBANK_SVID_TTL": DEFAULT_SVID_TTL,
                "SPIFFE_ENDPOINT_SOCKET": f"unix://{home / 'run' / 'workload.sock'}",
            }
        )
        full_env.update(env)
        issuer = IssuerProcess(base, full_env)
        self._issuers.append(issuer)
        issuer.cli_ok("certs", "init")
        return issuer

    def __call__(self, **env: str) -> IssuerProcess:
        """A started issuer; ``env`` overrides variables, e.g. ``ZTBANK_SVID_TTL="5s"``."""
        issuer = self.prepare(**env)
        issuer.start()
        return issuer

    def close(self) -> None:
        for issuer in self._issuers:
            issuer.stop()
        for directory in self._dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self._issuers.clear()
        self._dirs.clear()

    def __enter__(self) -> IssuerFactory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture
def issuer_factory() -> Iterator[IssuerFactory]:
    with IssuerFactory() as factory:
        yield factory


@pytest.fixture
def issuer(issuer_factory: IssuerFactory) -> IssuerProcess:
    """A running issuer with ZTBANK_SVID_TTL=10s and no entries."""
    return issuer_factory(ZTBANK_SVID_TTL=DEFAULT_SVID_TTL)
