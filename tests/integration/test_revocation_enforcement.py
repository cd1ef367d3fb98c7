"""Revocation on real sockets: the issuer's ``/crls`` is played by a local HTTP server serving
CRLs built here, and gRPC and HTTPS servers on 127.0.0.1 enforce them.

What is shown: a revoked peer's new handshakes (HTTPS) and calls (gRPC) are refused and audited;
its open HTTPS connections and open gRPC server streams are closed within the polling interval;
a resumed TLS 1.2 session does not let it back in; without a fresh CRL new connections fail
closed and come back as soon as the issuer does, without a restart; the metrics say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader

from services.common.authz.audit import AuditLog
from services.common.authz.policy import Policy
from services.common.identity.source import SvidMaterial
from services.common.mtls.contexts import client_context
from services.common.mtls.grpc import (
    REVOKED_DETAILS,
    REVOKED_STREAM_REASON,
    UNAVAILABLE_DETAILS,
    AuthorizationInterceptor,
)
from services.common.mtls.https import CONNECTION_METHOD, REVOKED_CONNECTION_REASON
from services.common.mtls.peer import current_peer
from services.common.observability.telemetry import Telemetry, setup_telemetry
from services.common.revocation import RevocationWatcher
from tests.support import mtls_servers as servers
from tests.support.crl import CRL_VALIDITY, Clock, CrlServer, build_crl, crl_server, wait_for
from tests.support.mtls_servers import (
    ECHO,
    ECHO_SERVICE,
    ENGINE_ID,
    GATEWAY_ID,
    RISK_ID,
    TELLER_ID,
    TIMEOUT,
    Authority,
    FakeSource,
    GrpcHandler,
    GrpcTestServer,
    WhoAmI,
    audit_records,
    call_echo,
    https_get,
    new_authority,
    refusal,
    rpc_error,
)

pytestmark = pytest.mark.integration

# The watchers poll this often here; production polls every 0.5 s.
INTERVAL = 0.1
# How long a reaction to a revocation may take in these tests: a poll plus generous slack.
REACTION = 2.0
TICKS = f"/{ECHO_SERVICE}/Ticks"
ABORTING = f"/{ECHO_SERVICE}/Aborting"


@pytest.fixture(scope="module")
def authority() -> Authority:
    return new_authority("ztbank revocation test")


class Issuer:
    """The issuer's revocation side: one signing CA's CRL, republished on each change."""

    def __init__(self, server: CrlServer, authority: Authority, clock: Clock) -> None:
        self.server = server
        self._authority = authority
        self._clock = clock
        self._number = 0
        self._revoked: list[x509.Certificate] = []

    @property
    def url(self) -> str:
        return self.server.url

    def publish(self, validity: timedelta = CRL_VALIDITY) -> None:
        """A new CRL, current by the watchers' clock, listing every revoked certificate."""
        self._number += 1
        self.server.publish(
            build_crl(
                self._authority.signing_ca,
                self._revoked,
                number=self._number,
                this_update=self._clock(),
                validity=validity,
            )
        )

    def revoke(self, material: SvidMaterial) -> None:
        self._revoked.append(material.leaf)
        self.publish()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def issuer(authority: Authority, clock: Clock) -> Iterator[Issuer]:
    with crl_server() as server:
        issuer = Issuer(server, authority, clock)
        issuer.publish()
        yield issuer


@pytest.fixture
def watcher(issuer: Issuer, authority: Authority, clock: Clock) -> Iterator[RevocationWatcher]:
    """What ``create_runtime`` builds, polling every ``INTERVAL`` seconds."""
    revocation = RevocationWatcher(
        issuer.url, lambda: authority.bundle, interval=INTERVAL, clock=clock
    )
    revocation.start()
    revocation.wait_ready(TIMEOUT)
    yield revocation
    revocation.close()


# Revokes an SVID at the issuer, once the watcher knows: the monotonic time it was published.
Revoke = Callable[[SvidMaterial], float]


