"""The bad-certificate matrix: every X509-SVID rule of the verification function, at every
service, with certificates issued by the issuer's REAL signing CA; then TLS versions and suites.

OpenSSL accepts most of these chains (they do chain to the trust bundle); the services must
refuse them by the SPIFFE rules.  Each certificate carries the SPIFFE ID of the service's
legitimate caller, and a correctly built certificate from the same CA is the positive control,
so the broken rule alone makes the difference.  Each refusal is asserted by its cause, as the
service states it (tests/e2e/test_refusals.py says where that is):

* the gateway: its audit record of the connection (found by the client's port) — OpenSSL's
  verify message for what its handshake refuses, the X509-SVID rule for what it refuses after;
* a gRPC service, for what reaches the interceptor: the call's UNAUTHENTICATED status and detail
  and the audit record with the same reason (found by the certificate's unique subject);
* a gRPC service, for what BoringSSL refuses in the handshake (a purpose it rejects, validity):
  no alert, no audit record, the cause in grpc's log line (native stacks).

TLS 1.0/1.1 and TLS 1.2 without AEAD are tested with ClientHellos written byte by byte
(tests/support/tls_wire.py) and sent over a plain socket, so what is offered does not depend on
what this machine's OpenSSL agrees to send, and the server's answer is read off the wire.  A
loopback OpenSSL server that accepts legacy TLS answers the same bytes with a ServerHello of
that version and suite (they offer what they say); one with ztbank's own policy refuses them with
the alert RFC 8446 names.  ztbank's servers send no alert at all (a product gap, reported): they
close the connection; the gateway audits OpenSSL's reason, the gRPC services log it.
"""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common.identity.workloads import GATEWAY
from services.common.mtls.contexts import TLS12_AEAD_CIPHERS
from tests.e2e.conftest import Credentials, E2EStack, tls_client_context
from tests.e2e.test_refusals import (
    CALLER_OF,
    METHOD_OF,
    SERVICES,
    AuditSince,
    HandshakeLog,
    alpn,
    business_call,
    never_audited,
    refused_at_the_gateway,
    refused_by_grpc_tls,
)
from tests.support import pki, tls_wire
from tests.support.tls_wire import AlertDescription, AlertLevel, ServerHello, Version

pytestmark = pytest.mark.e2e

NOW = datetime.now(UTC)

# rule -> keyword arguments of tests.support.pki.create_leaf (uri_sans given per service)
Leaf = Callable[[str, str], dict[str, Any]]


@dataclass(frozen=True)
class Rule:
    """A broken certificate and who refuses it, saying what.

    ``openssl``: OpenSSL's reason (and verify message) when the gateway's handshake refuses it;
    ``boringssl``: BoringSSL's when the gRPC services' handshake does (grpcio's TLS).
    ``svid``: the message of ztbank's X509-SVID verifier, which refuses it after a handshake
    that let it through; ``{caller}`` and ``{td}`` in it are the certificate's SPIFFE ID and
    the trust domain.
    """

    leaf: Leaf
    svid: str | None = None
    openssl: str | None = None
    boringssl: str | None = None

    def __post_init__(self) -> None:
        assert self.svid is not None or (self.openssl and self.boringssl), self


