"""gRPC over mutual TLS with SPIFFE identities (grpc.aio servers and clients).

Servers rotate their certificate through ``dynamic_ssl_server_credentials`` (asked on every new
handshake) and authorize every call in ``AuthorizationInterceptor``: the peer's certificate from
the auth context is checked with the X509-SVID rules, the caller's SPIFFE ID against the policy,
and the decision is audited before any servicer code runs.

Revocation: ``PeerVerifier`` runs on every call, so the next call of a revoked peer is refused
(UNAUTHENTICATED "certificate revoked") even on a connection opened before the revocation, and a
peer whose CRL is not fresh is refused with UNAVAILABLE (fail closed).  Server streams are
revocable too: the servicer's answer is produced in its own task while the call waits for it or
for a revocation notice (sent from the watcher's thread onto the loop), and on a notice the call
cancels the servicer, audits and aborts.  grpcio offers no way to close one client's HTTP/2
connection from Python: a revoked peer's TCP connection stays open until the client closes it,
but no call on it gets past the interceptor.

grpcio client credentials are fixed per channel, so ``MtlsChannel`` (grpc.aio, built on the
caller's event loop) makes a new channel on each rotation and closes the old one after a grace
period, letting calls in flight finish.  grpcio
matches the server certificate against a DNS name; ztbank gives each gRPC server's SVID a DNS SAN
with its service name, which only that service's registration entry carries.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn, Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.authz.audit import AuditLog, AuditWriteError, split_address
from services.common.authz.decisions import (
    REFUSAL_EVENT,
    ConnectionFacts,
    DecisionRecorder,
    TlsFacts,
)
from services.common.authz.policy import Policy
from services.common.errors import ChannelClosedError, CommonError
from services.common.identity.source import SvidMaterial, SvidSource
from services.common.mtls.contexts import PeerVerifier
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.observability.telemetry import Telemetry, extract_context
from services.common.revocation import (
    RevocationChecker,
    RevocationError,
    RevokedCertificateError,
)
from services.common.runtime.worker import Worker

logger = logging.getLogger(__name__)

CHANNEL_GRACE_SECONDS = 30.0
# How often a client asks the registry again where its service is.
DISCOVERY_RECHECK_SECONDS = 5.0
REVOKED_DETAILS = "certificate revoked"
UNAVAILABLE_DETAILS = "revocation status unavailable"
REVOKED_STREAM_REASON = "certificate revoked: stream ended"
# A servicer's own refusals of a call the policy allowed, each audited with its detail.
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)


def _server_config(material: SvidMaterial) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.key_pem, material.chain_pem)], root_certificates=material.bundle_pem
    )


def server_credentials(source: SvidSource) -> grpc.ServerCredentials:
    """Credentials that follow the SVID source; clients must present a certificate."""
    initial = source.current()
    served = [(initial.serial, initial.bundle_pem)]
    lock = threading.Lock()

    def fetch() -> Any:
        material = source.current()
        with lock:
            if (material.serial, material.bundle_pem) == served[0]:
                return None
            served[0] = (material.serial, material.bundle_pem)
        logger.info("serving new X509-SVID %s", material.serial)
        return _server_config(material)

    return grpc.dynamic_ssl_server_credentials(
        _server_config(initial), fetch, require_client_authentication=True
    )


def _first(auth: Mapping[str, Any], key: str) -> bytes | None:
    values = auth.get(key)
    return values[0] if values else None


@functools.lru_cache(maxsize=1024)
def _tls_facts(version: bytes | None, sni: bytes | None, subject: bytes | None) -> TlsFacts:
    # One object per connection's facts, not one per call.
    return TlsFacts(
        version=version.decode() if version else None,
        sni=sni.decode() if sni else None,
        subject=subject.decode() if subject else None,
    )


def _grpc_tls_facts(auth: Mapping[str, Any]) -> TlsFacts:
    """What grpcio's auth context tells of the connection: the TLS version, the SNI and the
    subject, but no cipher suite, ALPN or connection ID.  A handshake the C core refuses never
    reaches Python: gRPC servers audit calls, not refused handshakes."""
    return _tls_facts(
        _first(auth, "ssl_tls_version"),
        _first(auth, "ssl_requested_server_name"),
        _first(auth, "x509_subject"),
    )


def _leaf_der(auth: Mapping[str, Any]) -> list[bytes] | None:
    # grpcio returns a dict of lists of bytes, although its stubs say otherwise.
    pems = auth.get("x509_pem_cert")
    if not pems:
        return None
    der = _pem_to_der(pems[0])
    return [der] if der is not None else None


@functools.lru_cache(maxsize=1024)
def _pem_to_der(pem: bytes) -> bytes | None:
    """The same peer presents the same PEM on every call of a connection: convert it once."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return certificate.public_bytes(serialization.Encoding.DER)