@pytest.fixture
def revoke(issuer: Issuer, watcher: RevocationWatcher) -> Revoke:
    def revoke(material: SvidMaterial) -> float:
        published = time.monotonic()
        issuer.revoke(material)
        assert wait_for(lambda: material.serial in watcher.revoked_serials(), TIMEOUT)
        return published

    return revoke


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return servers.server_policy(tmp_path)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    yield from servers.audit_log(tmp_path)


@dataclass
class Metrics:
    reader: InMemoryMetricReader

    def gauge(self, name: str) -> float | None:
        data = self.reader.get_metrics_data()
        if data is None:
            return None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name and isinstance(metric.data, Gauge):
                        points = list(metric.data.data_points)
                        return float(points[-1].value) if points else None
        return None


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(InMemoryMetricReader())


@pytest.fixture
def telemetry(tmp_path: Path, watcher: RevocationWatcher, metrics: Metrics) -> Iterator[Telemetry]:
    instance = setup_telemetry(
        "revocation-test",
        metrics_port=None,
        spans_path=tmp_path / "spans.jsonl",
        revocation=watcher,
        metric_readers=[metrics.reader],
    )
    yield instance
    instance.shutdown()


def deny_records(log: AuditLog) -> list[dict[str, Any]]:
    return [r for r in audit_records(log) if r["decision"] == "deny"]