RULES: dict[str, Rule] = {
    "two URI SANs": Rule(
        lambda caller, td: {"uri_sans": [caller, f"spiffe://{td}/svc/other"]},
        svid="leaf must have exactly one URI SAN, found 2",
    ),
    "no URI SAN": Rule(
        lambda caller, td: {"uri_sans": [], "dns_sans": ["teller"]},
        svid="leaf must have exactly one URI SAN, found 0",
    ),
    "URI SAN not SPIFFE": Rule(
        lambda caller, td: {"uri_sans": ["https://teller.example/"]},
        svid="leaf URI SAN is not a valid SPIFFE ID: 'https://teller.example/' is not a SPIFFE"
        " ID: it must start with spiffe://",
    ),
    "ID without a path": Rule(
        lambda caller, td: {"uri_sans": [f"spiffe://{td}"]},
        svid="leaf SPIFFE ID spiffe://{td} has no path: a trust domain ID names no workload",
    ),
    "ID not in strict syntax": Rule(
        lambda caller, td: {"uri_sans": [caller + "/"]},
        svid="leaf URI SAN is not a valid SPIFFE ID: '{caller}/' is not a valid SPIFFE ID: path"
        " has an empty segment or a trailing '/'",
    ),
    "leaf is a CA": Rule(
        lambda caller, td: {"uri_sans": [caller], "is_ca": True},
        svid="leaf is a CA certificate (basicConstraints cA=true)",
    ),
    "no basicConstraints": Rule(
        lambda caller, td: {"uri_sans": [caller], "basic_constraints": False},
        svid="leaf has no basicConstraints extension",
    ),
    "keyUsage not critical": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "key_usage": pki.KeyUsageSpec(digital_signature=True, critical=False),
        },
        svid="leaf keyUsage is not marked critical",
    ),
    "keyUsage keyCertSign": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "key_usage": pki.KeyUsageSpec(digital_signature=True, key_cert_sign=True),
        },
        svid="leaf keyUsage includes keyCertSign",
    ),
    "keyUsage cRLSign": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "key_usage": pki.KeyUsageSpec(digital_signature=True, crl_sign=True),
        },
        svid="leaf keyUsage includes cRLSign",
    ),
    # An EC key without digitalSignature: grpcio's own BoringSSL will not even load it as a
    # client certificate, so the servers are asked with Python's ssl (OpenSSL) instead; the
    # gRPC servers' BoringSSL refuses the key's use for the handshake signature itself.
    "keyUsage without digitalSignature": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "key_usage": pki.KeyUsageSpec(key_encipherment=True),
        },
        openssl="CERTIFICATE_VERIFY_FAILED: unsuitable certificate purpose",
        boringssl="KEY_USAGE_BIT_INCORRECT",
    ),
    "no keyUsage": Rule(
        lambda caller, td: {"uri_sans": [caller], "key_usage": None},
        svid="leaf has no keyUsage extension",
    ),
    "no extendedKeyUsage": Rule(
        lambda caller, td: {"uri_sans": [caller], "extended_key_usage": None},
        svid="leaf has no extendedKeyUsage extension",
    ),
    "extendedKeyUsage without clientAuth": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "extended_key_usage": [ExtendedKeyUsageOID.SERVER_AUTH],
        },
        openssl="CERTIFICATE_VERIFY_FAILED: unsuitable certificate purpose",
        boringssl="CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose",
    ),
    # The gateway's OpenSSL (security level 2) refuses the key in the handshake; BoringSSL lets
    # it through to the X509-SVID rules.
    "RSA 1024 key": Rule(
        lambda caller, td: {"uri_sans": [caller], "key_type": "rsa-1024"},
        svid="leaf key too weak: RSA 1024 bits, at least 2048 required",
        openssl="CERTIFICATE_VERIFY_FAILED: EE certificate key too weak",
    ),
    "expired": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "not_before": NOW - timedelta(hours=2),
            "not_after": NOW - timedelta(hours=1),
        },
        openssl="CERTIFICATE_VERIFY_FAILED: certificate has expired",
        boringssl="CERTIFICATE_VERIFY_FAILED: certificate has expired",
    ),
    "not yet valid": Rule(
        lambda caller, td: {
            "uri_sans": [caller],
            "not_before": NOW + timedelta(hours=1),
            "not_after": NOW + timedelta(hours=2),
        },
        openssl="CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
        boringssl="CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
    ),
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


def _unique_name() -> str:
    """A certificate's subject CN found in no other record: names the connection's record."""
    return f"ztbank e2e {secrets.token_hex(6)}"


