"""Start an issuer as a child process and wait until it serves: used by tests, benchmarks and
the local stack."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from services.common.settings import ZtbankSettings, socket_path_from_endpoint
from services.issuer.errors import IssuerError

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def free_loopback_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepts_connections(path: Path, timeout: float = 1.0) -> bool:
    """True if something is listening on the unix socket ``path``."""
    if not path.exists():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class IssuerProcess:
    """``ztbank issuer run`` (as ``python -m services.issuer``) in a child process.

    ``env`` overrides variables of this process's environment or, with
    ``inherit_environment=False``, is the child's whole environment.  Every run appends its
    output to ``log_path``.  Without ZTBANK_ISSUER_HTTP in that environment the child's
    revocation endpoint gets a free loopback port (kept across restarts), so that harnessed
    issuers never collide with each other or with a developer's stack on the default port.
    """

    def __init__(
        self, env: Mapping[str, str], log_path: Path, *, inherit_environment: bool = True
    ) -> None:
        self.env = {**os.environ, **env} if inherit_environment else dict(env)
        self.env.setdefault("ZTBANK_ISSUER_HTTP", f"127.0.0.1:{free_loopback_port()}")
        self.log_path = log_path
        self.settings = ZtbankSettings(
            home=Path(self.env.get("ZTBANK_HOME", "var")),
            certs_dir=Path(self.env.get("ZTBANK_CERTS_DIR", "certs")),
            trust_domain=self.env.get("ZTBANK_TRUST_DOMAIN", "ztbank.example"),
            issuer_http=self.env["ZTBANK_ISSUER_HTTP"],
        )
        self.home = self.settings.home
        self.certs_dir = self.settings.certs_dir
        self.socket_uri = self.env.get(
            "SPIFFE_ENDPOINT_SOCKET", self.settings.default_workload_endpoint
        )
        self.workload_socket = socket_path_from_endpoint(self.socket_uri)
        self.admin_socket = self.settings.admin_socket
        # Base URL of the revocation endpoints: /crls, /crl/<ca>.crl, /ocsp, /healthz.
        self.http_url = self.settings.issuer_url
        self.ready_at: float | None = None  # time.time() when the sockets last became ready
        self._process: subprocess.Popen[bytes] | None = None

    def workload_socket_for(self, name: str) -> Path:
        """The per-workload socket the issuer serves once an entry selects ``name``."""
        return self.settings.workload_socket_for(name)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """Everything the issuer wrote to stdout/stderr so far (all runs), for failure messages."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = READY_TIMEOUT) -> IssuerProcess:
        """Start and wait until both the Workload API and the admin socket accept connections."""
        if self.running:
            raise IssuerError("issuer already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- ztbank issuer run ({time.strftime('%H:%M:%S')}) ---\n".encode())
            log.flush()
            process = self._process = subprocess.Popen(
                [sys.executable, "-m", "services.issuer"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if accepts_connections(self.workload_socket) and accepts_connections(self.admin_socket):
                self.ready_at = time.time()
                return self
            if time.monotonic() >= deadline:
                self.stop()
                raise IssuerError(f"issuer not ready after {timeout:.0f}s:\n{self.log()}")
            time.sleep(POLL_INTERVAL)
        self.stop()
        raise IssuerError(f"issuer exited with {process.returncode}:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit code (None if it was not started)."""
        return self._end(graceful=True)

    def kill(self) -> int | None:
        """SIGKILL at once: the issuer gets no chance to remove its sockets."""
        return self._end(graceful=False)

    def _end(self, *, graceful: bool) -> int | None:
        process, self._process = self._process, None
        if process is None:
            return None
        if graceful:
            process.send_signal(signal.SIGTERM)  # does nothing if it has already exited
            try:
                return process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        return process.wait(STOP_TIMEOUT)

    def restart(self) -> int | None:
        """Stop (returning that exit code) and start again with the same environment."""
        code = self.stop()
        self.start()
        return code

    def __enter__(self) -> IssuerProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
