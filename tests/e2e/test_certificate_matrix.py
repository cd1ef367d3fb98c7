"""The bad-certificate matrix: every X509-SVID rule of the verification function, at every
service, with certificates issued by the issuer's REAL signing CA.

OpenSSL accepts most of these chains (they do chain to the trust bundle); the services must
refuse them by the SPIFFE rules.  Each certificate carries the SPIFFE ID of the service's
legitimate caller, and a correctly built certificate from the same CA is the positive control,
so the broken rule alone makes the difference.  Also: TLS 1.0/1.1 and non-AEAD suites.
"""

from __future__ import annotations

import socket
import ssl
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.e2e.conftest import Credentials, E2EStack, tls_client_context
from tests.e2e.test_refusals import CALLER_OF, SERVICES, business_call
from tests.support import pki

pytestmark = pytest.mark.e2e

REFUSED_AT_GATEWAY = {"closed"}
# BoringSSL (grpcio) refuses some chains in the handshake (UNAVAILABLE); the interceptor
# refuses the rest by the SPIFFE rules (UNAUTHENTICATED).
REFUSED_BY_GRPC = {"UNAVAILABLE", "UNAUTHENTICATED"}
NOW = datetime.now(UTC)

# rule -> keyword arguments of tests.support.pki.create_leaf (uri_sans given per service)
Leaf = Callable[[str, str], dict[str, Any]]
RULES: dict[str, Leaf] = {
    "two URI SANs": lambda caller, td: {"uri_sans": [caller, f"spiffe://{td}/svc/other"]},
    "no URI SAN": lambda caller, td: {"uri_sans": [], "dns_sans": ["teller"]},
    "URI SAN not SPIFFE": lambda caller, td: {"uri_sans": ["https://teller.example/"]},
    "ID without a path": lambda caller, td: {"uri_sans": [f"spiffe://{td}"]},
    "ID not in strict syntax": lambda caller, td: {"uri_sans": [caller + "/"]},
    "leaf is a CA": lambda caller, td: {"uri_sans": [caller], "is_ca": True},
    "no basicConstraints": lambda caller, td: {"uri_sans": [caller], "basic_constraints": False},
    "keyUsage not critical": lambda caller, td: {
        "uri_sans": [caller],
        "key_usage": pki.KeyUsageSpec(digital_signature=True, critical=False),
    },
    "keyUsage keyCertSign": lambda caller, td: {
        "uri_sans": [caller],
        "key_usage": pki.KeyUsageSpec(digital_signature=True, key_cert_sign=True),
    },
    "keyUsage cRLSign": lambda caller, td: {
        "uri_sans": [caller],
        "key_usage": pki.KeyUsageSpec(digital_signature=True, crl_sign=True),
    },
    "keyUsage without digitalSignature": lambda caller, td: {
        "uri_sans": [caller],
        "key_usage": pki.KeyUsageSpec(key_encipherment=True),
    },
    "no keyUsage": lambda caller, td: {"uri_sans": [caller], "key_usage": None},
    "no extendedKeyUsage": lambda caller, td: {"uri_sans": [caller], "extended_key_usage": None},
    "extendedKeyUsage without clientAuth": lambda caller, td: {
        "uri_sans": [caller],
        "extended_key_usage": [ExtendedKeyUsageOID.SERVER_AUTH],
    },
    "RSA 1024 key": lambda caller, td: {"uri_sans": [caller], "key_type": "rsa-1024"},
    "expired": lambda caller, td: {
        "uri_sans": [caller],
        "not_before": NOW - timedelta(hours=2),
        "not_after": NOW - timedelta(hours=1),
    },
    "not yet valid": lambda caller, td: {
        "uri_sans": [caller],
        "not_before": NOW + timedelta(hours=1),
        "not_after": NOW + timedelta(hours=2),
    },
}


@pytest.fixture(scope="module")
def signing_ca(stack: E2EStack) -> pki.Issued:
    return stack.signing_ca()


