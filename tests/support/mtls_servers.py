"""The mTLS runtime on real sockets, for the integration tests: SVIDs from the test PKI, a fake
SVID source, and gRPC and HTTPS servers on 127.0.0.1 built the way the services build them.

Used by tests/integration/test_mtls_runtime.py and tests/integration/
test_revocation_enforcement.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpc_health.v1 import health, health_pb2_grpc

from services.common.authz.audit import AuditLog
from services.common.authz.policy import Policy
from services.common.identity.source import Listener, SvidMaterial, SvidSource
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier, ReloadingContext, SvidFiles
from services.common.mtls.grpc import AuthorizationInterceptor, server_credentials
from services.common.mtls.https import (
    DEFAULT_MAX_IN_FLIGHT,
    HttpsGuard,
    InFlight,
    Receive,
    Scope,
    Send,
    mtls_server_config,
)
from services.common.mtls.peer import current_peer
from services.common.observability.telemetry import Telemetry
from services.common.revocation import RevocationWatcher
from services.stack.sandbox import free_port
from tests.support.pki import Issued, create_intermediate_ca, create_leaf, create_root_ca

TD = "ztbank.example"
TELLER_ID = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/teller"
GATEWAY_ID = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/gateway"
ENGINE_ID = f"spiffe://{TD}/env/prod/zone/az1/team/payments/svc/transfer-engine"
RISK_ID = f"spiffe://{TD}/env/prod/zone/az1/team/risk/svc/risk"
ECHO_SERVICE = "ztbank.test.v1.Echo"
ECHO = f"/{ECHO_SERVICE}/Echo"
TIMEOUT = 5.0

# A method handler of the test servers (they speak raw bytes).
GrpcHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


# -- identities ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    root: Issued
    signing_ca: Issued

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        certificates = (self.root.certificate, self.signing_ca.certificate)
        return tuple(sorted(certificates, key=lambda c: c.fingerprint(hashes.SHA256())))

    def svid(
        self,
        spiffe_id: str,
        *,
        dns: tuple[str, ...] = (),
        trusted: tuple[x509.Certificate, ...] | None = None,
    ) -> SvidMaterial:
        """An SVID for ``spiffe_id``; ``trusted`` replaces the bundle (what the holder trusts)."""
        leaf = create_leaf(self.signing_ca, uri_sans=[spiffe_id], dns_sans=dns)
        return SvidMaterial(
            spiffe_id=SpiffeId.parse(spiffe_id),
            chain=(leaf.certificate, self.signing_ca.certificate),
            key=leaf.key,
            bundle=self.bundle if trusted is None else trusted,
        )


def new_authority(common_name: str) -> Authority:
    root = create_root_ca(common_name=f"{common_name} root")
    return Authority(root, create_intermediate_ca(root, common_name=f"{common_name} signing CA"))


class FakeSource(SvidSource):
    """What ``SvidSource`` offers the TLS layers, fed by hand instead of the Workload API."""

    def __init__(self, material: SvidMaterial) -> None:  # no Workload API
        self._material = material
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def publish(self, material: SvidMaterial) -> None:
        """A rotation: the new SVID becomes current, then every listener hears of it."""
        with self._lock:
            self._material = material
            listeners = list(self._listeners)
        for listener in listeners:
            listener(material)

    def close(self) -> None:
        pass


# -- policy and audit ----------------------------------------------------------------------


def write_policy(path: Path) -> Path:
    rules = [
        {"service": "gateway", "methods": ["* /v1/*"], "callers": [TELLER_ID]},
        {"service": "risk", "methods": [f"/{ECHO_SERVICE}/*"], "callers": [ENGINE_ID]},
    ]
    path.write_text(json.dumps({"rules": rules}))
    return path


def server_policy(directory: Path) -> Policy:
    """The policy of the test servers: tellers on the gateway, the engine on risk's Echo."""
    return Policy(write_policy(directory / "policy.json"), TD)


def audit_log(directory: Path) -> Iterator[AuditLog]:
    """An audit log in ``directory``, closed afterwards (a fixture body: ``yield from``)."""
    log = AuditLog(directory / "audit.jsonl", fsync=False)
    yield log
    log.close()


def audit_records(log: AuditLog) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.path.read_text().splitlines()]


# -- gRPC ------------------------------------------------------------------------------------