def records_soon(log: AuditLog, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first audit record matching ``predicate``, waiting for it a little."""
    found: list[dict[str, Any]] = []

    def seen() -> bool:
        found[:] = [r for r in audit_records(log) if predicate(r)]
        return bool(found)

    assert wait_for(seen, TIMEOUT), f"no such audit record in {audit_records(log)}"
    return found[0]


# -- gRPC ------------------------------------------------------------------------------------


@dataclass
class Ticker:
    """A streaming servicer that yields every 20 ms until the call ends; notes its cleanup."""

    started: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    callers: list[str] = field(default_factory=list)

    async def __call__(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        self.callers.append(str(current_peer().spiffe_id))  # the call's own identity
        self.started.set()
        try:
            count = 0
            while True:
                yield request + b" %d" % count
                count += 1
                await asyncio.sleep(0.02)
        finally:
            self.finished.set()


async def aborting(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    yield b"first"
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such account")


@dataclass
class GrpcServer(GrpcTestServer):
    ticker: Ticker
    interceptor: AuthorizationInterceptor


@pytest.fixture
def grpc_server(
    authority: Authority,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    watcher: RevocationWatcher,
) -> Iterator[GrpcServer]:
    ticker = Ticker()
    handlers: dict[str, GrpcHandler] = {
        "Echo": grpc.unary_unary_rpc_method_handler(servers.echo),
        "Ticks": grpc.unary_stream_rpc_method_handler(ticker),
        "Aborting": grpc.unary_stream_rpc_method_handler(aborting),
    }
    with servers.running_grpc_server(
        FakeSource(authority.svid(RISK_ID, dns=("risk",))),
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        revocation=watcher,
        handlers=handlers,
    ) as running:
        yield GrpcServer(
            port=running.port, audit=audit, ticker=ticker, interceptor=running.interceptor
        )


# Makes a client of the test server with an SVID: its (current) channel.
ClientTo = Callable[[SvidMaterial], grpc.Channel]


@pytest.fixture
def client_to(grpc_server: GrpcServer) -> Iterator[ClientTo]:
    with servers.mtls_clients(grpc_server.target) as make:
        yield make


def ticks(channel: grpc.Channel, payload: bytes = b"tick") -> Iterator[bytes]:
    method: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(TICKS)
    return iter(method(payload, timeout=30))


def drain_until_error(stream: Iterator[Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in stream:
            pass
    return caught.value


def test_grpc_revoked_caller_is_refused_on_its_open_channel_and_audited(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
    revoke: Revoke,
) -> None:
    revoked, other = authority.svid(ENGINE_ID), authority.svid(ENGINE_ID)
    channel, bystander = client_to(revoked), client_to(other)
    assert call_echo(channel) == f"ping from {ENGINE_ID}".encode()  # connection now open
    assert call_echo(bystander)

    revoke(revoked)
    error = rpc_error(lambda: call_echo(channel))  # same channel, same TCP connection
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == REVOKED_DETAILS
    fresh_channel = client_to(revoked)
    assert rpc_error(lambda: call_echo(fresh_channel)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert call_echo(bystander) == f"ping from {ENGINE_ID}".encode()  # same ID, other cert

    denied = deny_records(grpc_server.audit)
    assert len(denied) == 2
    for record in denied:
        assert record["caller_spiffe_id"] == ENGINE_ID  # who it was, although refused
        assert record["cert_serial"] == revoked.serial
        assert record["method"] == ECHO
        assert record["reason"].startswith(f"certificate revoked: serial {revoked.serial}")


def test_grpc_open_stream_of_a_revoked_peer_is_ended_and_audited(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
    revoke: Revoke,
) -> None:
    revoked, other = authority.svid(ENGINE_ID), authority.svid(ENGINE_ID)
    stream = ticks(client_to(revoked), b"revoked")
    assert next(stream) == b"revoked 0"
    kept = ticks(client_to(other), b"kept")
    assert next(kept) == b"kept 0"

    published = revoke(revoked)
    error = drain_until_error(stream)
    reaction = time.monotonic() - published
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == REVOKED_DETAILS
    assert reaction < REACTION, f"the stream outlived the revocation by {reaction:.2f}s"

    record = records_soon(grpc_server.audit, lambda r: r["reason"] == REVOKED_STREAM_REASON)
    assert (record["decision"], record["method"]) == ("deny", TICKS)
    assert (record["caller_spiffe_id"], record["cert_serial"]) == (ENGINE_ID, revoked.serial)
    assert grpc_server.ticker.callers == [ENGINE_ID, ENGINE_ID]

    before = next(kept)  # the other peer's stream goes on
    assert next(kept) != before
    kept_call: Any = kept
    kept_call.cancel()
    assert wait_for(lambda: len(grpc_server.interceptor.streams) == 0, TIMEOUT)


def test_grpc_idle_stream_of_a_revoked_peer_is_ended_too(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
    revoke: Revoke,
) -> None:
    # Health.Watch sends SERVING, then blocks inside the servicer until the status changes:
    # there is no "next item" at which to check, only the revocation notice.
    revoked = authority.svid(GATEWAY_ID)
    stub: Any = health_pb2_grpc.HealthStub(client_to(revoked))
    watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    published = revoke(revoked)
    error = drain_until_error(watch)
    reaction = time.monotonic() - published
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reaction < REACTION
    record = records_soon(grpc_server.audit, lambda r: r["reason"] == REVOKED_STREAM_REASON)
    assert record["method"] == "/grpc.health.v1.Health/Watch"
    assert wait_for(lambda: len(grpc_server.interceptor.streams) == 0, TIMEOUT)


def test_grpc_streams_keep_their_own_status_and_end_cleanly(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    """The revocation watch is invisible to servicers: abort() keeps its code, and a cancelled
    stream's servicer generator is closed."""
    channel = client_to(authority.svid(ENGINE_ID))
    method: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(ABORTING)
    stream = iter(method(b"", timeout=TIMEOUT))
    assert next(stream) == b"first"
    error = drain_until_error(stream)
    assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "no such account")

    ticking: Any = ticks(channel)
    assert next(ticking) == b"tick 0"
    ticking.cancel()
    assert grpc_server.ticker.finished.wait(TIMEOUT)
    assert wait_for(lambda: len(grpc_server.interceptor.streams) == 0, TIMEOUT)


def test_grpc_fails_closed_without_a_fresh_crl_and_recovers_without_restart(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
    issuer: Issuer,
    watcher: RevocationWatcher,
    clock: Clock,
) -> None:
    channel = client_to(authority.svid(ENGINE_ID))
    assert call_echo(channel)

    issuer.server.stop()  # the issuer is gone; the CRL held is good until its nextUpdate
    clock.advance(CRL_VALIDITY / 2)
    assert call_echo(channel)
    clock.advance(CRL_VALIDITY / 2)
    assert not watcher.fresh()
    error = rpc_error(lambda: call_echo(channel))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_DETAILS)
    [record] = deny_records(grpc_server.audit)
    assert record["caller_spiffe_id"] == ENGINE_ID
    assert record["reason"].startswith("revocation status unavailable")

    issuer.server.start()  # the issuer is back: the next poll restores service
    issuer.publish()
    assert wait_for(watcher.fresh, TIMEOUT)
    assert call_echo(channel) == f"ping from {ENGINE_ID}".encode()


