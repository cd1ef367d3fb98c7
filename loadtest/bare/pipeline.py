"""``BarePipeline``: the three bare processes on free loopback ports, healthy on entry, always
stopped on exit.

    with BarePipeline() as bare:
        bare.url, bare.ca, bare.cert, bare.key, bare.pids  # pids: gateway, engine, risk
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

from loadtest.bare.certs import make_certs
from services.stack.sandbox import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
POLL_SECONDS = 0.05
# Stopped in this order: the gateway first, so nothing calls a stopped server.
NAMES = ("gateway", "engine", "risk")


class BarePipelineError(RuntimeError):
    """A bare process did not start or does not answer (the message has its last log lines)."""


@dataclass(frozen=True)
class BareEndpoints:
    host: str
    port: int
    ca: Path  # the CA that signed the gateway's certificate (IP SAN 127.0.0.1)
    cert: Path  # a client certificate the gateway accepts, and its key
    key: Path
    pids: dict[str, int]  # gateway, engine, risk

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.cert, self.key)
        return context


@dataclass
class _Process:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class BarePipeline:
    def __init__(self, ready_timeout: float = READY_TIMEOUT) -> None:
        self._ready_timeout = ready_timeout
        self._root: Path | None = None
        self._processes: list[_Process] = []

    # -- start ----------------------------------------------------------------------------

    def __enter__(self) -> BareEndpoints:
        self._root = Path(tempfile.mkdtemp(prefix="ztbare"))
        try:
            return self._start(self._root)
        except BaseException:
            self._stop()
            raise

    def _start(self, root: Path) -> BareEndpoints:
        certs = root / "certs"
        files = make_certs(certs)
        gateway, engine, risk = free_ports(3)
        self._spawn("risk", risk, root)
        self._spawn("engine", engine, root, "--risk", f"127.0.0.1:{risk}", "--db", root / "db")
        self._spawn("gateway", gateway, root, "--engine", f"127.0.0.1:{engine}")
        endpoints = BareEndpoints(
            host="127.0.0.1",
            port=gateway,
            ca=files["client"].ca,
            cert=files["client"].cert,
            key=files["client"].key,
            pids={p.name: p.popen.pid for p in self._processes},
        )
        deadline = time.monotonic() + self._ready_timeout
        for process in self._processes:
            self._wait(process, deadline, partial(_accepts, process.port))
        gateway_process = next(p for p in self._processes if p.name == "gateway")
        self._wait(gateway_process, deadline, partial(_serves, endpoints))
        return endpoints

    def _spawn(self, name: str, port: int, root: Path, *extra: str | Path) -> None:
        log = root / f"{name}.log"
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
        )
        command = [sys.executable, "-m", f"loadtest.bare.{name}", "--port", str(port)]
        command += ["--certs", str(root / "certs"), *map(str, extra)]
        with log.open("ab") as output:
            popen = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self._processes.append(_Process(name, port, popen, log))

    def _wait(self, process: _Process, deadline: float, ready: Callable[[], bool]) -> None:
        last = ""
        while time.monotonic() < deadline:
            for each in self._processes:
                if each.popen.poll() is not None:
                    raise BarePipelineError(
                        f"bare {each.name} exited ({each.popen.returncode}) during start-up:\n"
                        f"{each.tail()}"
                    )
            try:
                if ready():
                    return
            except (OSError, ValueError, http.client.HTTPException) as error:
                last = f"{type(error).__name__}: {error}"
            time.sleep(POLL_SECONDS)
        raise BarePipelineError(
            f"bare {process.name} not ready in {self._ready_timeout:g}s ({last or 'no answer'});"
            f" last lines of its log:\n{process.tail()}"
        )

    # -- stop -----------------------------------------------------------------------------

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        for name in NAMES:
            for process in self._processes:
                if process.name == name:
                    _terminate(process.popen)
        self._processes.clear()
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None


def _terminate(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _serves(endpoints: BareEndpoints) -> bool:
    """One request of each kind through the whole pipeline (a transfer crosses both gRPC hops)."""
    connection = http.client.HTTPSConnection(
        endpoints.host, endpoints.port, context=endpoints.client_context(), timeout=5
    )
    try:
        checks: list[tuple[str, str, dict[str, object] | None, int]] = [
            ("GET", "/healthz", None, 200),
            ("GET", "/v1/accounts/acc-alice-cny", None, 200),
            (
                "POST",
                "/v1/transfers",
                {
                    "from_account": "acc-alice-cny",
                    "to_account": "acc-alice-savings",
                    "amount": "0.01",
                    "currency": "CNY",
                },
                201,
            ),
        ]
        for method, path, body, expected in checks:
            headers = {"Idempotency-Key": str(uuid.uuid4())}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=payload, headers=headers)
            reply = connection.getresponse()
            text = reply.read()
            if reply.status != expected:
                raise ValueError(f"{method} {path} answered {reply.status}: {text[:200]!r}")
        return True
    finally:
        connection.close()