@pytest.mark.parametrize("service", SERVICES)
def test_a_well_formed_certificate_from_the_same_ca_is_served(
    stack: E2EStack, signing_ca: pki.Issued, token: str, service: str
) -> None:
    caller = stack.spiffe_id(CALLER_OF[service])
    name = _unique_name()
    client = _credentials(stack, signing_ca, uri_sans=[caller], common_name=name)
    audit = AuditSince(stack, service)

    outcome = business_call(stack, service, client, token)

    assert outcome.kind in {"HTTP 200", "OK"}, outcome
    record = audit.wait_for(lambda r: r["cert_serial"] == client.serial, "the control")
    assert (record["decision"], record["method"]) == ("allow", METHOD_OF[service])
    assert (record["caller_spiffe_id"], record["cert_subject"]) == (caller, f"CN={name}")


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_every_svid_rule_is_enforced_at_every_service(
    stack: E2EStack, signing_ca: pki.Issued, token: str, service: str, rule: str
) -> None:
    caller = stack.spiffe_id(CALLER_OF[service])
    expected = RULES[rule]
    name = _unique_name()
    client = _credentials(
        stack, signing_ca, common_name=name, **expected.leaf(caller, stack.trust_domain)
    )
    svid_reason = None
    if expected.svid is not None:
        rule_text = expected.svid.format(caller=caller, td=stack.trust_domain)
        svid_reason = f"invalid X509-SVID: {rule_text}"
    audit = AuditSince(stack, service)

    if service == GATEWAY.name:
        outcome = business_call(stack, service, client, token)
        record = refused_at_the_gateway(outcome, audit, f"the {rule} client")
        if expected.openssl is not None:
            assert record["reason"] == f"TLS handshake failed: {expected.openssl}"
            assert (record["tls_version"], record["cert_subject"]) == (None, None)
        else:
            assert record["reason"] == svid_reason
            # Refused after the handshake: the connection's facts and the certificate's subject.
            assert (record["tls_version"], record["cert_subject"]) == ("TLSv1.3", f"CN={name}")
        assert (record["caller_spiffe_id"], record["cert_serial"]) == (None, None)
    elif expected.boringssl is not None:
        refused_by_grpc_tls(stack, service, client, f"OPENSSL_internal:{expected.boringssl}")
    else:
        outcome = business_call(stack, service, client, token)
        assert (outcome.kind, outcome.detail, outcome.data) == (
            "UNAUTHENTICATED",
            svid_reason,
            None,
        )
        record = audit.wait_for(lambda r: r["cert_subject"] == f"CN={name}", f"the {rule} client")
        assert (record["decision"], record["reason"]) == ("deny", svid_reason)
        assert (record["method"], record["event"]) == (METHOD_OF[service], "authz")
        assert (record["caller_spiffe_id"], record["cert_serial"]) == (None, None)


# -- TLS versions and cipher suites, on the wire ---------------------------------------------

LEGACY_VERSIONS = {"TLSv1": Version.TLS1_0, "TLSv1_1": Version.TLS1_1}
# The TLS 1.2 suites that are not AEAD, by IANA code (OpenSSL's name in the id).
NON_AEAD_SUITES = {
    "ECDHE-ECDSA-AES128-SHA256": tls_wire.ECDHE_ECDSA_AES128_CBC_SHA256,
    "ECDHE-ECDSA-AES256-SHA": tls_wire.ECDHE_ECDSA_AES256_CBC_SHA,
    "ECDHE-ECDSA-AES128-SHA": tls_wire.ECDHE_ECDSA_AES128_CBC_SHA,
}
# A legacy hello offers, besides the suites of its day, the suite every service accepts in
# TLS 1.2 (the control below): only its version can make the difference.
LEGACY_OFFER = (tls_wire.ECDHE_ECDSA_AES128_GCM_SHA256, *tls_wire.LEGACY_SUITES)


def _legacy_hello(version: str, service: str) -> bytes:
    return tls_wire.client_hello(LEGACY_VERSIONS[version], LEGACY_OFFER, alpn=alpn(service))


def _non_aead_hello(suite: str, service: str) -> bytes:
    return tls_wire.client_hello(Version.TLS1_2, [NON_AEAD_SUITES[suite]], alpn=alpn(service))


def _refused_hello(stack: E2EStack, service: str, hello: bytes, reason: str) -> None:
    """The server's whole answer to ``hello`` is to close the connection: no ServerHello and
    no alert.  Its reason (OpenSSL's, e.g. ``UNSUPPORTED_PROTOCOL``) is in the gateway's audit
    record of the connection, or in a gRPC service's log (no record: never audited)."""
    address = stack.addresses[service]
    audit = AuditSince(stack, service)
    log = HandshakeLog(stack, service)

    answer = tls_wire.exchange(address.host, address.port, hello)

    assert (answer.records, answer.ended, answer.trailing) == ([], "eof", b""), str(answer)
    if service == GATEWAY.name:
        record = audit.wait_for(lambda r: r["source_port"] == answer.local_port, "the hello")
        assert (record["decision"], record["method"]) == ("deny", "TLS handshake"), record
        assert (record["event"], record["handshake"]) == ("tls_handshake", "fail"), record
        assert (record["reason"], record["tls_version"]) == (
            f"TLS handshake failed: {reason}",
            None,
        )
    else:
        log.expect(f"OPENSSL_internal:{reason}")
        never_audited(stack, audit, answer.local_port)


