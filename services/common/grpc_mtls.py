"""gRPC over mutual TLS with SPIFFE identities (grpcio).

Servers rotate their certificate through ``dynamic_ssl_server_credentials`` (asked on every new
handshake) and authorize every call in ``AuthorizationInterceptor``: the peer's certificate from
the auth context is checked with the X509-SVID rules, the caller's SPIFFE ID against the policy,
and the decision is audited before any servicer code runs.

Revocation: ``PeerVerifier`` runs on every call, so the next call of a revoked peer is refused
(UNAUTHENTICATED "certificate revoked") even on a connection opened before the revocation, and a
peer whose CRL is not fresh is refused with UNAVAILABLE (fail closed).  Server streams are
revocable too: each runs its servicer's iterator in a pump thread while the handler thread waits
for either the next item or a revocation notice, and on a notice the handler thread itself audits
and aborts the call (grpc's ``context.abort`` only works from the handler thread).  grpcio offers
no way to close one client's HTTP/2 connection from Python: a revoked peer's TCP connection stays
open until the client closes it, but no call on it gets past the interceptor.

grpcio client credentials are fixed per channel, so ``MtlsChannel`` (blocking grpcio) and
``AioMtlsChannel`` (grpc.aio, built on the caller's event loop) make a new channel on each
rotation and close the old one after a grace period, letting calls in flight finish.  grpcio
matches the server certificate against a DNS name; ztbank gives each gRPC server's SVID a DNS SAN
with its service name, which only that service's registration entry carries.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, Generic, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common.audit import AuditLog, split_address
from services.common.decisions import submit_decision
from services.common.errors import ChannelClosedError, CommonError
from services.common.identity.source import SvidMaterial, SvidSource
from services.common.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.policy import Policy
from services.common.revocation import (
    RevocationChecker,
    RevocationError,
    RevokedCertificateError,
)
from services.common.telemetry import Telemetry, extract_context, inject_context
from services.common.tls import PeerVerifier

logger = logging.getLogger(__name__)

CHANNEL_GRACE_SECONDS = 30.0
# How often a client asks the registry again where its service is.
DISCOVERY_RECHECK_SECONDS = 5.0
REVOKED_DETAILS = "certificate revoked"
UNAVAILABLE_DETAILS = "revocation status unavailable"
REVOKED_STREAM_REASON = "certificate revoked: stream ended"
ChannelT = TypeVar("ChannelT")


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


class _StreamRevokedError(Exception):
    """Raised in the handler thread when the stream's peer has been revoked."""


_ITEM, _DONE, _FAILED, _REVOKED = "item", "done", "failed", "revoked"


class _RevocableStream:
    """One open server stream whose servicer iterator runs in a pump thread.

    The handler thread (grpc's) waits on a queue for the next item, the end of the iterator, its
    exception, or a revocation notice, whichever comes first; so a stream idle inside its
    servicer still ends promptly when its peer is revoked.  The pump hands over one item at a
    time (it waits until grpc has taken the previous one), keeping grpc's flow control.
    """

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._taken = threading.Semaphore(0)
        self._stopped = threading.Event()

    def revoke(self) -> None:
        self._events.put((_REVOKED, None))

    def run(self, produce: Callable[[], Iterable[Any]]) -> Generator[Any, None, None]:
        """Items of ``produce()``; raise ``_StreamRevokedError`` once revoked.  The pump runs
        in a copy of the caller's context (peer identity, trace span)."""
        context = contextvars.copy_context()
        pump = threading.Thread(
            target=context.run, args=(self._pump, produce), name="grpc-stream-pump", daemon=True
        )
        pump.start()
        try:
            while True:
                kind, value = self._events.get()
                if kind == _ITEM:
                    yield value
                    self._taken.release()
                elif kind == _DONE:
                    return
                elif kind == _FAILED:
                    raise value
                else:
                    raise _StreamRevokedError
        finally:
            self._stopped.set()
            self._taken.release()

    def _pump(self, produce: Callable[[], Iterable[Any]]) -> None:
        iterator: Iterator[Any] | None = None
        try:
            iterator = iter(produce())
            for item in iterator:
                self._events.put((_ITEM, item))
                self._taken.acquire()
                if self._stopped.is_set():
                    return
        except Exception as error:  # context.abort() in the servicer included: re-raised there
            self._events.put((_FAILED, error))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        self._events.put((_DONE, None))


