"""The mTLS runtime on real sockets, without an issuer: gRPC and HTTPS servers on 127.0.0.1.

SVIDs come straight from the test PKI (root -> signing CA -> leaves) through a fake SVID source
whose ``publish`` plays the Workload API pushing a rotation.  The bundle holds the root and the
signing CA, as the issuer's does.  Revocation is real but quiet: every verifier has a watcher of a
local ``/crls`` serving an empty CRL of the signing CA (tests/integration/
test_revocation_enforcement.py revokes).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from services.common.authz import audit as audit_module
from services.common.authz.audit import AuditLog, AuditRecord, AuditWriteError
from services.common.authz.policy import Policy
from services.common.discovery.registry import RegistryError, ServiceAddress, write_registry
from services.common.errors import ChannelClosedError
from services.common.identity.pem import fingerprint_sha256, serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls import grpc as grpc_mtls
from services.common.mtls.contexts import client_context
from services.common.mtls.grpc import MtlsChannel
from services.common.mtls.https import DEFAULT_MAX_IN_FLIGHT, OVERLOADED_REASON
from services.common.observability.telemetry import Telemetry, setup_telemetry
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.common.revocation import RevocationWatcher
from services.labs.errors import LabError
from services.labs.teller import TellerClient
from services.stack.native import StackSettings
from tests.support.crl import build_crl, crl_server, started_watcher, wait_for
from tests.support.iana import TLS_SUITE_CODES
from tests.support.mtls_servers import (
    ECHO,
    ENGINE_ID,
    GATEWAY_ID,
    RISK_ID,
    SLOW_PATH,
    TD,
    TELLER_ID,
    TIMEOUT,
    Authority,
    FakeSource,
    GrpcHandler,
    GrpcTestServer,
    Reply,
    WhoAmI,
    audit_log,
    audit_records,
    call_echo,
    echo,
    https_get,
    mtls_clients,
    new_authority,
    refusal,
    rpc_error,
    running_grpc_server,
    running_https_server,
    server_policy,
)
from tests.support.pki import create_leaf

pytestmark = pytest.mark.integration

# How a client sees the server abort a handshake: asyncio closes without sending the alert.
SERVER_REFUSALS = {"UNEXPECTED_EOF_WHILE_READING"}
TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256"}


# -- identities ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority() -> Authority:
    return new_authority("ztbank test")


@pytest.fixture(scope="module")
def foreign() -> Authority:
    """Another CA for the same trust domain name: its SVIDs chain to nothing we trust."""
    return new_authority("impostor")


@pytest.fixture
def revocation(authority: Authority) -> Iterator[RevocationWatcher]:
    """A fresh watcher of a local issuer ``/crls`` that revokes nothing."""
    with crl_server() as crls:
        crls.publish(build_crl(authority.signing_ca))
        watcher = started_watcher(crls, authority.bundle)
        yield watcher
        watcher.close()


# -- shared runtime pieces -------------------------------------------------------------------


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return server_policy(tmp_path)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    yield from audit_log(tmp_path)


@pytest.fixture
def metrics() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def telemetry(tmp_path: Path, metrics: InMemoryMetricReader) -> Iterator[Telemetry]:
    instance = setup_telemetry(
        "mtls-test",
        metrics_port=None,
        spans_path=tmp_path / "spans.jsonl",
        metric_readers=[metrics],
    )
    yield instance
    instance.shutdown()


def served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a new TLS connection to ``port`` is served."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# -- gRPC ------------------------------------------------------------------------------------


@dataclass
class GrpcServer(GrpcTestServer):
    source: FakeSource


@pytest.fixture
def grpc_server(
    authority: Authority,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    revocation: RevocationWatcher,
) -> Iterator[GrpcServer]:
    source = FakeSource(authority.svid(RISK_ID, dns=("risk",)))
    handlers: dict[str, GrpcHandler] = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    with running_grpc_server(
        source,
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        revocation=revocation,
        handlers=handlers,
    ) as running:
        yield GrpcServer(port=running.port, audit=audit, source=source)


# Makes a client of the test server with an SVID: its channel and the source it rotates from.
ClientTo = Callable[[SvidMaterial], grpc.Channel]


@pytest.fixture
def client_to(grpc_server: GrpcServer) -> Iterator[ClientTo]:
    """Blocking grpcio clients of the test server with an SVID, closed afterwards."""
    with mtls_clients(grpc_server.target) as make:
        yield make


def check_health(channel: grpc.Channel) -> int:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs omit the generated methods
    status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
    return status


def test_grpc_allowed_caller_gets_through_and_is_audited(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    material = authority.svid(ENGINE_ID)
    channel = client_to(material)
    assert call_echo(channel) == f"ping from {ENGINE_ID}".encode()

    [record] = audit_records(grpc_server.audit)
    assert record["decision"] == "allow"
    assert record["caller_spiffe_id"] == ENGINE_ID
    assert record["cert_serial"] == material.serial
    assert record["cert_sha256"] == fingerprint_sha256(material.leaf)
    assert record["service"] == "risk"
    assert record["method"] == ECHO
    assert record["source_addr"] == "127.0.0.1"
    assert isinstance(record["source_port"], int)
    assert (record["dest_addr"], record["dest_port"]) == ("127.0.0.1", grpc_server.port)
    assert len(record["trace_id"]) == 32
    # What grpcio's auth context tells of the connection (it hides the suite and ALPN).
    assert (record["event"], record["handshake"]) == ("authz", "success")
    assert (record["tls_version"], record["sni"]) == ("TLSv1.3", "risk")
    assert record["cert_subject"] == material.leaf.subject.rfc4514_string()
    assert (record["cipher"], record["cipher_code"], record["alpn"]) == (None, None, None)


def test_grpc_caller_not_in_policy_is_denied_and_audited(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    material = authority.svid(GATEWAY_ID)
    channel = client_to(material)
    error = rpc_error(lambda: call_echo(channel))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert GATEWAY_ID in (error.details() or "")

    [record] = audit_records(grpc_server.audit)
    assert record["decision"] == "deny"
    assert record["caller_spiffe_id"] == GATEWAY_ID
    assert record["cert_serial"] == material.serial
    assert record["method"] == ECHO
    assert "no policy rule allows" in record["reason"]


def test_grpc_health_answers_any_verified_svid(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    channel = client_to(authority.svid(GATEWAY_ID))
    assert check_health(channel) == health_pb2.HealthCheckResponse.SERVING
    [record] = audit_records(grpc_server.audit)
    assert (record["decision"], record["reason"]) == ("allow", "health check")
    assert record["method"] == "/grpc.health.v1.Health/Check"


def test_grpc_client_of_a_foreign_ca_fails_the_handshake(
    authority: Authority,
    foreign: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    # Same SPIFFE ID as an allowed caller, and it trusts our server: only its issuer is wrong.
    impostor = foreign.svid(ENGINE_ID, trusted=authority.bundle)
    channel = client_to(impostor)
    assert rpc_error(lambda: call_echo(channel)).code() == grpc.StatusCode.UNAVAILABLE
    assert rpc_error(lambda: check_health(channel)).code() == (grpc.StatusCode.UNAVAILABLE)
    assert audit_records(grpc_server.audit) == []  # no call ever reached the interceptor


def test_grpc_certificate_of_our_ca_but_not_an_svid_of_our_domain_is_unauthenticated(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    # OpenSSL accepts the chain; the X509-SVID rules refuse the other trust domain.
    outsider = authority.svid(ENGINE_ID.replace(TD, "other.example"))
    channel = client_to(outsider)
    error = rpc_error(lambda: call_echo(channel))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    [record] = audit_records(grpc_server.audit)
    assert record["decision"] == "deny"
    assert record["caller_spiffe_id"] is None
    assert record["reason"].startswith("invalid X509-SVID")


def test_grpc_server_rotation_reaches_new_connections_only(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
) -> None:
    client = authority.svid(ENGINE_ID)
    probe = client_context(client, alpn=["h2"])
    before = grpc_server.source.current()
    assert serial_hex(served_certificate(grpc_server.port, probe)) == before.serial

    old = client_to(client)
    assert call_echo(old, b"before")  # connection established with the old SVID

    rotated = authority.svid(RISK_ID, dns=("risk",))
    grpc_server.source.publish(rotated)
    assert serial_hex(served_certificate(grpc_server.port, probe)) == rotated.serial

    assert call_echo(old, b"old") == f"old from {ENGINE_ID}".encode()
    fresh = client_to(client)
    assert call_echo(fresh, b"new") == f"new from {ENGINE_ID}".encode()


async def aio_echo(channel: MtlsChannel, payload: bytes = b"ping") -> bytes:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.channel().unary_unary(ECHO)
    reply: bytes = await method(payload, timeout=TIMEOUT)
    return reply


def test_grpc_mtls_channel_follows_client_rotation_and_closes_the_stale_channel(
    authority: Authority,
    grpc_server: GrpcServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The services' grpc.aio channel: calls carry the caller's SVID; after a rotation the next
    call gets a new channel with the new SVID, a call in flight on the old one still finishes
    (its grace period) while new calls there are refused; ``aclose`` refuses further calls."""
    monkeypatch.setattr(grpc_mtls, "CHANNEL_GRACE_SECONDS", 5.0)
    first, second = authority.svid(ENGINE_ID), authority.svid(ENGINE_ID)
    source = FakeSource(first)
    channel = MtlsChannel(source, lambda: grpc_server.target, "risk")
    expected = f"ping from {ENGINE_ID}".encode()

    async def scenario() -> None:
        assert await aio_echo(channel) == expected
        stale = channel.channel()
        assert channel.channel() is stale  # no change, no new channel
        on_stale: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = stale.unary_unary(ECHO)
        in_flight = on_stale(b"ping", timeout=TIMEOUT)  # started before the rotation
        source.publish(second)
        assert channel.channel() is not stale
        assert await in_flight == expected  # finishes on the stale channel
        with pytest.raises(grpc.aio.UsageError):  # "Channel is closed." to new calls
            await on_stale(b"ping", timeout=TIMEOUT)
        assert await aio_echo(channel) == expected
        await channel.aclose()
        with pytest.raises(ChannelClosedError):
            channel.channel()

    asyncio.run(scenario())
    serials = [record["cert_serial"] for record in audit_records(grpc_server.audit)]
    assert sorted(serials) == sorted([first.serial, first.serial, second.serial])
    assert serials[-1] == second.serial