@pytest.fixture(scope="module")
def token(stack: E2EStack) -> str:
    return stack.teller().token("alice")


def _credentials(stack: E2EStack, ca: pki.Issued, **leaf: Any) -> Credentials:
    bundle = stack.bundle_pem()
    leaf.setdefault("not_before", NOW - timedelta(minutes=1))
    leaf.setdefault("not_after", NOW + timedelta(minutes=30))
    return Credentials.signed(pki.create_leaf(ca, **leaf), bundle)


@pytest.mark.parametrize("service", SERVICES)
def test_a_well_formed_certificate_from_the_same_ca_is_served(
    stack: E2EStack, signing_ca: pki.Issued, token: str, service: str
) -> None:
    caller = stack.spiffe_id(CALLER_OF[service])
    outcome = business_call(
        stack, service, _credentials(stack, signing_ca, uri_sans=[caller]), token
    )
    assert outcome.kind in {"HTTP 200", "OK"}, outcome


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_every_svid_rule_is_enforced_at_every_service(
    stack: E2EStack, signing_ca: pki.Issued, token: str, service: str, rule: str
) -> None:
    caller = stack.spiffe_id(CALLER_OF[service])
    client = _credentials(stack, signing_ca, **RULES[rule](caller, stack.trust_domain))

    outcome = business_call(stack, service, client, token)

    refused = REFUSED_AT_GATEWAY if service == "gateway" else REFUSED_BY_GRPC
    assert outcome.kind in refused, outcome
    assert outcome.data is None


def _handshake(stack: E2EStack, service: str, context: ssl.SSLContext) -> str:
    """The negotiated protocol version, or raise ssl.SSLError/OSError if refused."""
    address = stack.addresses[service]
    with (
        socket.create_connection((address.host, address.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        return str(tls.version())


def _client(stack: E2EStack, service: str, alpn: list[str]) -> ssl.SSLContext:
    return tls_client_context(stack.mint(stack.spiffe_id(CALLER_OF[service])), alpn)


def _alpn(service: str) -> list[str]:
    return ["http/1.1"] if service == "gateway" else ["h2"]


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_legacy_tls_versions_are_refused(stack: E2EStack, service: str, version: str) -> None:
    context = _client(stack, service, _alpn(service))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = getattr(ssl.TLSVersion, version)
        context.minimum_version = legacy
        context.maximum_version = legacy
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer them otherwise
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(stack, service, context)


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize(
    "cipher", ["ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "ECDHE-ECDSA-AES128-SHA"]
)
def test_tls12_without_aead_is_refused(stack: E2EStack, service: str, cipher: str) -> None:
    context = _client(stack, service, _alpn(service))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(cipher)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _handshake(stack, service, context)


@pytest.mark.parametrize("service", SERVICES)
def test_tls12_with_aead_and_tls13_are_accepted(stack: E2EStack, service: str) -> None:
    context = _client(stack, service, _alpn(service))
    assert _handshake(stack, service, context) == "TLSv1.3"
    context = _client(stack, service, _alpn(service))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    assert _handshake(stack, service, context) == "TLSv1.2"


def test_the_mis_issued_lab_shows_every_case_refused_and_audited(stack: E2EStack) -> None:
    """`ztbank lab mis-issued` (`make lab-mis-issued`): what a trainer runs in class."""
    result = stack.cli("lab", "mis-issued")
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [line for line in result.stdout.splitlines() if line[:5].strip().isdigit()]
    assert len(cases) == 10, result.stdout
    assert all(" ok  " in line for line in cases), result.stdout
    assert cases[0].endswith("control: a well-formed SVID from the same CA: HTTP 200")
    assert all("audited: " in line for line in cases[1:]), result.stdout
    assert "exactly one URI SAN, found 2" in result.stdout
    assert "no policy rule allows" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("lab passed: 9 mis-issued certificates")
    assert result.stderr == ""
