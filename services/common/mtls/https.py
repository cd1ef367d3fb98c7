"""HTTPS with client certificates for ASGI apps under uvicorn, authorized by SPIFFE ID.

uvicorn does not hand the client certificate to the application, so ztbank plugs in its own
HTTP protocol: once the TLS handshake is done it reads the verified peer certificate from the
transport, checks the X509-SVID rules (closing the connection if they fail) and binds the peer
identity to every request on that connection.  Each request is then authorized against the
policy and audited before the application sees it.

Revocation: the handshake check refuses a revoked peer (``PeerVerifier``), and every verified
connection is kept in a ``LiveConnections`` registry subscribed to the revocation watcher, which
aborts the open connections of a peer as soon as its serial shows up in a CRL.  The server
context issues no session tickets, and a resumed TLS 1.2 session (session IDs) still goes
through ``PeerVerifier`` with the certificate stored in the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import uvicorn
from cryptography import x509
from opentelemetry import trace
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import get_local_addr, get_remote_addr

from services.common.authz.audit import AuditLog, AuditWriteError
from services.common.authz.decisions import (
    AUTHZ_EVENT,
    REFUSAL_EVENT,
    TLS_HANDSHAKE_EVENT,
    ConnectionFacts,
    DecisionRecorder,
    TlsFacts,
)
from services.common.authz.policy import Policy
from services.common.errors import CommonError
from services.common.mtls.contexts import PeerVerifier, iana_cipher_code, requested_server_name
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.observability.telemetry import Telemetry, extract_context, record_handshake
from services.common.problem import PROBLEM_MEDIA_TYPE, problem
from services.common.revocation import RevocationError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]
TRANSFER_METHOD = "POST /v1/transfers"
# RFC 9110 9.2.1: requests that change nothing on the server.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The application's own refusals of a request the policy allowed, each audited with its reason.
REFUSAL_STATUSES = frozenset({401, 403, 409})
HANDSHAKE_TIMEOUT = 10.0
DEFAULT_MAX_IN_FLIGHT = 64
OVERLOADED_REASON = "shed: the server is at its limit of requests in flight"
CONNECTION_METHOD = "TLS connection"
HANDSHAKE_METHOD = "TLS handshake"
HANDSHAKE_FAILED = "fail"
REVOKED_CONNECTION_REASON = "certificate revoked: connection closed"
EXPIRED_CONNECTION_REASON = "certificate expired: connection closed"


class InFlight:
    """Requests being served by one server (event loop thread only). Beyond ``limit`` a request
    is shed at once with 503, rather than queued behind the others for seconds."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the in-flight limit must be at least 1")
        self.limit = limit
        self.count = 0


@dataclass(frozen=True)
class HttpsGuard:
    service: str
    verifier: PeerVerifier
    policy: Policy
    audit: AuditLog
    telemetry: Telemetry
    in_flight: InFlight = field(default_factory=lambda: InFlight(DEFAULT_MAX_IN_FLIGHT))
    # Made from the fields above: every decision of this server is reported through it.
    decisions: DecisionRecorder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        recorder = DecisionRecorder(self.service, self.audit, self.telemetry)
        object.__setattr__(self, "decisions", recorder)

    def refuse(
        self,
        facts: ConnectionFacts,
        peer: PeerIdentity | None,
        method: str,
        reason: str,
        *,
        event: str = AUTHZ_EVENT,
    ) -> None:
        """Audit a denial, blocking until it is on disk: rare events (a refused handshake, a
        connection closed, a request that is not HTTP) whose connection goes right after, also
        when the record cannot be written (said in the log: nothing was served)."""
        try:
            self.decisions.submit(facts, peer, method, "deny", reason, event=event).result()
        except AuditWriteError as error:
            logger.warning("%s: refused %s (%s) unaudited: %s", self.service, method, reason, error)