class _LiveStreams:
    """The open server streams of one server, by peer serial, ended on revocation."""

    def __init__(self, revocation: RevocationChecker) -> None:
        self._revocation = revocation
        self._lock = threading.Lock()
        self._streams: set[_RevocableStream] = set()
        revocation.subscribe(self.revoke)

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def open(self, serial: str) -> _RevocableStream:
        stream = _RevocableStream(serial)
        with self._lock:
            self._streams.add(stream)
        # A notice sent between the call's check and this registration is not lost.
        if serial in self._revocation.revoked_serials():
            stream.revoke()
        return stream

    def close(self, stream: _RevocableStream) -> None:
        with self._lock:
            self._streams.discard(stream)

    def revoke(self, serials: frozenset[str]) -> None:
        with self._lock:
            doomed = [stream for stream in self._streams if stream.serial in serials]
        for stream in doomed:
            stream.revoke()


class AuthorizationInterceptor(grpc.ServerInterceptor):
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
        self._audit = audit
        self._telemetry = telemetry
        self._local = split_address(local_address)
        self.streams = _LiveStreams(verifier.revocation)

    def _record(
        self,
        context: grpc.ServicerContext,
        method: str,
        peer: PeerIdentity | None,
        decision: str,
        reason: str,
    ) -> None:
        # grpcio's auth context does not expose the negotiated version or suite. The handler
        # thread waits until the record is on disk (shared with others by group commit).
        submit_decision(
            self._audit,
            self._telemetry,
            service=self._service,
            peer=peer,
            method=method,
            decision=decision,
            reason=reason,
            source=split_address(context.peer()),
            dest=self._local,
        ).result()

    def _authorize(self, method: str, context: grpc.ServicerContext) -> PeerIdentity:
        chain = _leaf_der(context.auth_context())
        if chain is None:
            self._record(context, method, None, "deny", "no client certificate")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client X509-SVID is required")
        try:
            peer = self._verifier.verify(chain, context.peer())
        except RevocationError as error:
            self._record(context, method, error.peer, "deny", str(error))
            if isinstance(error, RevokedCertificateError):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
            context.abort(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_DETAILS)
        except CommonError as error:
            self._record(context, method, None, "deny", f"invalid X509-SVID: {error}")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"invalid X509-SVID: {error}")
        decision = self._policy.decide(self._service, method, peer.spiffe_id)
        self._record(
            context, method, peer, "allow" if decision.allowed else "deny", decision.reason
        )
        if not decision.allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, decision.reason)
        return peer

    @contextmanager
    def _call_scope(self, method: str, context: grpc.ServicerContext) -> Iterator[PeerIdentity]:
        """Trace span from the caller's context, then authorization, then the identity."""
        attached = otel_context.attach(extract_context(context.invocation_metadata()))
        try:
            with self._telemetry.tracer.start_as_current_span(
                method, kind=trace.SpanKind.SERVER, attributes={"rpc.system": "grpc"}
            ):
                peer = self._authorize(method, context)
                token = set_current_peer(peer)
                try:
                    yield peer
                finally:
                    reset_current_peer(token)
        finally:
            otel_context.detach(attached)

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            with self._call_scope(method, context):
                return behaviour(request, context)

        return handle

    def _streaming(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._call_scope(method, context) as peer:
                stream = self.streams.open(peer.serial)
                try:
                    yield from stream.run(lambda: behaviour(request, context))
                except _StreamRevokedError:
                    self._record(context, method, peer, "deny", REVOKED_STREAM_REASON)
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, REVOKED_DETAILS)
                finally:
                    self.streams.close(stream)

        return handle

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(details)
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