def test_grpc_mtls_channel_follows_its_service_to_a_new_address(
    authority: Authority,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    revocation: RevocationWatcher,
) -> None:
    """The registry moves the service: the client follows within one recheck, and stays put
    while the registry cannot answer."""

    def servers(name: bytes) -> contextlib.AbstractContextManager[Any]:
        def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
            return name

        return running_grpc_server(
            FakeSource(authority.svid(RISK_ID, dns=("risk",))),
            policy=policy,
            audit=audit,
            telemetry=telemetry,
            revocation=revocation,
            handlers={"Echo": grpc.unary_unary_rpc_method_handler(answer)},
        )

    with servers(b"old") as old, servers(b"new") as new:
        registry: dict[str, str | Exception] = {"risk": f"127.0.0.1:{old.port}"}

        def resolve() -> str:
            answer = registry["risk"]
            if isinstance(answer, Exception):
                raise answer
            return answer

        channel = MtlsChannel(
            FakeSource(authority.svid(ENGINE_ID)), resolve, "risk", recheck_seconds=0.1
        )

        async def scenario() -> None:
            try:
                assert await aio_echo(channel) == b"old"
                registry["risk"] = f"127.0.0.1:{new.port}"
                deadline = time.monotonic() + TIMEOUT
                while await aio_echo(channel) != b"new":
                    assert time.monotonic() < deadline, "the channel never followed the service"
                    await asyncio.sleep(0.05)
                registry["risk"] = RegistryError("registry unreadable")
                await asyncio.sleep(0.3)  # three rechecks that cannot answer
                assert channel.target == f"127.0.0.1:{new.port}"
                assert await aio_echo(channel) == b"new"
            finally:
                await channel.aclose()

        asyncio.run(scenario())