async def _send_problem(
    send: Send, status: int, title: str, detail: str, retry_after_seconds: int | None = None
) -> None:
    body = json.dumps(
        problem(status, title=title, detail=detail).model_dump(exclude_none=True)
    ).encode()
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after_seconds is not None:
        headers.append((b"retry-after", str(retry_after_seconds).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _after(written: asyncio.Future[None], send: Send) -> Send:
    """``send`` that first waits for ``written`` (an audit record's sync)."""

    async def send_when_written(message: MutableMapping[str, Any]) -> None:
        await written
        await send(message)

    return send_when_written


class _Answered:
    """``send`` that remembers whether a response has started to reach the client."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.started = True
        await self._send(message)


class _Refusal:
    """``send`` that notes the reason of a refusal the application answered itself (401, 403,
    409: the policy allowed the request, the service did not), from its problem's detail."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._status = 0
        self.reason: str | None = None

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
        elif self._status in REFUSAL_STATUSES and message["type"] == "http.response.body":
            self.reason = _refusal_reason(self._status, message.get("body", b""))
        await self._send(message)


def _refusal_reason(status: int, body: bytes) -> str:
    try:
        document = json.loads(body)
        detail = f"{document['title']}: {document['detail']}"
    except (ValueError, KeyError, TypeError):
        detail = "no problem detail"
    return f"refused by the service: {status} {detail}"


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
            self._guard.refuse(self._facts, self._peer, scope["type"], "not HTTP")
            return
        method = f"{scope['method']} {scope['path']}"
        answered = _Answered(send)
        try:
            await self._guarded(scope, receive, answered, method)
        except AuditWriteError as error:
            # Nothing is served unaudited: refused, with the cause, and no traceback for what
            # an operator expects (a full disk); the next request tries the log again.
            logger.warning("%s: refused %s: %s", self._guard.service, method, error)
            if not answered.started:
                await _send_problem(send, 503, "Service Unavailable", str(error), 1)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with self._guard.telemetry.tracer.start_as_current_span(
            method,
            context=extract_context(headers),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ):
            decision = self._guard.policy.decide(self._guard.service, method, self._peer.spiffe_id)
            in_flight = self._guard.in_flight
            if not decision.allowed:
                await self._audited(method, "deny", decision.reason)
                await _send_problem(send, 403, "Forbidden", decision.reason)
                return
            if in_flight.count >= in_flight.limit:
                # Answered at once and audited: the caller may retry; nothing was started.
                await self._audited(method, "deny", OVERLOADED_REASON)
                await _send_problem(send, 503, "Service Unavailable", OVERLOADED_REASON, 1)
                return
            in_flight.count += 1
            try:
                written = self._audited(method, "allow", decision.reason)
                if scope["method"] in SAFE_METHODS:
                    # A safe request changes nothing: it runs while its record is synced, and
                    # nothing of its answer leaves before the record is on disk.
                    await self._serve(scope, receive, _after(written, send), method)
                    await written
                else:
                    await written
                    await self._serve(scope, receive, send, method)
            finally:
                in_flight.count -= 1

    def _audited(
        self, method: str, decision: str, reason: str, *, event: str = AUTHZ_EVENT
    ) -> asyncio.Future[None]:
        """The decision's record, queued; the future completes once it is on disk."""
        return asyncio.wrap_future(
            self._guard.decisions.submit(
                self._facts, self._peer, method, decision, reason, event=event
            )
        )

    async def _serve(self, scope: Scope, receive: Receive, send: Send, method: str) -> None:
        token = set_current_peer(self._peer)
        started = time.perf_counter()
        refusal = _Refusal(send)
        try:
            await self._app(scope, receive, refusal)
        finally:
            reset_current_peer(token)
            if method == TRANSFER_METHOD:
                self._guard.telemetry.transfer_duration.record(
                    time.perf_counter() - started, {"service": self._guard.service}
                )
        if refusal.reason is not None:
            try:
                await self._audited(method, "deny", refusal.reason, event=REFUSAL_EVENT)
            except AuditWriteError as error:
                # Already answered: the refusal stands, only its record is missing (said).
                logger.warning(
                    "%s: refusal of %s unaudited: %s", self._guard.service, method, error
                )


@dataclass
class _LiveConnection:
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    peer: PeerIdentity
    facts: ConnectionFacts
    expiry: asyncio.TimerHandle | None = None


class LiveConnections:
    """The verified connections of one server, closed when their peer's certificate is revoked
    or expires (a keep-alive connection must not outlive the SVID it was opened with).

    Revocation notices arrive in the watcher's thread; the transports belong to the event loop,
    so the abort is handed to it.  A connection is re-checked right after it joins the registry:
    a notice that went out between its handshake check and its registration is not missed.
    """

    def __init__(self, guard: HttpsGuard) -> None:
        self._guard = guard
        self._lock = threading.Lock()
        self._live: dict[object, _LiveConnection] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def add(
        self, key: object, transport: asyncio.Transport, peer: PeerIdentity, facts: ConnectionFacts
    ) -> bool:
        """Called in the event loop once ``transport``'s peer has been verified; False if the
        peer was revoked meanwhile (the connection is then already closed)."""
        loop = asyncio.get_running_loop()
        connection = _LiveConnection(loop, transport, peer, facts)
        if peer.valid_until is not None:
            left = (peer.valid_until - datetime.now(UTC)).total_seconds()
            connection.expiry = loop.call_later(
                max(left, 0.0), self._close, key, connection, EXPIRED_CONNECTION_REASON
            )
        with self._lock:
            self._live[key] = connection
        if peer.serial in self._guard.verifier.revocation.revoked_serials():
            self._close(key, connection)
            return False
        return True

    def discard(self, key: object) -> None:
        with self._lock:
            connection = self._live.pop(key, None)
        if connection is not None and connection.expiry is not None:
            connection.expiry.cancel()

    def close_revoked(self, serials: frozenset[str]) -> None:
        """The revocation listener: abort every connection whose peer serial is in ``serials``."""
        with self._lock:
            doomed = [(k, c) for k, c in self._live.items() if c.peer.serial in serials]
        for key, connection in doomed:
            try:
                connection.loop.call_soon_threadsafe(self._close, key, connection)
            except RuntimeError:  # the loop is closed: so is the connection
                self.discard(key)

    def _close(
        self, key: object, connection: _LiveConnection, reason: str = REVOKED_CONNECTION_REASON
    ) -> None:
        with self._lock:
            if self._live.pop(key, None) is None:
                return  # already gone, or already closed by an earlier notice
        if connection.expiry is not None:
            connection.expiry.cancel()
        self._guard.refuse(connection.facts, connection.peer, CONNECTION_METHOD, reason)
        connection.transport.abort()


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        # The rule that failed ("certificate has expired", "... is not yet valid", "unable to
        # get local issuer certificate"), not only OpenSSL's CERTIFICATE_VERIFY_FAILED.
        return f"{error.reason}: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return error.reason or error.__class__.__name__
    return str(error) or error.__class__.__name__


def _subject_of(der: bytes | None) -> str | None:
    """The subject DN of a certificate the SVID rules refused (it may not even parse)."""
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return None


def _established(ssl_object: ssl.SSLObject | None, session_id: str) -> TlsFacts:
    if ssl_object is None:
        return TlsFacts(session_id=session_id)
    cipher = ssl_object.cipher()
    name = cipher[0] if cipher else None
    return TlsFacts(
        version=ssl_object.version(),
        cipher=name,
        cipher_code=iana_cipher_code(name),
        sni=requested_server_name(ssl_object),
        alpn=ssl_object.selected_alpn_protocol(),
        session_id=session_id,
    )


def mtls_protocol(
    guard: HttpsGuard, tls_context: Callable[[], ssl.SSLContext]
) -> type[HttpToolsProtocol]:
    """An HTTP protocol class for ``uvicorn.Config(http=...)`` bound to ``guard``: uvicorn's
    httptools protocol (llhttp, in C; h11 in pure Python cost a fifth of the gateway's time).

    uvicorn is started without TLS: the protocol upgrades each accepted TCP connection itself
    with ``loop.start_tls``, so a refused handshake (no certificate, unknown CA, expired) is
    audited like every other decision, and the handshake time is measured exactly.
    """

    connections = LiveConnections(guard)
    guard.verifier.revocation.subscribe(connections.close_revoked)

    class MtlsHttpProtocol(HttpToolsProtocol):
        live = connections

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn's WebSocket handler would call the app without this guard.
            self.ws_protocol_class = None
            self._secured = False
            self._handshake: asyncio.Task[None] | None = None
            # Bytes the TLS layer decrypts before this task has verified the peer.
            self._early: list[bytes] = []
            self._session_id = ""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            # Nothing may reach the HTTP parser before the TLS layer sits in between.
            transport.pause_reading()
            self._handshake = self.loop.create_task(self._secure(transport))

        def data_received(self, data: bytes) -> None:
            if self._secured:
                super().data_received(data)
            else:
                self._early.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.discard(self)
            # uvicorn's side is attached once the TLS handshake is done, verified or not: a
            # refused peer must leave uvicorn's connection set too, or shutdown waits for it.
            if self.transport is not None:
                super().connection_lost(exc)
            if not self._secured and self._handshake is not None:
                self._handshake.cancel()

        async def _secure(self, tcp: asyncio.Transport) -> None:
            # TLS 1.3 without tickets has no session ID: the audit's session identifier is the
            # connection's own, the same in each of its records.
            self._session_id = secrets.token_hex(8)
            plain_facts = ConnectionFacts(
                client=get_remote_addr(tcp),
                server=get_local_addr(tcp),
                tls=TlsFacts(session_id=self._session_id, handshake=HANDSHAKE_FAILED),
            )
            started = time.perf_counter()
            try:
                tls = await self.loop.start_tls(
                    tcp,
                    self,
                    tls_context(),
                    server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                )
            except (OSError, TimeoutError) as error:
                record_handshake(guard.telemetry, guard.service, "server", started, ok=False)
                guard.refuse(
                    plain_facts,
                    None,
                    HANDSHAKE_METHOD,
                    f"TLS handshake failed: {_reason(error)}",
                    event=TLS_HANDSHAKE_EVENT,
                )
                tcp.abort()
                return
            record_handshake(guard.telemetry, guard.service, "server", started, ok=True)
            if tls is None:  # the peer went away as the handshake completed
                return
            if self._verified(tls):
                self._secured = True
                early, self._early = self._early, []
                for chunk in early:
                    super().data_received(chunk)

        def _verified(self, transport: asyncio.Transport) -> bool:
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            tls = _established(ssl_object, self._session_id)
            address = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            try:
                if not der:
                    raise CommonError("no client certificate")
                peer = guard.verifier.verify([der], address)
            except (RevocationError, CommonError) as error:
                # The handshake completed, but the connection is refused as it would have been
                # by a SPIFFE-aware TLS stack: audited as a failed handshake.
                refused = ConnectionFacts(
                    self.client,
                    self.server,
                    replace(tls, handshake=HANDSHAKE_FAILED, subject=_subject_of(der)),
                )
                if isinstance(error, RevocationError):
                    seen, reason = error.peer, str(error)
                else:
                    seen, reason = None, f"invalid X509-SVID: {error}"
                guard.refuse(refused, seen, HANDSHAKE_METHOD, reason, event=TLS_HANDSHAKE_EVENT)
                transport.abort()
                return False
            facts = ConnectionFacts(self.client, self.server, tls)
            self.app = _ConnectionApp(self.app, guard, peer, facts)
            return connections.add(self, transport, peer, facts)

    return MtlsHttpProtocol


def mtls_server_config(
    app: Asgi,
    guard: HttpsGuard,
    tls_context: Callable[[], ssl.SSLContext],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
) -> uvicorn.Config:
    """uvicorn settings for an app that only mutually authenticated, authorized peers reach."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=mtls_protocol(guard, tls_context),
        ws="none",  # WebSocket upgrades would bypass the per-request guard
        # No proxy in front: X-Forwarded-* from a local client must not rewrite who asked.
        proxy_headers=False,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
    )