# -- HTTPS -----------------------------------------------------------------------------------


@dataclass
class HttpsServer:
    port: int
    audit: AuditLog
    app: WhoAmI
    live: Any  # the protocol's LiveConnections


@pytest.fixture
def https_server(
    authority: Authority,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    watcher: RevocationWatcher,
    tmp_path: Path,
) -> Iterator[HttpsServer]:
    with servers.running_https_server(
        FakeSource(authority.svid(GATEWAY_ID)),
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        revocation=watcher,
        tls_dir=tmp_path / "tls",
    ) as running:
        yield HttpsServer(running.port, audit, running.app, running.live)


def keep_alive(port: int, material: SvidMaterial) -> http.client.HTTPSConnection:
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, context=client_context(material), timeout=TIMEOUT
    )
    connection.request("GET", "/v1/accounts")
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    return connection


def get_on(connection: http.client.HTTPSConnection) -> int:
    connection.request("GET", "/v1/accounts")
    response = connection.getresponse()
    response.read()
    return response.status


CLOSED = (ConnectionError, ssl.SSLError, http.client.HTTPException, OSError)


def test_https_revoked_client_is_refused_at_the_handshake_and_audited(
    authority: Authority, https_server: HttpsServer, revoke: Revoke
) -> None:
    revoked = authority.svid(TELLER_ID)
    revoke(revoked)
    refusal(https_server.port, client_context(revoked))
    record = records_soon(https_server.audit, lambda r: r["decision"] == "deny")
    assert record["method"] == "TLS handshake"
    assert record["caller_spiffe_id"] == TELLER_ID
    assert record["cert_serial"] == revoked.serial
    assert record["reason"].startswith(f"certificate revoked: serial {revoked.serial}")
    assert https_server.app.seen == []

    other = authority.svid(TELLER_ID)  # the same workload with its next SVID is welcome
    assert https_get(https_server.port, client_context(other)).status == 200


def test_https_open_connection_of_a_revoked_peer_is_closed_within_the_interval(
    authority: Authority, https_server: HttpsServer, revoke: Revoke
) -> None:
    revoked, other = authority.svid(TELLER_ID), authority.svid(TELLER_ID)
    with (
        contextlib.closing(keep_alive(https_server.port, revoked)) as kept,
        contextlib.closing(keep_alive(https_server.port, other)) as bystander,
    ):
        assert wait_for(lambda: len(https_server.live) == 2, TIMEOUT)
        published = revoke(revoked)
        record = records_soon(
            https_server.audit, lambda r: r["reason"] == REVOKED_CONNECTION_REASON
        )
        reaction = time.monotonic() - published
        assert reaction < REACTION, f"the connection outlived the revocation by {reaction:.2f}s"
        assert (record["decision"], record["method"]) == ("deny", CONNECTION_METHOD)
        assert (record["caller_spiffe_id"], record["cert_serial"]) == (TELLER_ID, revoked.serial)
        assert record["tls_version"] == "TLSv1.3"

        with pytest.raises(CLOSED):
            get_on(kept)
        assert get_on(bystander) == 200
        assert len(https_server.live) == 1
    allowed = [r for r in audit_records(https_server.audit) if r["decision"] == "allow"]
    assert [r["cert_serial"] for r in allowed] == [revoked.serial, other.serial, other.serial]