class _TracePropagation(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        metadata = list(details.metadata or []) + inject_context()
        return continuation(details._replace(metadata=metadata), request)


class _AioTracePropagation(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
    ) -> Any:
        metadata = list(details.metadata or []) + inject_context()
        return await continuation(details._replace(metadata=metadata), request)


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


class _FollowingChannel(Generic[ChannelT]):
    """A client channel to a gRPC service, rebuilt when our SVID rotates or the service moves.

    ``resolve`` answers the service's current address (host:port) from the registry: the file
    of the native stack, or Consul's passing instances.  It is asked again every
    ``recheck_seconds``; a new address gets a new channel, and calls in flight finish on the old
    one.  When the registry cannot answer, the channel stays where it is: discovery decides
    where to call, mTLS and the peer's SPIFFE ID decide whether to trust it.

    The channel is built on the first ``channel()`` after a change, in the caller's thread:
    a grpc.aio channel belongs to the event loop that uses it.
    """

    def __init__(
        self,
        source: SvidSource,
        resolve: Callable[[], str],
        server_name: str,
        *,
        recheck_seconds: float = DISCOVERY_RECHECK_SECONDS,
    ) -> None:
        self._resolve = resolve
        self._server_name = server_name
        self._lock = threading.Lock()
        self._material = source.current()
        self._target = resolve()
        self._channel: ChannelT | None = None
        self._current = False
        self._closed = False
        self._stop = threading.Event()
        source.subscribe(self._rotate)
        watcher = threading.Thread(
            target=self._watch,
            args=(recheck_seconds,),
            name=f"discovery-{server_name}",
            daemon=True,
        )
        watcher.start()

    @property
    def target(self) -> str:
        with self._lock:
            return self._target

    def _build(self, material: SvidMaterial, target: str) -> ChannelT:
        raise NotImplementedError

    def _retire(self, stale: ChannelT) -> None:
        """Close ``stale`` once calls in flight on it had ``CHANNEL_GRACE_SECONDS``."""
        raise NotImplementedError

    def _rotate(self, material: SvidMaterial) -> None:
        self._replace(material=material)

    def _watch(self, recheck_seconds: float) -> None:
        while not self._stop.wait(recheck_seconds):
            try:
                target = self._resolve()
            except CommonError as error:
                logger.warning("%s stays at %s: %s", self._server_name, self.target, error)
                continue
            if target != self.target:
                logger.info("%s moved from %s to %s", self._server_name, self.target, target)
                self._replace(target=target)

    def _replace(self, *, material: SvidMaterial | None = None, target: str | None = None) -> None:
        with self._lock:
            self._material = material or self._material
            self._target = target or self._target
            self._current = False

    def channel(self) -> ChannelT:
        with self._lock:
            if self._closed:
                raise ChannelClosedError(f"the channel to {self._server_name} is closed")
            stale = None
            if not self._current or self._channel is None:
                # Channels connect lazily: building one under the lock is cheap.
                stale, self._channel = self._channel, self._build(self._material, self._target)
                self._current = True
            channel = self._channel
        if stale is not None:
            self._retire(stale)
        return channel

    def _close(self) -> ChannelT | None:
        self._stop.set()
        with self._lock:
            self._closed = True
            channel, self._channel = self._channel, None
        return channel


class MtlsChannel(_FollowingChannel[grpc.Channel]):
    """A grpcio (blocking) channel that follows rotation and discovery."""

    def _replace(self, *, material: SvidMaterial | None = None, target: str | None = None) -> None:
        super()._replace(material=material, target=target)
        # Built at once, so the stale channel is closed after the grace even if no call comes.
        with suppress(ChannelClosedError):
            self.channel()

    def _build(self, material: SvidMaterial, target: str) -> grpc.Channel:
        channel = grpc.secure_channel(
            target, _client_credentials(material), options=_channel_options(self._server_name)
        )
        return grpc.intercept_channel(channel, _TracePropagation())

    def _retire(self, stale: grpc.Channel) -> None:
        timer = threading.Timer(CHANNEL_GRACE_SECONDS, stale.close)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        channel = self._close()
        if channel is not None:
            channel.close()


class AioMtlsChannel(_FollowingChannel[grpc.aio.Channel]):
    """A grpc.aio channel that follows rotation and discovery; ``channel()`` is called on the
    event loop that makes the calls, and ``aclose()`` there too."""

    def __init__(
        self,
        source: SvidSource,
        resolve: Callable[[], str],
        server_name: str,
        *,
        recheck_seconds: float = DISCOVERY_RECHECK_SECONDS,
    ) -> None:
        super().__init__(source, resolve, server_name, recheck_seconds=recheck_seconds)
        self._closing: set[asyncio.Task[None]] = set()

    def _build(self, material: SvidMaterial, target: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            target,
            _client_credentials(material),
            options=_channel_options(self._server_name),
            interceptors=[_AioTracePropagation()],
        )

    def _retire(self, stale: grpc.aio.Channel) -> None:
        # close(grace) lets calls in flight finish, then cancels what is left.
        task = asyncio.get_running_loop().create_task(stale.close(CHANNEL_GRACE_SECONDS))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        channel = self._close()
        if channel is not None:
            await channel.close()
        for task in list(self._closing):
            task.cancel()
