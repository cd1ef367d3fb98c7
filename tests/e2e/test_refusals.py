"""Who may not talk to whom: every service refuses every client that is not its one caller, and
every refusal is asserted by its cause, not only by the client having been turned away.

Each service is asked the same business question by each client: the gateway GET /v1/accounts
(with a valid customer token, so only the client's identity can make the difference), the
transfer-engine ListAccounts, risk Assess.  Bad certificates carry the SPIFFE ID of the service's
legitimate caller, so the ID alone would have been let in; a minted SVID of that ID is the
positive control.

Where the cause of a refusal shows (found on this stack, asserted exactly below):

* No ztbank server sends a TLS alert when it refuses a handshake.  The gateway's asyncio TLS
  layer drops the alert OpenSSL wrote (``SSLProtocol`` closes the transport on a handshake error
  without flushing its outgoing BIO) and the guard then aborts the TCP connection; grpcio's core
  closes a refused connection without writing BoringSSL's alert either.  A client, which in TLS
  1.3 completes its own handshake before the server checks its certificate, sees the connection
  closed with no alert, no close_notify and no answer.
* The gateway audits every refusal with its cause (``event: tls_handshake`` records, found by the
  client's port): OpenSSL's reason for a handshake it refused, the X509-SVID rule that failed
  after the handshake, or the policy decision for a request.
* A gRPC service audits what reaches its interceptor, and the client gets the same cause: the
  status and detail of the call.  A handshake that BoringSSL refuses (no certificate, an unknown
  CA, an expired certificate, a purpose it rejects) never reaches Python: there is no audit
  record of it, and its cause is only in the service's log, written by grpc's TLS layer.  That
  line is asserted where the stack's logs are files on this machine (native stacks); the
  connection itself shows only that the server accepted TCP, let the client finish its handshake
  and then hung up without sending the HTTP/2 SETTINGS an accepted connection starts with.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2

from services._proto import ledger_pb2, risk_pb2
from services.common.identity.pem import certificates_to_pem, fingerprint_sha256
from services.common.identity.workloads import GATEWAY, OPS, RISK, TELLER, TRANSFER_ENGINE
from services.common.mtls.contexts import TLS12_AEAD_CIPHERS
from tests.e2e.conftest import (
    FILE_TIMEOUT,
    RPC_TIMEOUT,
    AnyCredentials,
    Credentials,
    E2EStack,
    GatewayRefusedError,
    as_credentials,
    tls_client_context,
)
from tests.support import pki
from tests.support.helpers import wait_until
from tests.support.tls_wire import (
    AlertDescription,
    Listened,
    handshake_and_listen,
    loopback_server,
    received_alert,
    starts_with_http2_settings,
)

pytestmark = pytest.mark.e2e

SERVICES = (GATEWAY.name, TRANSFER_ENGINE.name, RISK.name)
# infra/policy.json: teller -> gateway -> transfer-engine -> risk, and nothing else.
CALLER_OF = {
    GATEWAY.name: TELLER.name,
    TRANSFER_ENGINE.name: GATEWAY.name,
    RISK.name: TRANSFER_ENGINE.name,
}
METHOD_OF = {
    GATEWAY.name: "GET /v1/accounts",
    TRANSFER_ENGINE.name: "/ztbank.ledger.v1.TransferEngine/ListAccounts",
    RISK.name: "/ztbank.risk.v1.Risk/Assess",
}
HEALTH_METHOD = "/grpc.health.v1.Health/Check"
HANDSHAKE_METHOD = "TLS handshake"  # the gateway's method name for a refused connection
INTRUDER_PATH = "/env/prod/zone/az1/team/x/svc/intruder"
EXPIRED_TTL_SECONDS = 5  # the issuer's minimum
# A transfer that names no real account, so asking risk leaves the ledger's velocity alone.
PROBE_ASSESSMENT = risk_pb2.AssessRequest(
    transfer_id="tr-e2e-probe",
    customer="alice",
    from_account="acc-e2e-probe-from",
    to_account="acc-e2e-probe-to",
    amount_minor=100,
    currency="CNY",
)
# How a server that refused a connection after the client's TLS 1.3 handshake ends it: TCP's
# FIN ("eof"), a reset when the rest of the client's flight arrived after the close, or a bare
# close_notify (grpc's TLS on the compose network).  None carries an alert or an answer; which
# one is a matter of timing.
HUNG_UP = {"eof", "reset", "close_notify"}


@dataclass(frozen=True)
class Outcome:
    """What one client saw from one business call."""

    kind: str  # "closed" (no HTTP answer), "HTTP <status>", or a gRPC status name ("OK", ...)
    detail: str  # the problem's detail, the gRPC status details, or why the connection closed
    data: Any  # what the service answered with: None when refused
    local_port: int | None = None  # the client's end, gateway only
    stage: str = ""  # "closed" only: "handshake" or "request", as GatewayRefusedError says
    alert: AlertDescription | None = None  # "closed" only: the alert the gateway sent, if any


def _gateway_call(stack: E2EStack, credentials: AnyCredentials, token: str) -> Outcome:
    try:
        reply = stack.https(
            credentials, "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"}
        )
    except GatewayRefusedError as refused:
        error = refused.error
        alert = received_alert(error) if isinstance(error, ssl.SSLError) else None
        return Outcome("closed", str(refused), None, refused.local_port, refused.stage, alert)
    if reply.status == 200:
        return Outcome("HTTP 200", "", reply.body, reply.local_port)
    assert reply.is_problem, reply
    assert set(reply.body) <= {"type", "title", "status", "detail", "instance"}, reply.body
    return Outcome(f"HTTP {reply.status}", str(reply.body.get("detail")), None, reply.local_port)


def _grpc_call(stack: E2EStack, service: str, credentials: AnyCredentials, method: str) -> Outcome:
    request: Any
    response: Any
    if method == HEALTH_METHOD:
        request, response = (
            health_pb2.HealthCheckRequest(service=""),
            health_pb2.HealthCheckResponse,
        )
    elif service == TRANSFER_ENGINE.name:
        request, response = (
            ledger_pb2.ListAccountsRequest(customer="alice"),
            ledger_pb2.ListAccountsResponse,
        )
    else:
        request, response = PROBE_ASSESSMENT, risk_pb2.Assessment
    # Plain multicallables rather than generated stubs, and only while the channel is open.
    with stack.grpc_channel(service, credentials) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        try:
            reply = call(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):  # every unary call error is one
                raise
            return Outcome(error.code().name, error.details() or "", None)
    return Outcome("OK", "", reply)


def business_call(
    stack: E2EStack, service: str, credentials: AnyCredentials, token: str
) -> Outcome:
    if service == GATEWAY.name:
        return _gateway_call(stack, credentials, token)
    return _grpc_call(stack, service, credentials, METHOD_OF[service])


def health_check(stack: E2EStack, service: str, credentials: AnyCredentials) -> Outcome:
    if service == GATEWAY.name:
        reply = stack.https(credentials, "GET", "/healthz")
        return Outcome(f"HTTP {reply.status}", "", reply.body, reply.local_port)
    return _grpc_call(stack, service, credentials, HEALTH_METHOD)


# -- evidence of a refusal -------------------------------------------------------------------


class AuditSince:
    """The records a service writes from now on: its audit log only ever grows, so records of
    earlier connections (an earlier client on the same port) are never mistaken for ours."""

    def __init__(self, stack: E2EStack, service: str) -> None:
        self.stack = stack
        self.service = service
        self.start = len(stack.audit(service))

    def records(self) -> list[dict[str, Any]]:
        return self.stack.audit(self.service)[self.start :]

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in self.records() if match(r)), None)

        return wait_until(
            found,
            timeout=FILE_TIMEOUT,
            message=lambda: (
                f"no audit record at {self.service} for {what}; records since:\n"
                + "\n".join(str(r) for r in self.records()[-5:])
            ),
        )


GRPC_HANDSHAKE_FAILED = "Handshake failed with error"  # grpc's own log line (its TLS layer)


class HandshakeLog:
    """The lines in which grpc's TLS layer logs a handshake it refused at a gRPC service, from
    now on: the only place the cause of such a refusal is written (it never reaches the
    interceptor).  grpc writes them at INFO level, by default.  Read where the stack's logs
    are files here (a native stack's ``ZTBANK_HOME/log``, its processes started with this
    environment); beside the compose stack they are the containers' output, and with
    GRPC_VERBOSITY above INFO there are none: ``expect`` then checks nothing."""

    def __init__(self, stack: E2EStack, service: str) -> None:
        native = stack.settings.stack_kind == "native"
        quiet = os.environ.get("GRPC_VERBOSITY", "").upper() in {"ERROR", "NONE"}
        self.path: Path | None = (
            stack.settings.home_of(service) / "log" / f"{service}.log"
            if native and not quiet
            else None
        )
        self.service = service
        self.start = len(self._lines())

    def _lines(self) -> list[str]:
        if self.path is None:
            return []
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if GRPC_HANDSHAKE_FAILED in line]

    def expect(self, cause: str) -> None:
        """Wait for a new line stating ``cause`` (e.g. ``CERTIFICATE_VERIFY_FAILED: certificate
        has expired``, BoringSSL's reason and verify message)."""
        if self.path is None:
            return
        wait_until(
            lambda: any(cause in line for line in self._lines()[self.start :]),
            timeout=FILE_TIMEOUT,
            message=lambda: (
                f"{self.service} logged no refused handshake for {cause!r}; its last ones:\n"
                + "\n".join(self._lines()[-3:])
            ),
        )


def alpn(service: str) -> list[str]:
    return ["http/1.1"] if service == GATEWAY.name else ["h2"]


def tls13_probe(stack: E2EStack, service: str, credentials: AnyCredentials) -> Listened:
    """A TLS 1.3 connection presenting ``credentials``, then one read: what did the server do
    once the client's handshake was complete?"""
    context = tls_client_context(credentials, alpn(service))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    address = stack.addresses[service]
    return handshake_and_listen(
        address.host,
        address.port,
        context,
        server_hostname=None if service == GATEWAY.name else service,
        timeout=RPC_TIMEOUT,
    )


def accepted_by_grpc(stack: E2EStack, service: str, credentials: AnyCredentials) -> None:
    """The wire's positive control: a connection the server accepts starts with its SETTINGS."""
    seen = tls13_probe(stack, service, credentials)
    assert (seen.stage, seen.ended) == ("after handshake", "data"), str(seen)
    assert starts_with_http2_settings(seen.data), str(seen)


def never_audited(stack: E2EStack, audit: AuditSince, local_port: int) -> None:
    """No record of the connection from ``local_port``: a legitimate call made after it is
    audited (so the log is being written, in order), and no record names that port."""
    service = audit.service
    control = stack.mint(stack.spiffe_id(CALLER_OF[service]))
    assert business_call(stack, service, control, "").kind == "OK"
    audit.wait_for(lambda r: r["cert_serial"] == control.serial, "the control call after it")
    assert [r for r in audit.records() if r["source_port"] == local_port] == []


def refused_by_grpc_tls(
    stack: E2EStack, service: str, credentials: AnyCredentials, cause: str
) -> Listened:
    """A handshake the gRPC service's TLS layer refuses, with all the evidence there is: the
    client's TLS 1.3 handshake completes, then the server hangs up (no alert, no SETTINGS);
    nothing is audited; the service's log states ``cause``."""
    log = HandshakeLog(stack, service)
    audit = AuditSince(stack, service)
    seen = tls13_probe(stack, service, credentials)
    assert seen.stage == "after handshake", str(seen)
    assert (seen.ended in HUNG_UP, seen.alert, seen.data) == (True, None, b""), str(seen)
    log.expect(cause)
    never_audited(stack, audit, seen.local_port)
    return seen


def refused_at_the_gateway(outcome: Outcome, audit: AuditSince, what: str) -> dict[str, Any]:
    """A connection the gateway refused: the client finished its TLS 1.3 handshake, then the
    connection closed with no alert and no HTTP answer; the gateway's record of it, found by
    the client's port, is returned for its reason."""
    assert (outcome.kind, outcome.stage, outcome.alert) == ("closed", "request", None), outcome
    assert outcome.data is None
    record = audit.wait_for(lambda r: r["source_port"] == outcome.local_port, what)
    assert (record["decision"], record["method"]) == ("deny", HANDSHAKE_METHOD), record
    assert (record["event"], record["handshake"]) == ("tls_handshake", "fail"), record
    return record


# -- clients -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token(stack: E2EStack) -> str:
    """A valid customer token (10 min): only the client certificate differs between clients."""
    return stack.teller().token("alice")


@pytest.fixture(scope="module")
def expired(stack: E2EStack) -> Callable[[str], Credentials]:
    """Issuer-minted SVIDs of each service's legitimate caller, waited out until expired."""
    minted = {
        service: stack.mint(stack.spiffe_id(caller), ttl_seconds=EXPIRED_TTL_SECONDS)
        for service, caller in CALLER_OF.items()
    }

    def get(service: str) -> Credentials:
        credentials = minted[service]
        wait_until(
            lambda: datetime.now(UTC) > credentials.not_after + timedelta(seconds=1),
            timeout=EXPIRED_TTL_SECONDS + 5,
            message="the minted SVID did not expire",
            interval=0.2,
        )
        return credentials

    return get


def make_client(
    stack: E2EStack, kind: str, service: str, expired: Callable[[str], Credentials]
) -> Credentials:
    bundle = stack.bundle_pem()
    caller_id = stack.spiffe_id(CALLER_OF[service])
    match kind:
        case "no certificate":
            return Credentials(bundle)
        case "foreign CA":
            # Same trust domain name, same workload ID, but not our CA.
            foreign = pki.create_root_ca(trust_domain=stack.trust_domain)
            return Credentials.signed(pki.create_leaf(foreign, uri_sans=[caller_id]), bundle)
        case "expired SVID":
            return expired(service)
        case "other trust domain":
            # Signed by the issuer's REAL signing CA (in the bundle, chained to the real root,
            # whichever upstream holds it), but not our domain.
            evil_id = caller_id.replace(f"spiffe://{stack.trust_domain}/", "spiffe://evil.example/")
            signer = stack.signing_ca()
            return Credentials.signed(pki.create_leaf(signer, uri_sans=[evil_id]), bundle)
        case "intruder":
            return stack.mint(f"spiffe://{stack.trust_domain}{INTRUDER_PATH}")
        case "legitimate caller":
            return stack.mint(caller_id)
    raise AssertionError(kind)


# Refused in the TLS handshake, by OpenSSL at the gateway and by BoringSSL at the gRPC services:
# the gateway's audited reason, and the gRPC services' logged cause.
HANDSHAKE_REFUSALS = {
    "no certificate": (
        "TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE",
    ),
    "foreign CA": (
        "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
        "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    ),
    "expired SVID": (
        "TLS handshake failed: CERTIFICATE_VERIFY_FAILED: certificate has expired",
        "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: certificate has expired",
    ),
}
KINDS = [*HANDSHAKE_REFUSALS, "other trust domain", "intruder"]


def spiffe_id_of(credentials: Credentials) -> str:
    san = credentials.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    (uri,) = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


# What a plain OpenSSL server with the same rules answers each of those clients in TLS 1.3.
OPENSSL_ALERTS = {
    "no certificate": AlertDescription.CERTIFICATE_REQUIRED,
    "foreign CA": AlertDescription.UNKNOWN_CA,
    "expired SVID": AlertDescription.CERTIFICATE_EXPIRED,
}


@pytest.mark.parametrize("kind", list(OPENSSL_ALERTS))
def test_the_probe_hears_the_alert_a_plain_openssl_server_sends(kind: str) -> None:
    """The control of ``tls13_probe``'s "no alert" below: against a blocking OpenSSL server
    that requires a client certificate of its CA, the same kind of client hears the server's
    alert, read as the server's (the client's own handshake had completed)."""
    ca = pki.create_root_ca()
    now = datetime.now(UTC)
    issued = {
        "no certificate": None,
        "foreign CA": pki.create_leaf(pki.create_root_ca()),
        "expired SVID": pki.create_leaf(
            ca, not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1)
        ),
    }[kind]
    with loopback_server(
        minimum_version=ssl.TLSVersion.TLSv1_2,
        ciphers=TLS12_AEAD_CIPHERS,
        client_ca_pem=certificates_to_pem([ca.certificate]),
    ) as server:
        bundle = server.certificate_pem
        client = Credentials(bundle) if issued is None else Credentials.signed(issued, bundle)
        context = tls_client_context(client, ["h2"])
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        seen = handshake_and_listen(server.host, server.port, context, timeout=RPC_TIMEOUT)
    assert (seen.stage, seen.ended, seen.alert) == (
        "after handshake",
        "alert",
        OPENSSL_ALERTS[kind],
    )


@pytest.mark.parametrize("service", SERVICES)
def test_legitimate_caller_with_a_minted_svid_is_served(
    stack: E2EStack, service: str, token: str, expired: Callable[[str], Credentials]
) -> None:
    """The control: the same path with a good SVID gets data, so the refusals below are about
    the one property each client breaks; at a gRPC service the same SVID's connection starts
    with the server's HTTP/2 SETTINGS, which a refused one never gets."""
    client = make_client(stack, "legitimate caller", service, expired)
    audit = AuditSince(stack, service)

    outcome = business_call(stack, service, client, token)

    assert outcome.kind == ("HTTP 200" if service == GATEWAY.name else "OK"), outcome
    assert outcome.data
    record = audit.wait_for(lambda r: r["cert_serial"] == client.serial, "the allowed call")
    assert (record["decision"], record["method"]) == ("allow", METHOD_OF[service])
    if service != GATEWAY.name:
        accepted_by_grpc(stack, service, client)


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_client_is_refused_for_its_own_cause(
    stack: E2EStack,
    service: str,
    kind: str,
    token: str,
    expired: Callable[[str], Credentials],
) -> None:
    client = make_client(stack, kind, service, expired)
    method = METHOD_OF[service]
    if kind in HANDSHAKE_REFUSALS and service != GATEWAY.name:
        # First on a connection of our own (its log line is ours), then as a grpcio client,
        # which learns no more than from a service that is down.
        refused_by_grpc_tls(stack, service, client, HANDSHAKE_REFUSALS[kind][1])
    audit = AuditSince(stack, service)

    outcome = business_call(stack, service, client, token)

    assert outcome.data is None
    if kind in HANDSHAKE_REFUSALS:
        if service == GATEWAY.name:
            record = refused_at_the_gateway(outcome, audit, f"the {kind} client")
            assert record["reason"] == HANDSHAKE_REFUSALS[kind][0]
            assert (record["caller_spiffe_id"], record["cert_serial"]) == (None, None)
            assert record["tls_version"] is None  # no version was agreed: the handshake failed
        else:
            assert outcome.kind == "UNAVAILABLE", outcome
    elif kind == "other trust domain":
        presented = spiffe_id_of(client)
        reason = (
            f"invalid X509-SVID: leaf SPIFFE ID {presented} is not in trust domain "
            f"'{stack.trust_domain}'"
        )
        if service == GATEWAY.name:
            record = refused_at_the_gateway(outcome, audit, f"the {kind} client")
            assert record["tls_version"] == "TLSv1.3"  # refused after the handshake
        else:
            assert (outcome.kind, outcome.detail) == ("UNAUTHENTICATED", reason)
            record = audit.wait_for(lambda r: presented in r["reason"], f"the {kind} client")
            assert (record["decision"], record["method"]) == ("deny", method)
        assert record["reason"] == reason
        assert record["caller_spiffe_id"] is None, record
        assert record["cert_subject"] == client.leaf.subject.rfc4514_string()
    else:  # intruder: a valid SVID of the trust domain that the policy does not name
        intruder = f"spiffe://{stack.trust_domain}{INTRUDER_PATH}"
        reason = f"no policy rule allows {intruder} to call {service} {method}"
        expected = "HTTP 403" if service == GATEWAY.name else "PERMISSION_DENIED"
        assert (outcome.kind, outcome.detail) == (expected, reason)
        record = audit.wait_for(
            lambda r: r["cert_serial"] == client.serial and r["method"] == method,
            f"the {kind} refusal",
        )
        assert record["caller_spiffe_id"] == intruder
        assert record["cert_sha256"] == fingerprint_sha256(client.leaf)
        assert (record["decision"], record["reason"]) == ("deny", reason)


# -- the policy chain ------------------------------------------------------------------------

CALLERS = (TELLER.name, GATEWAY.name, TRANSFER_ENGINE.name, RISK.name, OPS.name)
REFUSED_PAIRS = [
    (caller, service) for caller in CALLERS for service in SERVICES if CALLER_OF[service] != caller
]


@pytest.mark.parametrize(
    ("caller", "service"), REFUSED_PAIRS, ids=[f"{c}->{s}" for c, s in REFUSED_PAIRS]
)
def test_workload_outside_the_policy_chain_is_refused(
    stack: E2EStack, caller: str, service: str, token: str
) -> None:
    svid = stack.svid(caller)
    method = METHOD_OF[service]
    reason = f"no policy rule allows {stack.spiffe_id(caller)} to call {service} {method}"
    audit = AuditSince(stack, service)

    outcome = business_call(stack, service, svid, token)

    expected = "HTTP 403" if service == GATEWAY.name else "PERMISSION_DENIED"
    assert (outcome.kind, outcome.detail) == (expected, reason)
    assert outcome.data is None
    record = audit.wait_for(
        lambda r: r["cert_serial"] == svid.serial and r["method"] == method,
        f"{caller} calling {service}",
    )
    assert (record["caller_spiffe_id"], record["decision"]) == (stack.spiffe_id(caller), "deny")
    assert (record["reason"], record["event"]) == (reason, "authz")
    assert record["cert_sha256"] == fingerprint_sha256(svid.leaf)


@pytest.mark.parametrize("service", SERVICES)
def test_ops_passes_the_health_check_only(stack: E2EStack, service: str, token: str) -> None:
    ops = stack.svid(OPS.name)

    health = health_check(stack, service, ops)

    if service == GATEWAY.name:
        # /healthz answers as /readyz (commit a87f4de): {"status": "ready"}.
        assert (health.kind, health.data) == ("HTTP 200", {"status": "ready"})
        # Nor can ops mint itself a customer token.
        tokens = stack.https(ops, "POST", "/v1/tokens", body={"customer": "alice"})
        assert (tokens.status, tokens.is_problem) == (403, True), tokens
        assert "access_token" not in tokens.body
    else:
        assert health.kind == "OK", health
        assert health.data.status == health_pb2.HealthCheckResponse.SERVING
    method = "GET /healthz" if service == GATEWAY.name else HEALTH_METHOD
    record = stack.wait_for_audit(
        service,
        lambda r: r["cert_serial"] == ops.serial and r["method"] == method,
        f"ops health check at {service}",
    )
    assert (record["decision"], record["reason"]) == ("allow", "health check")

    business = business_call(stack, service, as_credentials(ops), token)
    assert business.kind == ("HTTP 403" if service == GATEWAY.name else "PERMISSION_DENIED")
    ops_id = stack.spiffe_id(OPS.name)
    assert (
        business.detail == f"no policy rule allows {ops_id} to call {service} {METHOD_OF[service]}"
    )
    assert business.data is None