@pytest.mark.parametrize("version", list(LEGACY_VERSIONS))
def test_a_legacy_client_hello_offers_what_it_says(version: str) -> None:
    """The control for the legacy hellos below: an OpenSSL server that speaks TLS 1.0 answers
    the same bytes in that version, with one of the offered legacy suites; one with ztbank's
    policy (TLS 1.2+, TLS12_AEAD_CIPHERS) answers them with the alert protocol_version."""
    hello = _legacy_hello(version, GATEWAY.name)
    with tls_wire.loopback_server(
        minimum_version=ssl.TLSVersion.TLSv1, ciphers="ALL:@SECLEVEL=0"
    ) as lenient:
        answer = tls_wire.exchange(lenient.host, lenient.port, hello)
    assert answer.server_hello is not None, str(answer)
    assert answer.server_hello.version == LEGACY_VERSIONS[version]
    assert answer.server_hello.cipher_suite in tls_wire.LEGACY_SUITES
    with tls_wire.loopback_server(
        minimum_version=ssl.TLSVersion.TLSv1_2, ciphers=TLS12_AEAD_CIPHERS
    ) as strict:
        refused = tls_wire.exchange(strict.host, strict.port, hello)
    assert refused.alert == tls_wire.Alert(AlertLevel.FATAL, AlertDescription.PROTOCOL_VERSION)


@pytest.mark.parametrize("suite", list(NON_AEAD_SUITES))
def test_a_non_aead_client_hello_offers_what_it_says(suite: str) -> None:
    """The same control for the TLS 1.2 hellos offering one suite that is not AEAD: chosen by a
    server that has it, refused with handshake_failure by one with ztbank's suites."""
    hello = _non_aead_hello(suite, GATEWAY.name)
    with tls_wire.loopback_server(
        minimum_version=ssl.TLSVersion.TLSv1, ciphers="ALL:@SECLEVEL=0"
    ) as lenient:
        answer = tls_wire.exchange(lenient.host, lenient.port, hello)
    assert answer.server_hello == ServerHello(Version.TLS1_2, NON_AEAD_SUITES[suite]), str(answer)
    with tls_wire.loopback_server(
        minimum_version=ssl.TLSVersion.TLSv1_2, ciphers=TLS12_AEAD_CIPHERS
    ) as strict:
        refused = tls_wire.exchange(strict.host, strict.port, hello)
    assert refused.alert == tls_wire.Alert(AlertLevel.FATAL, AlertDescription.HANDSHAKE_FAILURE)


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("version", list(LEGACY_VERSIONS))
def test_legacy_tls_versions_are_refused(stack: E2EStack, service: str, version: str) -> None:
    _refused_hello(stack, service, _legacy_hello(version, service), "UNSUPPORTED_PROTOCOL")


@pytest.mark.parametrize("service", SERVICES)
@pytest.mark.parametrize("suite", list(NON_AEAD_SUITES))
def test_tls12_without_aead_is_refused(stack: E2EStack, service: str, suite: str) -> None:
    _refused_hello(stack, service, _non_aead_hello(suite, service), "NO_SHARED_CIPHER")


def _handshake(stack: E2EStack, service: str, context: ssl.SSLContext) -> str:
    """The protocol version the handshake agreed."""
    address = stack.addresses[service]
    with (
        socket.create_connection((address.host, address.port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        return str(tls.version())


@pytest.mark.parametrize("service", SERVICES)
def test_tls12_with_aead_and_tls13_are_accepted(stack: E2EStack, service: str) -> None:
    """The positive control of the hellos above: the same hand-written hello in TLS 1.2 with an
    AEAD suite gets a ServerHello choosing it; real handshakes agree TLS 1.3, or TLS 1.2 with
    that suite when the client offers no more."""
    address = stack.addresses[service]
    hello = tls_wire.client_hello(
        Version.TLS1_2, [tls_wire.ECDHE_ECDSA_AES128_GCM_SHA256], alpn=alpn(service)
    )
    answer = tls_wire.exchange(address.host, address.port, hello)
    assert answer.server_hello == ServerHello(
        Version.TLS1_2, tls_wire.ECDHE_ECDSA_AES128_GCM_SHA256
    ), str(answer)

    svid = stack.mint(stack.spiffe_id(CALLER_OF[service]))
    context = tls_client_context(svid, alpn(service))
    assert _handshake(stack, service, context) == "TLSv1.3"
    context = tls_client_context(svid, alpn(service))
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