def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Answers with what the servicer sees as the verified caller."""
    return request + b" from " + str(current_peer().spiffe_id).encode()


@dataclass
class RunningGrpc:
    port: int
    interceptor: AuthorizationInterceptor


@dataclass
class GrpcTestServer:
    """What a test of a running gRPC server holds: where it listens and what it audits."""

    port: int
    audit: AuditLog

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextmanager
def running_grpc_server(
    source: FakeSource,
    *,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    revocation: RevocationWatcher,
    handlers: Mapping[str, GrpcHandler],
) -> Iterator[RunningGrpc]:
    """The risk service's server (grpc.aio, on an event loop in its own thread): the
    authorization interceptor, health, and ``handlers`` of the ``ECHO_SERVICE``; stopped
    afterwards."""
    port = free_port()
    interceptor = AuthorizationInterceptor(
        service="risk",
        verifier=PeerVerifier(source.current, TD, revocation=revocation),
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        local_address=f"127.0.0.1:{port}",
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-server", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
        server = grpc.aio.server(interceptors=[interceptor])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, dict(handlers)),)
        )
        assert server.add_secure_port(f"127.0.0.1:{port}", server_credentials(source)) == port
        await server.start()
        return server, health_servicer

    async def stop(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        await health_servicer.enter_graceful_shutdown()  # ends open Health.Watch streams
        await server.stop(grace=None)

    try:
        server, health_servicer = asyncio.run_coroutine_threadsafe(start(), loop).result(TIMEOUT)
        try:
            yield RunningGrpc(port, interceptor)
        finally:
            asyncio.run_coroutine_threadsafe(stop(server, health_servicer), loop).result(TIMEOUT)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        loop.close()


@contextmanager
def mtls_clients(target: str) -> Iterator[Callable[[SvidMaterial], grpc.Channel]]:
    """Makes blocking grpcio clients of ``target`` that present an SVID and expect the server's
    DNS SAN "risk" (as services' channels do); closed afterwards."""
    made: list[grpc.Channel] = []

    def make(material: SvidMaterial) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=material.bundle_pem,
            private_key=material.key_pem,
            certificate_chain=material.chain_pem,
        )
        channel = grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", "risk")]
        )
        made.append(channel)
        return channel

    try:
        yield make
    finally:
        for channel in made:
            channel.close()


def call_echo(channel: grpc.Channel, payload: bytes = b"ping") -> bytes:
    method: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO)
    return method(payload, timeout=TIMEOUT)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- HTTPS -----------------------------------------------------------------------------------


SLOW_PATH = "/v1/slow"
SLOW_SECONDS = 1.5


class WhoAmI:
    """The application: reports the verified peer it was handed, and notes every scope and the
    client address it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.clients: list[Any] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append((scope["type"], scope["path"]))
        self.clients.append(scope.get("client"))
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["path"] == SLOW_PATH:
            await asyncio.sleep(SLOW_SECONDS)  # a request that keeps its place for a while
        peer = current_peer()
        body = json.dumps(
            {"spiffe_id": str(peer.spiffe_id), "serial": peer.serial, "path": scope["path"]}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass
class RunningHttps:
    port: int
    app: WhoAmI
    live: Any  # the protocol's LiveConnections


@contextmanager
def running_https_server(
    source: FakeSource,
    *,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    revocation: RevocationWatcher,
    tls_dir: Path,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> Iterator[RunningHttps]:
    """The gateway's uvicorn server serving ``WhoAmI``; shut down afterwards."""
    tls = ReloadingContext(source, SvidFiles(tls_dir), server=True)
    guard = HttpsGuard(
        service="gateway",
        verifier=PeerVerifier(source.current, TD, revocation=revocation),
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        in_flight=InFlight(max_in_flight),
    )
    app = WhoAmI()
    # The same configuration as services/gateway/server.py.
    config = mtls_server_config(app, guard, lambda: tls.context)
    server = uvicorn.Server(config)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during startup"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield RunningHttps(port, app, config.http.live)  # type: ignore[union-attr]
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        listener.close()
    # Refused connections must not linger in uvicorn's connection set (shutdown waits on it).
    assert not thread.is_alive(), "uvicorn did not shut down"


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def https_get(port: int, context: ssl.SSLContext, path: str = "/v1/accounts") -> Reply:
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return Reply(response.status, response.getheader("content-type", ""), response.read())
    finally:
        connection.close()


def refusal(port: int, context: ssl.SSLContext) -> ssl.SSLError | ConnectionError:
    """The error of a request that must not get through (RemoteDisconnected is a
    ConnectionError: with TLS 1.3 the client's side of the handshake ends before the server
    has judged its certificate)."""
    with pytest.raises((ssl.SSLError, ConnectionError)) as caught:
        https_get(port, context)
    error = caught.value
    assert isinstance(error, ssl.SSLError | ConnectionError)
    return error