# -- HTTPS -----------------------------------------------------------------------------------


@dataclass
class HttpsServer:
    source: FakeSource
    port: int
    audit: AuditLog
    app: WhoAmI


@pytest.fixture
def https_server(
    authority: Authority,
    policy: Policy,
    audit: AuditLog,
    telemetry: Telemetry,
    revocation: RevocationWatcher,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[HttpsServer]:
    """``indirect`` parametrization sets the server's in-flight limit."""
    source = FakeSource(authority.svid(GATEWAY_ID))
    with running_https_server(
        source,
        policy=policy,
        audit=audit,
        telemetry=telemetry,
        revocation=revocation,
        tls_dir=tmp_path / "tls",
        max_in_flight=getattr(request, "param", DEFAULT_MAX_IN_FLIGHT),
    ) as running:
        yield HttpsServer(source, running.port, audit, running.app)


def test_the_teller_cli_checks_the_gateways_revocation_and_fails_closed(
    authority: Authority, https_server: HttpsServer, tmp_path: Path
) -> None:
    """The CLI client refuses a gateway whose certificate the issuer's CRLs list, and, with no
    CRLs at all (issuer away, nothing kept), refuses rather than trusting blindly."""
    registry = tmp_path / "registry.json"
    write_registry(registry, [ServiceAddress("gateway", "127.0.0.1", https_server.port)])
    gateway_leaf = https_server.source.current().leaf
    with crl_server() as issuer:
        settings = StackSettings(
            home=tmp_path / "home",
            registry=registry,
            trust_domain=TD,
            issuer_public_url=issuer.url.removesuffix("/crls"),
        )
        teller = authority.svid(TELLER_ID)

        issuer.publish(build_crl(authority.signing_ca, [gateway_leaf]))
        with pytest.raises(LabError, match=r"the gateway's certificate is revoked: .*serial"):
            TellerClient(settings, teller).request("GET", "/v1/whoami")

        issuer.publish(build_crl(authority.signing_ca))
        assert TellerClient(settings, teller).request("GET", "/v1/whoami").status == 200

        issuer.stop()  # the issuer is away: the kept CRLs still answer ...
        assert TellerClient(settings, teller).request("GET", "/v1/whoami").status == 200
        (settings.home / "cache" / "crls.pem").unlink()  # ... and without them: fail closed
        with pytest.raises(LabError, match="cannot check the gateway's revocation status"):
            TellerClient(settings, teller).request("GET", "/v1/whoami")


def tls12_context(material: SvidMaterial, ciphers: str) -> ssl.SSLContext:
    context = client_context(material)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    return context


def test_https_allowed_caller_reaches_the_app_with_its_identity(
    authority: Authority, https_server: HttpsServer
) -> None:
    material = authority.svid(TELLER_ID)
    reply = https_get(https_server.port, client_context(material))
    assert reply.status == 200
    assert reply.json() == {
        "spiffe_id": TELLER_ID,
        "serial": material.serial,
        "path": "/v1/accounts",
    }

    [record] = audit_records(https_server.audit)
    assert record["decision"] == "allow"
    assert record["caller_spiffe_id"] == TELLER_ID
    assert record["cert_serial"] == material.serial
    assert record["cert_sha256"] == fingerprint_sha256(material.leaf)
    assert (record["service"], record["method"]) == ("gateway", "GET /v1/accounts")
    assert record["source_addr"] == "127.0.0.1"
    assert (record["dest_addr"], record["dest_port"]) == ("127.0.0.1", https_server.port)
    assert record["tls_version"] == "TLSv1.3"
    assert record["cipher"] in TLS13_SUITES
    assert len(record["trace_id"]) == 32


@pytest.mark.parametrize(("method", "runs_before_the_sync"), [("GET", True), ("POST", False)])
def test_https_answers_leave_only_after_their_audit_record_is_written(
    authority: Authority,
    https_server: HttpsServer,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    runs_before_the_sync: bool,
) -> None:
    """While an allowed request's record is held in the audit writer, no answer leaves; a safe
    request's handler runs meanwhile, any other waits for the record first."""
    hold, held, release = threading.Event(), threading.Event(), threading.Event()
    real_line = audit_module._line

    def held_line(at: float, record: AuditRecord) -> bytes:
        if hold.is_set():
            held.set()
            release.wait(TIMEOUT)
        return real_line(at, record)

    monkeypatch.setattr(audit_module, "_line", held_line)
    connection = http.client.HTTPSConnection(
        "127.0.0.1", https_server.port, context=client_context(authority.svid(TELLER_ID))
    )
    connection.request("GET", "/v1/warm")  # the handshake and a first request, not held
    assert connection.getresponse().read()
    answers: list[int] = []

    def ask() -> None:
        connection.request(method, "/v1/held")
        response = connection.getresponse()
        response.read()
        answers.append(response.status)

    hold.set()
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        assert held.wait(TIMEOUT)
        ran = wait_for(lambda: ("http", "/v1/held") in https_server.app.seen, 0.5)
        assert ran is runs_before_the_sync
        assert answers == []  # nothing left while the record was not written
    finally:
        release.set()
        asker.join(TIMEOUT)
        connection.close()
    assert answers == [200]
    assert ("http", "/v1/held") in https_server.app.seen
    assert audit_records(https_server.audit)[-1]["method"] == f"{method} /v1/held"


def test_https_forwarded_headers_do_not_change_who_asked(
    authority: Authority, https_server: HttpsServer
) -> None:
    """No proxy stands in front of the gateway: a local client's X-Forwarded-For is ignored."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", https_server.port, context=client_context(authority.svid(TELLER_ID))
    )
    try:
        connection.request("GET", "/v1/accounts", headers={"X-Forwarded-For": "203.0.113.9"})
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    [client] = https_server.app.clients
    assert client[0] == "127.0.0.1"


def test_https_caller_not_in_policy_gets_403_problem(
    authority: Authority, https_server: HttpsServer
) -> None:
    reply = https_get(https_server.port, client_context(authority.svid(ENGINE_ID)))
    assert reply.status == 403
    assert reply.content_type == "application/problem+json"
    problem = reply.json()
    assert problem["status"] == 403
    assert problem["title"] == "Forbidden"
    assert ENGINE_ID in problem["detail"]
    assert "spiffe_id" not in problem  # the app never ran

    [record] = audit_records(https_server.audit)
    assert (record["decision"], record["caller_spiffe_id"]) == ("deny", ENGINE_ID)


def test_https_path_outside_the_rule_is_denied(
    authority: Authority, https_server: HttpsServer
) -> None:
    context = client_context(authority.svid(TELLER_ID))
    assert https_get(https_server.port, context, "/admin").status == 403
    assert https_get(https_server.port, context, "/healthz").status == 200  # health is open


def records_soon(audit: AuditLog, count: int) -> list[dict[str, Any]]:
    """The server audits a refused handshake right after the client has seen it fail."""
    deadline = time.monotonic() + TIMEOUT
    while len(records := audit_records(audit)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return records


def only_this_caller_got_through(server: HttpsServer, authority: Authority) -> None:
    """The control of a refusal test: a proper SVID does get through the same server; the
    refused client left exactly one audit record, a deny at the TLS handshake, and reached
    neither the app nor the policy."""
    assert https_get(server.port, client_context(authority.svid(TELLER_ID))).status == 200
    records = audit_records(server.audit)
    allowed = [r["caller_spiffe_id"] for r in records if r["decision"] == "allow"]
    denied = [r for r in records if r["decision"] == "deny"]
    assert allowed == [TELLER_ID]
    assert len(denied) == 1
    assert denied[0]["method"] == "TLS handshake"
    assert denied[0]["caller_spiffe_id"] is None
    assert denied[0]["reason"].startswith("TLS handshake failed")
    assert denied[0]["source_port"] is not None


def test_https_client_of_a_foreign_ca_is_refused(
    authority: Authority, foreign: Authority, https_server: HttpsServer
) -> None:
    # Same SPIFFE ID as the allowed teller, and it trusts our server: only its issuer is wrong.
    # (asyncio closes a failed handshake without flushing the TLS alert: the client sees EOF.)
    impostor = foreign.svid(TELLER_ID, trusted=authority.bundle)
    refusal(https_server.port, client_context(impostor))
    only_this_caller_got_through(https_server, authority)


def test_https_client_without_certificate_is_refused(
    authority: Authority, https_server: HttpsServer
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=authority.svid(TELLER_ID).bundle_pem.decode())
    refusal(https_server.port, context)
    only_this_caller_got_through(https_server, authority)


def test_https_certificate_of_our_ca_but_not_an_svid_of_our_domain_is_cut_off(
    authority: Authority, https_server: HttpsServer
) -> None:
    # OpenSSL accepts the chain; the X509-SVID rules refuse the other trust domain.
    outsider = authority.svid(TELLER_ID.replace(TD, "other.example"))
    refusal(https_server.port, client_context(outsider))
    [record] = audit_records(https_server.audit)
    assert (record["decision"], record["method"]) == ("deny", "TLS handshake")
    assert record["caller_spiffe_id"] is None
    assert "other.example" in record["reason"]
    assert record["tls_version"] == "TLSv1.3"


def legacy_context(material: SvidMaterial, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client willing to speak old TLS versions, up to ``maximum``."""
    context = client_context(material)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1
    return context


def test_https_tls11_client_is_refused(authority: Authority, https_server: HttpsServer) -> None:
    material = authority.svid(TELLER_ID)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11 = ssl.TLSVersion.TLSv1_1
    error = refusal(https_server.port, legacy_context(material, tls11))
    # The server ended the handshake (asyncio may drop the alert), not the client itself.
    assert isinstance(error, ssl.SSLError)
    assert error.reason in SERVER_REFUSALS | {"TLSV1_ALERT_PROTOCOL_VERSION"}
    [refused] = records_soon(https_server.audit, 1)
    assert (refused["decision"], refused["method"]) == ("deny", "TLS handshake")
    assert "PROTOCOL" in refused["reason"].upper()

    # The very same client is served once it may use TLS 1.2: the version was the reason.
    reply = https_get(https_server.port, legacy_context(material, ssl.TLSVersion.TLSv1_2))
    assert reply.status == 200
    _, record = audit_records(https_server.audit)
    assert record["tls_version"] == "TLSv1.2"


def test_https_tls12_non_aead_cipher_is_refused(
    authority: Authority, https_server: HttpsServer
) -> None:
    material = authority.svid(TELLER_ID)
    error = refusal(https_server.port, tls12_context(material, "ECDHE-ECDSA-AES128-SHA256"))
    assert isinstance(error, ssl.SSLError)
    assert error.reason in SERVER_REFUSALS | {"SSLV3_ALERT_HANDSHAKE_FAILURE"}
    [refused] = records_soon(https_server.audit, 1)
    assert (refused["decision"], refused["method"]) == ("deny", "TLS handshake")
    assert "CIPHER" in refused["reason"].upper()

    # The same client with an AEAD suite gets through, and the audit names what was used.
    aead = tls12_context(material, "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert https_get(https_server.port, aead).status == 200
    _, record = audit_records(https_server.audit)
    assert record["tls_version"] == "TLSv1.2"
    assert record["cipher"] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert record["cipher_code"] == TLS_SUITE_CODES["ECDHE-ECDSA-AES128-GCM-SHA256"]


def test_https_served_certificate_rotates_without_restart(
    authority: Authority, https_server: HttpsServer
) -> None:
    client = authority.svid(TELLER_ID)
    before = https_server.source.current()
    assert serial_hex(served_certificate(https_server.port, client_context(client))) == (
        before.serial
    )
    kept = http.client.HTTPSConnection(
        "127.0.0.1", https_server.port, context=client_context(client), timeout=TIMEOUT
    )
    with contextlib.closing(kept):
        kept.request("GET", "/v1/accounts")
        assert kept.getresponse().read()

        rotated = authority.svid(GATEWAY_ID)
        https_server.source.publish(rotated)
        served = served_certificate(https_server.port, client_context(client))
        assert serial_hex(served) == rotated.serial

        kept.request("GET", "/v1/accounts")  # the open connection is untouched
        assert kept.getresponse().status == 200
    assert https_get(https_server.port, client_context(client)).status == 200


def test_https_websocket_upgrade_is_subject_to_policy(
    authority: Authority, https_server: HttpsServer
) -> None:
    denied = client_context(authority.svid(ENGINE_ID))  # a verified SVID the policy denies
    upgrade = (
        b"GET /v1/stream HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    with (
        socket.create_connection(("127.0.0.1", https_server.port), timeout=TIMEOUT) as raw,
        denied.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(upgrade)
        status_line = tls.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 403")
    assert https_server.app.seen == []  # the application never saw the denied caller
    [record] = audit_records(https_server.audit)
    assert (record["decision"], record["caller_spiffe_id"]) == ("deny", ENGINE_ID)


@pytest.mark.parametrize("https_server", [1], indirect=True)
def test_https_beyond_the_in_flight_limit_is_shed_at_once_with_503(
    authority: Authority, https_server: HttpsServer
) -> None:
    """Overload is answered, not queued: with one request in flight (the limit), the next gets
    503 problem+json with Retry-After well before the first is done; both are audited."""
    context = client_context(authority.svid(TELLER_ID))
    running = https_server
    slow: list[Reply] = []
    holder = threading.Thread(
        target=lambda: slow.append(https_get(running.port, context, SLOW_PATH))
    )
    holder.start()
    deadline = time.monotonic() + TIMEOUT
    while ("http", SLOW_PATH) not in running.app.seen:
        assert time.monotonic() < deadline, "the slow request never reached the app"
        time.sleep(0.01)
    connection = http.client.HTTPSConnection(
        "127.0.0.1", running.port, context=context, timeout=TIMEOUT
    )
    connection.request("GET", "/v1/accounts")
    response = connection.getresponse()
    shed = Reply(response.status, response.getheader("content-type", ""), response.read())
    retry_after = response.getheader("retry-after")
    connection.close()
    # At once, by order, not by a clock: answered while the slow request still holds the slot.
    answered_while_held = holder.is_alive()
    holder.join(TIMEOUT)
    assert slow[0].status == 200
    assert (shed.status, shed.content_type, retry_after) == (503, PROBLEM_MEDIA_TYPE, "1")
    assert shed.json()["detail"] == OVERLOADED_REASON
    assert answered_while_held
    assert https_get(running.port, context).status == 200  # the limit is free again
    decisions = [(r["method"], r["decision"], r["reason"]) for r in audit_records(running.audit)]
    assert ("GET /v1/accounts", "deny", OVERLOADED_REASON) in decisions
    assert ("GET " + SLOW_PATH, "allow", "allowed by policy rule for gateway") in decisions


# -- encrypted-traffic audit fields (JR/T 0194-2020) and handshake metrics --------------------


def get_twice_on_one_connection(port: int, context: ssl.SSLContext, server_name: str) -> str:
    """Two GETs on one TLS connection that sends ``server_name`` as SNI; the suite used."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        connection.sock = tls
        for _ in range(2):
            connection.request("GET", "/v1/accounts")
            response = connection.getresponse()
            response.read()
            assert response.status == 200
        suite = tls.cipher()
        assert suite is not None
        return suite[0]


def test_https_records_carry_the_encrypted_traffic_audit_fields(
    authority: Authority, https_server: HttpsServer
) -> None:
    material = authority.svid(TELLER_ID)
    context = client_context(material, alpn=["h2", "http/1.1"])
    suite = get_twice_on_one_connection(https_server.port, context, "gateway.ztbank.example")
    get_twice_on_one_connection(https_server.port, context, "gateway.ztbank.example")

    first, second, third, _ = audit_records(https_server.audit)
    assert (first["event"], first["handshake"], first["decision"]) == ("authz", "success", "allow")
    assert first["sni"] == "gateway.ztbank.example"
    assert first["alpn"] == "http/1.1"  # the gateway speaks HTTP/1.1 only
    assert (first["cipher"], first["cipher_code"]) == (suite, TLS_SUITE_CODES[suite])
    assert first["cert_subject"] == material.leaf.subject.rfc4514_string()
    # One identifier per TLS connection: the same for both requests, new for the next one.
    assert len(first["session_id"]) == 16
    assert second["session_id"] == first["session_id"]
    assert third["session_id"] != first["session_id"]


def expired_or_future_svid(authority: Authority, *, hours: int) -> SvidMaterial:
    """A teller SVID of our CA whose whole validity lies ``hours`` away from now."""
    start = datetime.now(UTC) + timedelta(hours=hours)
    leaf = create_leaf(
        authority.signing_ca,
        uri_sans=[TELLER_ID],
        not_before=start,
        not_after=start + timedelta(minutes=5),
    )
    return SvidMaterial(
        spiffe_id=SpiffeId.parse(TELLER_ID),
        chain=(leaf.certificate, authority.signing_ca.certificate),
        key=leaf.key,
        bundle=authority.bundle,
    )


@pytest.mark.parametrize(
    ("hours", "rule"), [(-2, "certificate has expired"), (2, "certificate is not yet valid")]
)
def test_https_refused_handshake_names_the_rule_that_failed(
    authority: Authority, https_server: HttpsServer, hours: int, rule: str
) -> None:
    refusal(https_server.port, client_context(expired_or_future_svid(authority, hours=hours)))
    [record] = records_soon(https_server.audit, 1)
    assert (record["event"], record["handshake"], record["decision"]) == (
        "tls_handshake",
        "fail",
        "deny",
    )
    assert record["reason"] == f"TLS handshake failed: CERTIFICATE_VERIFY_FAILED: {rule}"
    assert len(record["session_id"]) == 16


def handshakes(metrics: InMemoryMetricReader) -> dict[tuple[str, str], int]:
    """Counts of ``tls.handshake.duration`` by (role, status)."""
    data = metrics.get_metrics_data()
    counted: dict[tuple[str, str], int] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != "tls.handshake.duration":
                    continue
                for point in metric.data.data_points:
                    assert isinstance(point, HistogramDataPoint)
                    attributes = dict(point.attributes or {})
                    key = (str(attributes["role"]), str(attributes["status"]))
                    counted[key] = counted.get(key, 0) + point.count
    return counted


def test_https_handshakes_are_measured_by_role_and_status(
    authority: Authority, https_server: HttpsServer, metrics: InMemoryMetricReader
) -> None:
    assert https_get(https_server.port, client_context(authority.svid(TELLER_ID))).status == 200
    refusal(https_server.port, client_context(expired_or_future_svid(authority, hours=-2)))
    records_soon(https_server.audit, 2)
    assert handshakes(metrics) == {("server", "success"): 1, ("server", "fail"): 1}


def test_grpc_client_connections_are_timed_by_outcome(
    authority: Authority, grpc_server: GrpcServer
) -> None:
    """grpcio hides its handshakes: the channel times its first connection (TCP, TLS, HTTP/2
    preface) from its connectivity states, READY as a success, a refused one as a failure."""
    reports: list[bool] = []
    started_before = time.perf_counter()

    def report(started: float, ok: bool) -> None:
        assert started >= started_before
        reports.append(ok)

    source = FakeSource(authority.svid(ENGINE_ID))
    good = MtlsChannel(source, lambda: grpc_server.target, "risk", on_connect=report)
    # A server whose certificate is not for "risk": every handshake of this channel fails.
    wrong_name = MtlsChannel(source, lambda: grpc_server.target, "ledger", on_connect=report)

    async def scenario() -> None:
        assert await aio_echo(good) == f"ping from {ENGINE_ID}".encode()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await aio_echo(wrong_name)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(0.1)  # the watcher sees the last state change
        await good.aclose()
        await wrong_name.aclose()

    asyncio.run(scenario())
    assert sorted(reports) == [False, True]


def test_https_keep_alive_connection_ends_when_the_client_svid_expires(
    authority: Authority, https_server: HttpsServer
) -> None:
    """Only new handshakes check validity: an open connection is closed (and audited) when the
    certificate it was opened with runs out."""
    now = datetime.now(UTC)
    leaf = create_leaf(
        authority.signing_ca,
        uri_sans=[TELLER_ID],
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(seconds=2),
    )
    material = SvidMaterial(
        spiffe_id=SpiffeId.parse(TELLER_ID),
        chain=(leaf.certificate, authority.signing_ca.certificate),
        key=leaf.key,
        bundle=authority.bundle,
    )
    connection = http.client.HTTPSConnection(
        "127.0.0.1", https_server.port, context=client_context(material), timeout=TIMEOUT
    )
    try:
        connection.request("GET", "/v1/accounts")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        not_after = leaf.certificate.not_valid_after_utc
        expired = records_soon(https_server.audit, 2)[-1]
        assert datetime.now(UTC) >= not_after - timedelta(seconds=0.5)
        assert (expired["decision"], expired["method"]) == ("deny", "TLS connection")
        assert expired["reason"] == "certificate expired: connection closed"
        assert expired["cert_serial"] == serial_hex(leaf.certificate)

        def ask_again() -> None:
            connection.request("GET", "/v1/accounts")
            connection.getresponse().read()

        with pytest.raises((ConnectionError, http.client.HTTPException, ssl.SSLError)):
            ask_again()
    finally:
        connection.close()


FULL_DISK = "audit log not writable: no space left on device"


def audit_fails(monkeypatch: pytest.MonkeyPatch, log: AuditLog) -> None:
    """The log's disk is full (what ``AuditLog`` raises then: tests/unit/common/test_audit.py)."""

    def full(_data: bytes) -> None:
        raise AuditWriteError(FULL_DISK)

    monkeypatch.setattr(log, "_append", full)


def test_https_request_whose_audit_cannot_be_written_is_refused_with_503_and_the_cause(
    authority: Authority,
    https_server: HttpsServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = client_context(authority.svid(TELLER_ID))
    audit_fails(monkeypatch, https_server.audit)

    reply = https_get(https_server.port, context)

    assert (reply.status, reply.content_type) == (503, "application/problem+json")
    assert reply.json()["detail"] == FULL_DISK
    assert "spiffe_id" not in reply.json()  # nothing of the app's answer left unaudited
    assert "Traceback" not in caplog.text
    assert f"refused GET /v1/accounts: {FULL_DISK}" in caplog.text
    monkeypatch.undo()  # space is back: served again, no restart
    assert https_get(https_server.port, context).status == 200


def test_grpc_call_whose_audit_cannot_be_written_is_unavailable_with_the_cause(
    authority: Authority,
    grpc_server: GrpcServer,
    client_to: ClientTo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    channel = client_to(authority.svid(ENGINE_ID))
    audit_fails(monkeypatch, grpc_server.audit)

    error = rpc_error(lambda: call_echo(channel))

    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, FULL_DISK)
    monkeypatch.undo()
    assert call_echo(channel) == f"ping from {ENGINE_ID}".encode()
