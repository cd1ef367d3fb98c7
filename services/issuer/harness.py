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


def accepts_connections(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class IssuerProcess:
    """``ztbank issuer run`` in a child process, with the given environment overrides."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        settings = ZtbankSettings(
            home=Path(self.env.get("ZTBANK_HOME", "var")),
            trust_domain=self.env.get("ZTBANK_TRUST_DOMAIN", "ztbank.example"),
        )
        self.home = settings.home
        self.socket_uri = self.env.get("SPIFFE_ENDPOINT_SOCKET", settings.default_workload_endpoint)
        self.workload_socket = socket_path_from_endpoint(self.socket_uri)
        self.admin_socket = settings.admin_socket
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = READY_TIMEOUT) -> IssuerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "services.issuer"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise IssuerError(f"issuer exited with {self._process.returncode}:\n{self.log()}")
            if accepts_connections(self.workload_socket) and accepts_connections(self.admin_socket):
                return self
            time.sleep(0.05)
        self.stop()
        raise IssuerError(f"issuer not ready after {timeout:.0f}s:\n{self.log()}")

    def stop(self) -> int | None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return process.returncode if process else None
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def restart(self) -> IssuerProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> IssuerProcess:
        return self.start() if self._process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
