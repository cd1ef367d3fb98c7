"""HTTPS with client certificates for ASGI apps under uvicorn, authorized by SPIFFE ID.

uvicorn does not hand the client certificate to the application, so ztbank plugs in its own
h11 protocol: once the TLS handshake is done it reads the verified peer certificate from the
transport, checks the X509-SVID rules (closing the connection if they fail) and binds the peer
identity to every request on that connection.  Each request is then authorized against the
policy and audited before the application sees it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.audit import AuditLog, AuditRecord
from services.common.errors import CommonError
from services.common.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.policy import Policy
from services.common.problem import PROBLEM_MEDIA_TYPE, problem
from services.common.telemetry import Telemetry, current_trace_id, extract_context
from services.common.tls import PeerVerifier

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]
TRANSFER_METHOD = "POST /v1/transfers"


@dataclass(frozen=True)
class ConnectionFacts:
    """What the audit needs to know about one TLS connection."""

    client: tuple[str, int] | None
    server: tuple[str, int | None] | None
    tls_version: str | None
    cipher: str | None


@dataclass(frozen=True)
class HttpsGuard:
    service: str
    verifier: PeerVerifier
    policy: Policy
    audit: AuditLog
    telemetry: Telemetry

    def record(
        self,
        facts: ConnectionFacts,
        peer: PeerIdentity | None,
        method: str,
        decision: str,
        reason: str,
    ) -> None:
        client, server = facts.client or ("", None), facts.server or ("", None)
        self.audit.record(
            AuditRecord(
                caller_spiffe_id=str(peer.spiffe_id) if peer else None,
                cert_serial=peer.serial if peer else None,
                cert_sha256=peer.fingerprint_sha256 if peer else None,
                source_addr=client[0],
                source_port=client[1],
                dest_addr=server[0],
                dest_port=server[1],
                tls_version=facts.tls_version,
                cipher=facts.cipher,
                service=self.service,
                method=method,
                decision=decision,
                reason=reason,
                trace_id=current_trace_id(),
            )
        )
        self.telemetry.authz_decisions.add(1, {"service": self.service, "decision": decision})


async def _send_problem(send: Send, status: int, title: str, detail: str) -> None:
    body = json.dumps(
        problem(status, title=title, detail=detail).model_dump(exclude_none=True)
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _ConnectionApp:
    """The application as seen by one verified connection."""

    def __init__(
        self, app: Asgi, guard: HttpsGuard, peer: PeerIdentity, facts: ConnectionFacts
    ) -> None:
        self._app = app
        self._guard = guard
        self._peer = peer
        self._facts = facts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # Only plain HTTP requests pass the guard; anything else (a WebSocket) is refused.
            self._guard.record(self._facts, self._peer, scope["type"], "deny", "not HTTP")
            return
        method = f"{scope['method']} {scope['path']}"
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with self._guard.telemetry.tracer.start_as_current_span(
            method,
            context=extract_context(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ):
            decision = self._guard.policy.decide(self._guard.service, method, self._peer.spiffe_id)
            outcome = "allow" if decision.allowed else "deny"
            self._guard.record(self._facts, self._peer, method, outcome, decision.reason)
            if not decision.allowed:
                await _send_problem(send, 403, "Forbidden", decision.reason)
                return
            token = set_current_peer(self._peer)
            started = time.perf_counter()
            try:
                await self._app(scope, receive, send)
            finally:
                reset_current_peer(token)
                if method == TRANSFER_METHOD:
                    self._guard.telemetry.transfer_duration.record(
                        time.perf_counter() - started, {"service": self._guard.service}
                    )


def mtls_protocol(guard: HttpsGuard) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` bound to ``guard``."""

    class MtlsH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # asyncio builds the protocol when the TCP connection is accepted and calls
            # connection_made once the TLS handshake is done: the gap is the handshake.
            self._accepted = time.perf_counter()
            super().__init__(*args, **kwargs)
            # uvicorn's WebSocket handler would call the app without this guard.
            self.ws_protocol_class = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            guard.telemetry.handshake_duration.record(
                time.perf_counter() - self._accepted, {"service": guard.service}
            )
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            cipher = ssl_object.cipher() if ssl_object is not None else None
            facts = ConnectionFacts(
                client=self.client,
                server=self.server,
                tls_version=ssl_object.version() if ssl_object is not None else None,
                cipher=cipher[0] if cipher else None,
            )
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            address = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            try:
                if not der:
                    raise CommonError("no client certificate")
                peer = guard.verifier.verify([der], address)
            except CommonError as error:
                guard.record(facts, None, "TLS handshake", "deny", f"invalid X509-SVID: {error}")
                transport.abort()
                return
            self.app = _ConnectionApp(self.app, guard, peer, facts)

    return MtlsH11Protocol
