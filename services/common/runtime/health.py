"""Liveness and readiness of a bank service, each told with its reason.

Readiness is false whenever the service would refuse the work it is asked for: its SVID has
expired, its CRLs are not fresh (it fails closed), its policy is unusable (it denies
everything), its audit log cannot be written (it refuses what it cannot record) or the circuit
breaker to its callee is open.  Liveness is false only when its event loop has stopped turning:
a restart cures that, and nothing that readiness reports.

The same checks answer three ways:

* the **local health socket**, ``run/<service>/health.sock`` under the service's home: HTTP
  ``GET /livez`` and ``GET /readyz`` with a JSON body.  It reveals state and grants nothing, so
  it asks for no SVID: ``ztbank status``, ``make up``'s wait and a container's health check read
  the service's own reason there even when mutual TLS cannot complete;
* over mutual TLS, for any verified SVID of the trust domain: the gateway's ``GET /livez`` and
  ``GET /readyz``, the gRPC services' ``grpc.health.v1`` (NOT_SERVING while not ready).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Literal

from services.common.errors import CommonError
from services.common.identity.source import SvidMaterial
from services.common.runtime.health_check import NoAnswerError, ask

logger = logging.getLogger(__name__)

# The event loop marks itself alive this often; the readiness checks run at the same beat, so
# a flap is logged (and gRPC health follows) within half a second.
BEAT_SECONDS = 0.5
# Longer than any pause a healthy loop takes (a full GC, a burst of handshakes on 2 cores).
STALL_SECONDS = 10.0
# A probe never waits longer than this for the socket's answer.
PROBE_TIMEOUT = 2.0
SOCKET_NAME = "health.sock"

Check = Callable[[], str | None]
Probe = Literal["livez", "readyz"]


class HealthUnavailableError(CommonError):
    """The local health socket did not answer (the service is not running, or not yet)."""


@dataclass(frozen=True)
class HealthAnswer:
    """One probe's verdict, and every reason it is negative (none when it is positive)."""

    ok: bool
    reasons: tuple[str, ...] = ()

    def document(self, service: str, probe: Probe) -> dict[str, object]:
        good, bad = ("live", "not live") if probe == "livez" else ("ready", "not ready")
        return {"service": service, "status": good if self.ok else bad, "reasons": self.reasons}


def health_socket(home: Path, service: str) -> Path:
    """Where ``service`` (whose ZTBANK_HOME is ``home``) serves its local health socket."""
    return home / "run" / service / SOCKET_NAME


def svid_problem(material: SvidMaterial, now: datetime | None = None) -> str | None:
    """Why an SVID cannot serve: a peer would refuse it once it has expired."""
    now = now or datetime.now(UTC)
    if material.not_after <= now:
        return (
            f"SVID {material.serial} expired at {material.not_after.isoformat()} and was not"
            " renewed: the Workload API has sent no new one"
        )
    return None


class ServiceHealth:
    """The checks of one service, asked on demand; a change of readiness is logged once, with
    its reasons, so a flapping service shows why in its log."""

    def __init__(
        self,
        service: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        stall_seconds: float = STALL_SECONDS,
    ) -> None:
        self.service = service
        self._clock = clock
        self._stall_seconds = stall_seconds
        self._checks: list[tuple[str, Check]] = []
        self._beat = clock()
        self._lock = threading.Lock()
        self._was_ready: bool | None = None

    def require(self, name: str, check: Check) -> None:
        """Readiness also needs ``check()`` to return None (else it returns the reason)."""
        with self._lock:
            self._checks.append((name, check))

    def beat(self) -> None:
        """The event loop is turning."""
        self._beat = self._clock()

    def liveness(self) -> HealthAnswer:
        stalled = self._clock() - self._beat
        if stalled > self._stall_seconds:
            return HealthAnswer(False, (f"its event loop has not run for {stalled:.0f}s",))
        return HealthAnswer(True)

    def readiness(self) -> HealthAnswer:
        with self._lock:
            checks = list(self._checks)
        reasons = []
        for name, check in checks:
            try:
                reason = check()
            except Exception as error:  # a check that cannot tell is a reason not to serve
                reason = f"{name}: cannot be checked: {error}"
            if reason:
                reasons.append(reason)
        answer = HealthAnswer(not reasons, tuple(reasons))
        self._log_change(answer)
        return answer

    def _log_change(self, answer: HealthAnswer) -> None:
        with self._lock:
            changed, self._was_ready = answer.ok != self._was_ready, answer.ok
        if not changed:
            return
        if answer.ok:
            logger.info("%s: ready", self.service)
        else:
            logger.warning("%s: not ready: %s", self.service, "; ".join(answer.reasons))


async def keep_watch(
    health: ServiceHealth,
    on_change: Callable[[bool], Awaitable[None]] | None = None,
    *,
    interval: float = BEAT_SECONDS,
) -> None:
    """Run on the service's event loop until cancelled: mark it alive, and tell ``on_change``
    each time readiness turns (first at once)."""
    ready: bool | None = None
    while True:
        health.beat()
        answer = health.readiness()
        if on_change is not None and answer.ok != ready:
            await on_change(answer.ok)
        ready = answer.ok
        await asyncio.sleep(interval)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    health: ServiceHealth


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = PROBE_TIMEOUT  # a client that sends nothing does not hold a thread

    def do_GET(self) -> None:
        health = self.server.health
        probe: Probe
        if self.path == "/livez":
            probe, answer = "livez", health.liveness()
        elif self.path == "/readyz":
            probe, answer = "readyz", health.readiness()
        else:
            self._send(404, {"detail": "only GET /livez and GET /readyz are served here"})
            return
        self._send(200 if answer.ok else 503, answer.document(health.service, probe))

    def _send(self, status: int, document: dict[str, object]) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes come every few seconds: not worth a log line each."""


class HealthSocket:
    """The local health socket of one service, served by a thread until ``close``.

    World-connectable on purpose: it answers two questions about state and accepts nothing
    else, so any local user or container health check may ask without an identity."""

    def __init__(self, path: Path, health: ServiceHealth) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # left by a process that was killed
        self.path = path
        self._server = _Server(str(path), _Handler)
        self._server.health = health
        os.chmod(path, 0o666)  # noqa: S103 - see the class docstring
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": BEAT_SECONDS},
            name="health-socket",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


def read_health(
    path: Path, probe: Probe = "readyz", *, timeout: float = PROBE_TIMEOUT
) -> HealthAnswer:
    """Ask a service's local health socket; HealthUnavailableError when nothing answers."""
    try:
        status, document = ask(str(path), probe, timeout)
    except NoAnswerError as error:
        raise HealthUnavailableError(str(error)) from None
    return HealthAnswer(status == 200, tuple(str(reason) for reason in document["reasons"]))