def exchange(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One request on a fresh connection offering ``session``: (reply, session, resumed)."""
    request = b"GET /v1/accounts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        resumed = bool(tls.session_reused)
        reply = b""
        with contextlib.suppress(*CLOSED):
            tls.sendall(request)
            while chunk := tls.recv(65536):
                reply += chunk
        return reply, tls.session, resumed


def test_https_tls12_session_resumption_does_not_let_a_revoked_peer_back_in(
    authority: Authority, https_server: HttpsServer, revoke: Revoke
) -> None:
    revoked = authority.svid(TELLER_ID)
    context = client_context(revoked)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    reply, session, resumed = exchange(https_server.port, context)
    assert reply.startswith(b"HTTP/1.1 200")
    assert session is not None
    assert not resumed

    # Before revocation: the server does resume TLS 1.2 sessions (OpenSSL's session-ID cache;
    # there are no tickets), and still runs PeerVerifier on the certificate in the session.
    reply, _, resumed = exchange(https_server.port, context, session)
    assert resumed, "the server no longer resumes TLS 1.2 sessions: update this test"
    assert reply.startswith(b"HTTP/1.1 200")

    revoke(revoked)
    reply, _, resumed = exchange(https_server.port, context, session)
    assert resumed  # the abbreviated handshake succeeds ...
    assert not reply.startswith(b"HTTP")  # ... and the connection is closed before any HTTP
    record = records_soon(https_server.audit, lambda r: r["decision"] == "deny")
    assert record["method"] == "TLS handshake"
    assert (record["caller_spiffe_id"], record["cert_serial"]) == (TELLER_ID, revoked.serial)
    assert record["reason"].startswith("certificate revoked")
    assert record["tls_version"] == "TLSv1.2"
    assert [r["decision"] for r in audit_records(https_server.audit)] == [
        "allow",
        "allow",
        "deny",
    ]


def test_https_tls13_server_issues_no_session_ticket(
    authority: Authority, https_server: HttpsServer
) -> None:
    context = client_context(authority.svid(TELLER_ID))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    reply, session, _ = exchange(https_server.port, context)
    assert reply.startswith(b"HTTP/1.1 200")
    assert session is None or not session.has_ticket
    _, _, resumed = exchange(https_server.port, context, session)
    assert not resumed


def test_https_fails_closed_without_a_fresh_crl_and_recovers_without_restart(
    authority: Authority,
    https_server: HttpsServer,
    issuer: Issuer,
    watcher: RevocationWatcher,
    clock: Clock,
    metrics: Metrics,
) -> None:
    teller = authority.svid(TELLER_ID)
    assert metrics.gauge("revocation.fresh") == 1
    with contextlib.closing(keep_alive(https_server.port, teller)) as kept:
        issuer.server.stop()
        clock.advance(CRL_VALIDITY / 2)  # the issuer is away, the CRL still valid
        assert https_get(https_server.port, client_context(teller)).status == 200
        assert metrics.gauge("revocation.fresh") == 1
        assert (metrics.gauge("revocation.age") or 0) >= CRL_VALIDITY.total_seconds() / 2

        clock.advance(CRL_VALIDITY / 2)  # past nextUpdate: new connections fail closed
        assert metrics.gauge("revocation.fresh") == 0
        refusal(https_server.port, client_context(teller))
        record = records_soon(https_server.audit, lambda r: r["decision"] == "deny")
        assert record["method"] == "TLS handshake"
        assert record["caller_spiffe_id"] == TELLER_ID
        assert record["reason"].startswith("revocation status unavailable")
        assert get_on(kept) == 200  # an open connection is not cut by an outage

        issuer.server.start()
        issuer.publish()
        assert wait_for(watcher.fresh, TIMEOUT)
        assert metrics.gauge("revocation.fresh") == 1
        assert https_get(https_server.port, client_context(teller)).status == 200


def test_revocation_metrics_follow_the_crls(
    authority: Authority,
    telemetry: Telemetry,
    revoke: Revoke,
    metrics: Metrics,
) -> None:
    assert metrics.gauge("revocation.fresh") == 1
    assert metrics.gauge("revocation.revoked") == 0
    age = metrics.gauge("revocation.age")
    assert age is not None
    assert 0 <= age < 5

    revoke(authority.svid(TELLER_ID))
    revoke(authority.svid(ENGINE_ID))
    assert metrics.gauge("revocation.revoked") == 2
