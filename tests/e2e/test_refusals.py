"""Who may not talk to whom: every service refuses every client that is not its one caller.

Each service is asked the same business question by each client: the gateway GET /v1/accounts
(with a valid customer token, so only the client's identity can make the difference), the
transfer-engine ListAccounts, risk Assess.  Bad certificates carry the SPIFFE ID of the service's
legitimate caller, so the ID alone would have been let in; a minted SVID of that ID is the
positive control.  What the client observes is asserted exactly, and that no data came back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2

from services._proto import ledger_pb2, risk_pb2
from services.common.identity.pem import fingerprint_sha256
from services.common.identity.workloads import GATEWAY, OPS, RISK, TELLER, TRANSFER_ENGINE
from tests.e2e.conftest import (
    RPC_TIMEOUT,
    AnyCredentials,
    Credentials,
    E2EStack,
    GatewayRefusedError,
    as_credentials,
)
from tests.support import pki
from tests.support.helpers import wait_until

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


@dataclass(frozen=True)
class Outcome:
    """What one client saw from one business call."""

    kind: str  # "closed" (no HTTP answer), "HTTP <status>", or a gRPC status name ("OK", ...)
    detail: str
    data: Any  # what the service answered with: None when refused
    local_port: int | None = None  # the client's end, gateway only


def _gateway_call(stack: E2EStack, credentials: AnyCredentials, token: str) -> Outcome:
    try:
        reply = stack.https(
            credentials, "GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"}
        )
    except GatewayRefusedError as refused:
        return Outcome("closed", str(refused), None, refused.local_port)
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


# What each client observes: the handshake-level refusals happen inside OpenSSL (grpcio sees
# the socket closed; Python's HTTP client sees the connection closed with no response, TLS 1.3
# reporting the server's alert only on the first read), the SPIFFE checks after it.
EXPECTED = {
    "no certificate": {"gateway": "closed", "grpc": "UNAVAILABLE"},
    "foreign CA": {"gateway": "closed", "grpc": "UNAVAILABLE"},
    "expired SVID": {"gateway": "closed", "grpc": "UNAVAILABLE"},
    "other trust domain": {"gateway": "closed", "grpc": "UNAUTHENTICATED"},
    "intruder": {"gateway": "HTTP 403", "grpc": "PERMISSION_DENIED"},
}


def spiffe_id_of(credentials: Credentials) -> str:
    san = credentials.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    (uri,) = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uri


def expected_kind(kind: str, service: str) -> str:
    return EXPECTED[kind]["gateway" if service == GATEWAY.name else "grpc"]


@pytest.mark.parametrize("service", SERVICES)
def test_legitimate_caller_with_a_minted_svid_is_served(
    stack: E2EStack, service: str, token: str, expired: Callable[[str], Credentials]
) -> None:
    """The control: the same path with a good SVID gets data, so the refusals below are about
    the one property each client breaks."""
    outcome = business_call(
        stack, service, make_client(stack, "legitimate caller", service, expired), token
    )
    assert outcome.kind == ("HTTP 200" if service == GATEWAY.name else "OK"), outcome
    assert outcome.data


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_client_is_refused(
    stack: E2EStack,
    service: str,
    kind: str,
    token: str,
    expired: Callable[[str], Credentials],
) -> None:
    client = make_client(stack, kind, service, expired)
    started = datetime.now(UTC)

    outcome = business_call(stack, service, client, token)

    assert outcome.kind == expected_kind(kind, service), outcome
    assert outcome.data is None

    # Refusals the services decide themselves (after the handshake) are audited as denials.
    method = METHOD_OF[service]
    if kind == "other trust domain":
        presented = spiffe_id_of(client)
        record = stack.wait_for_audit(
            service,
            lambda r: (
                r["decision"] == "deny"
                and presented in r["reason"]
                and (
                    r["source_port"] == outcome.local_port
                    if service == GATEWAY.name
                    else r["method"] == method
                )
            ),
            f"the {kind} refusal",
        )
        assert record["caller_spiffe_id"] is None, record
        assert record["reason"] == (
            f"invalid X509-SVID: leaf SPIFFE ID {presented} is not in trust domain "
            f"'{stack.trust_domain}'"
        )
        assert record["method"] == ("TLS handshake" if service == GATEWAY.name else method)
        assert datetime.fromisoformat(record["time"]) >= started - timedelta(seconds=1)
    elif kind == "intruder":
        intruder = f"spiffe://{stack.trust_domain}{INTRUDER_PATH}"
        assert intruder in outcome.detail
        record = stack.wait_for_audit(
            service,
            lambda r: r["cert_serial"] == client.serial and r["method"] == method,
            f"the {kind} refusal",
        )
        assert record["caller_spiffe_id"] == intruder
        assert record["cert_sha256"] == fingerprint_sha256(client.leaf)
        assert record["decision"] == "deny"
        assert record["reason"] == f"no policy rule allows {intruder} to call {service} {method}"


@pytest.mark.parametrize("kind", ["no certificate", "foreign CA", "expired SVID"])
def test_handshake_refusal_is_audited_at_the_gateway(
    stack: E2EStack, kind: str, token: str, expired: Callable[[str], Credentials]
) -> None:
    client = make_client(stack, kind, GATEWAY.name, expired)
    outcome = business_call(stack, GATEWAY.name, client, token)
    assert outcome.kind == "closed", outcome
    assert outcome.local_port is not None
    # The record would be written before the connection closes; a short poll is plenty.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if any(
            r["source_port"] == outcome.local_port and r["decision"] == "deny"
            for r in stack.audit(GATEWAY.name)
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no deny record at the gateway for the {kind} client")


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

    outcome = business_call(stack, service, svid, token)

    assert outcome.kind == ("HTTP 403" if service == GATEWAY.name else "PERMISSION_DENIED"), outcome
    assert outcome.data is None
    method = METHOD_OF[service]
    record = stack.wait_for_audit(
        service,
        lambda r: r["cert_serial"] == svid.serial and r["method"] == method,
        f"{caller} calling {service}",
    )
    assert (record["caller_spiffe_id"], record["decision"]) == (stack.spiffe_id(caller), "deny")
    assert record["cert_sha256"] == fingerprint_sha256(svid.leaf)


@pytest.mark.parametrize("service", SERVICES)
def test_ops_passes_the_health_check_only(stack: E2EStack, service: str, token: str) -> None:
    ops = stack.svid(OPS.name)

    health = health_check(stack, service, ops)

    if service == GATEWAY.name:
        assert (health.kind, health.data) == ("HTTP 200", {"status": "ok"})
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
    assert business.data is None