class _OpenStream:
    """One open server stream of a peer; ``revoke`` may be called from any thread."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self._loop = asyncio.get_running_loop()
        self.revoked = asyncio.Event()

    def revoke(self) -> None:
        self._loop.call_soon_threadsafe(self.revoked.set)


class _LiveStreams:
    """The open server streams of one server, by peer serial, ended on revocation."""

    def __init__(self, revocation: RevocationChecker) -> None:
        self._revocation = revocation
        self._lock = threading.Lock()
        self._streams: set[_OpenStream] = set()
        revocation.subscribe(self.revoke)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def open(self, serial: str) -> _OpenStream:
        """Called on the server's event loop."""
        stream = _OpenStream(serial)
        with self._lock:
            self._streams.add(stream)
        # A notice sent between the call's check and this registration is not lost.
        if serial in self._revocation.revoked_serials():
            stream.revoke()
        return stream

    def close(self, stream: _OpenStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def revoke(self, serials: frozenset[str]) -> None:
        with self._lock:
            doomed = [stream for stream in self._streams if stream.serial in serials]
        for stream in doomed:
            stream.revoke()


async def _produce(result: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Runs a streaming servicer's answer: an async or plain iterator is written item by item
    (one write at a time keeps grpc's flow control); a coroutine writes for itself."""
    if hasattr(result, "__aiter__"):
        try:
            async for item in result:
                await context.write(item)
        finally:
            # Cancelled during a write, the generator would wait for the GC to run its cleanup.
            close = getattr(result, "aclose", None)
            if close is not None:
                await close()
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            await context.write(item)


class AbortingContext(Protocol):
    """The part of ``grpc.aio.ServicerContext`` a servicer needs to refuse a call: what the
    servicers take, so their tests can hand them a stand-in."""

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> NoReturn: ...


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio: verify, decide, audit (awaited until on disk), then the servicer."""

    def __init__(
        self,
        *,
        service: str,
        verifier: PeerVerifier,
        policy: Policy,
        audit: AuditLog,
        telemetry: Telemetry,
        local_address: str,
    ) -> None:
        self._service = service
        self._verifier = verifier
        self._policy = policy
        self._decisions = DecisionRecorder(service, audit, telemetry)
        self._telemetry = telemetry
        self._local = split_address(local_address)
        self.streams = _LiveStreams(verifier.revocation)

    async def _record(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        peer: PeerIdentity | None,
        decision: str,
        reason: str,
        *,
        tls: TlsFacts,
    ) -> None:
        # The call waits until the record is on disk (shared with others by group commit).
        connection = ConnectionFacts(split_address(context.peer()), self._local, tls)
        try:
            await asyncio.wrap_future(
                self._decisions.submit(connection, peer, method, decision, reason)
            )
        except AuditWriteError as error:
            # Nothing is served unaudited: refused with the cause, no traceback for a full disk.
            logger.warning("%s: refused %s: %s", self._service, method, error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    async def _authorize(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> PeerIdentity:
        auth = context.auth_context()
        tls = _grpc_tls_facts(auth)
        chain = _leaf_der(auth)
        if chain is None:
            await self._record(context, method, None, "deny", "no client certificate", tls=tls)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client X509-SVID is required")
        try:
            peer = self._verifier.verify(chain, context.peer())
        except RevocationError as error:
            await self._record(context, method, error.peer, "deny", str(error), tls=tls)
            if isinstance(error, RevokedCertificateError):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
            await context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_DETAILS)
        except CommonError as error:
            reason = f"invalid X509-SVID: {error}"
            await self._record(context, method, None, "deny", reason, tls=tls)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid X509-SVID: {error}")
        decision = self._policy.decide(self._service, method, peer.spiffe_id)
        await self._record(
            context, method, peer, "allow" if decision.allowed else "deny", decision.reason, tls=tls
        )
        if not decision.allowed:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        return peer

    @asynccontextmanager
    async def _call_scope(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[PeerIdentity]:
        """Trace span from the caller's context, then authorization, then the identity.  Each
        call runs in its own task, so the context variables are the call's own."""
        attached = otel_context.attach(extract_context(context.invocation_metadata() or ()))
        try:
            with self._telemetry.tracer.start_as_current_span(
                method, kind=trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"}
            ):
                peer = await self._authorize(method, context)
                token = set_current_peer(peer)
                try:
                    yield peer
                finally:
                    reset_current_peer(token)
        finally:
            otel_context.detach(attached)

    async def _record_refusal(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, peer: PeerIdentity
    ) -> None:
        """The servicer's own refusal of a call the policy allowed, audited with its status and
        detail; the call has been answered already, so a record that fails is only said."""
        code = context.code()
        if code not in REFUSAL_CODES:
            return
        reason = f"refused by the service: {code.name} {context.details()}"
        connection = ConnectionFacts(
            split_address(context.peer()), self._local, _grpc_tls_facts(context.auth_context())
        )
        submitted = self._decisions.submit(
            connection, peer, method, "deny", reason, event=REFUSAL_EVENT
        )
        try:
            await asyncio.wrap_future(submitted)
        except AuditWriteError as error:
            logger.warning("%s: refusal of %s unaudited: %s", self._service, method, error)

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            async with self._call_scope(method, context) as peer:
                try:
                    result = behaviour(request, context)
                    return await result if inspect.isawaitable(result) else result
                except grpc.aio.AbortError:
                    await self._record_refusal(context, method, peer)
                    raise

        return handle

    def _streaming(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            async with self._call_scope(method, context) as peer:
                stream = self.streams.open(peer.serial)
                producing = asyncio.ensure_future(_produce(behaviour(request, context), context))
                revoked = asyncio.ensure_future(stream.revoked.wait())
                try:
                    # A stream idle inside its servicer ends too: the notice wakes this wait.
                    await asyncio.wait({producing, revoked}, return_when=asyncio.FIRST_COMPLETED)
                    if producing.done():
                        producing.result()  # the servicer's own status (abort) included
                        return
                    producing.cancel()
                    tls = _grpc_tls_facts(context.auth_context())
                    await self._record(
                        context, method, peer, "deny", REVOKED_STREAM_REASON, tls=tls
                    )
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
                finally:
                    producing.cancel()
                    revoked.cancel()
                    self.streams.close(stream)

        return handle

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # ztbank serves no client-streaming methods: refuse rather than run unauthorized.
        return None


# How a channel reports its connection: when it began (``time.perf_counter()``) and whether it
# ended READY.
ConnectReport = Callable[[float, bool], None]
_CONNECT_OUTCOMES = frozenset(
    {grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE}
)


async def _report_first_connect(
    channel: grpc.aio.Channel, started: float, report: ConnectReport
) -> None:
    """Time ``channel``'s first connection, from its creation to READY or TRANSIENT_FAILURE.

    grpcio exposes no handshake timing to Python: this is the TLS handshake plus the TCP
    connect and the HTTP/2 preface.  A channel is made for the first call and after each
    rotation or move, so every new SVID's first handshake is timed; grpcio's own reconnects
    within one channel are not (its state changes can pass faster than Python observes them).
    """
    state = channel.get_state(try_to_connect=True)
    while state not in _CONNECT_OUTCOMES:
        if state is grpc.ChannelConnectivity.SHUTDOWN:
            return
        await channel.wait_for_state_change(state)
        state = channel.get_state()
    report(started, state is grpc.ChannelConnectivity.READY)


def _client_credentials(material: SvidMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.bundle_pem,
        private_key=material.key_pem,
        certificate_chain=material.chain_pem,
    )


def _channel_options(server_name: str) -> list[tuple[str, Any]]:
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
    ]


class _DiscoveryWatch(Worker):
    """Asks the registry again where a channel's service is, every ``recheck_seconds``, and
    hands a new address to ``move``.  The channel resolved the first address itself when it was
    made, so the first look comes one interval after the start."""

    def __init__(
        self,
        server_name: str,
        resolve: Callable[[], str],
        current: Callable[[], str],
        move: Callable[[str], None],
        recheck_seconds: float,
    ) -> None:
        super().__init__(f"discovery-{server_name}", wait_first=True)
        self._server_name = server_name
        self._resolve = resolve
        self._current = current
        self._move = move
        self._recheck_seconds = recheck_seconds

    def interval(self) -> float:
        return self._recheck_seconds

    def run_once(self) -> None:
        try:
            target = self._resolve()
        except CommonError as error:
            logger.warning("%s stays at %s: %s", self._server_name, self._current(), error)
            return
        current = self._current()
        if target != current:
            logger.info("%s moved from %s to %s", self._server_name, current, target)
            self._move(target)


class MtlsChannel:
    """A grpc.aio client channel to a gRPC service, rebuilt when our SVID rotates or the
    service moves.

    ``resolve`` answers the service's current address (host:port) from the registry: the file
    of the native stack, or Consul's passing instances.  It is asked again every
    ``recheck_seconds``; a new address gets a new channel, and calls in flight finish on the old
    one.  When the registry cannot answer, the channel stays where it is: discovery decides
    where to call, mTLS and the peer's SPIFFE ID decide whether to trust it.  The asking runs in
    a ``Worker`` thread, which ``aclose()`` stops and joins.

    A grpc.aio channel belongs to the event loop that uses it: ``channel()`` (which builds the
    channel on its first call after a change) and ``aclose()`` are called on that loop.  Callers
    pass ``telemetry.inject_context()`` as each call's metadata (a grpc.aio client interceptor
    for it cost 7% of the gateway's time).
    """

    def __init__(
        self,
        source: SvidSource,
        resolve: Callable[[], str],
        server_name: str,
        *,
        recheck_seconds: float = DISCOVERY_RECHECK_SECONDS,
        on_connect: ConnectReport | None = None,
    ) -> None:
        self._on_connect = on_connect
        self._tracking: set[asyncio.Task[None]] = set()
        self._server_name = server_name
        self._lock = threading.Lock()
        self._material = source.current()
        self._target = resolve()
        self._channel: grpc.aio.Channel | None = None
        self._current = False
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        source.subscribe(self._rotate)
        self._discovery = _DiscoveryWatch(
            server_name,
            resolve,
            lambda: self.target,
            lambda target: self._replace(target=target),
            recheck_seconds,
        ).start()

    @property
    def target(self) -> str:
        with self._lock:
            return self._target

    def _rotate(self, material: SvidMaterial) -> None:
        self._replace(material=material)

    def _replace(self, *, material: SvidMaterial | None = None, target: str | None = None) -> None:
        # From the SVID source's or the watcher's thread: the loop builds on its next call.
        with self._lock:
            self._material = material or self._material
            self._target = target or self._target
            self._current = False

    def channel(self) -> grpc.aio.Channel:
        with self._lock:
            if self._closed:
                raise ChannelClosedError(f"the channel to {self._server_name} is closed")
            stale = built = None
            if not self._current or self._channel is None:
                # Channels connect lazily: building one under the lock is cheap.
                stale, self._channel = self._channel, self._build(self._material, self._target)
                self._current = True
                built = self._channel
            channel = self._channel
        if built is not None and self._on_connect is not None:
            tracking = asyncio.get_running_loop().create_task(
                _report_first_connect(built, time.perf_counter(), self._on_connect)
            )
            self._tracking.add(tracking)
            tracking.add_done_callback(self._tracking.discard)
        if stale is not None:
            # close(grace) lets calls in flight finish, then cancels what is left.
            task = asyncio.get_running_loop().create_task(stale.close(CHANNEL_GRACE_SECONDS))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return channel

    def _build(self, material: SvidMaterial, target: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            target,
            _client_credentials(material),
            options=_channel_options(self._server_name),
        )

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()
        for task in [*self._closing, *self._tracking]:
            task.cancel()
        # The watcher may be in the middle of a registry lookup: join it off the event loop.
        await asyncio.to_thread(self._discovery.close)
