"""``ztbank lab mis-issued``: certificates a correct CA would never issue, presented to the gateway.

Every case is signed by the issuer's REAL signing CA (read from its state file, as an attacker
holding that key, or a CA with a bug, would sign) and carries the teller's SPIFFE ID, so TLS
chain validation alone accepts it; the gateway must refuse it by the X509-SVID rules.  A
well-formed certificate from the same CA is the control and must be served; a foreign CA and a
well-formed SVID for an ID outside the policy complete the picture.  For each case the lab shows
where it was refused (handshake or HTTP) and the reason the gateway audited for our connection.

Native stack only: the lab reads the issuer's CA state and the gateway's audit file under
``ZTBANK_HOME``, as the user who runs the stack.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.discovery.registry import FileRegistry
from services.common.files import private_key_pem
from services.common.identity.pem import certificates_to_pem
from services.common.identity.workloads import GATEWAY, TELLER
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.domain.certificates import CA_KEY_USAGE, SVID_KEY_USAGE
from services.issuer.errors import IssuerError
from services.labs.errors import LabError
from services.labs.support import Say, last_gateway_denial, present
from services.labs.teller import TellerClient
from services.stack.native import StackSettings

CUSTOMER = "alice"
INTRUDER_PATH = "/env/prod/zone/az1/team/x/svc/intruder"


@dataclass(frozen=True)
class Signer:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class LeafSpec:
    """An X509-SVID as the issuer builds it; each case changes one thing."""

    uri_sans: tuple[str, ...]
    is_ca: bool = False
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = field(
        default=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    )
    not_before: timedelta = timedelta(minutes=-1)  # relative to now
    not_after: timedelta = timedelta(minutes=10)


def build_leaf(
    spec: LeafSpec, signer: Signer
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztbank lab")]))
        .issuer_name(signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(now + spec.not_before)
        .not_valid_after(now + spec.not_after)
        .add_extension(x509.BasicConstraints(ca=spec.is_ca, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE if spec.is_ca else SVID_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(spec.extended_key_usage)), critical=False)
    )
    if spec.uri_sans:
        names = [x509.UniformResourceIdentifier(uri) for uri in spec.uri_sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer.key, hashes.SHA256()), key


def impostor_ca(trust_domain: str) -> Signer:
    """A well-formed CA that names itself after our trust domain but is nobody we trust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"impostor CA of {trust_domain}")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(159) | 1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    return Signer(certificate, key)


@dataclass(frozen=True)
class Case:
    name: str
    spec: LeafSpec
    foreign: bool = False  # signed by an impostor CA instead of the real signing CA
    served: bool = False  # the control


def cases(trust_domain: str) -> list[Case]:
    teller = str(TELLER.spiffe_id(trust_domain))
    elsewhere = teller.replace(f"spiffe://{trust_domain}/", "spiffe://evil.example/")
    intruder = f"spiffe://{trust_domain}{INTRUDER_PATH}"
    good = LeafSpec(uri_sans=(teller,))
    hour = timedelta(hours=1)
    return [
        Case("control: a well-formed SVID from the same CA", good, served=True),
        Case("signed by a foreign CA", good, foreign=True),
        Case("two URI SANs", replace(good, uri_sans=(teller, f"spiffe://{trust_domain}/x"))),
        Case("no URI SAN", replace(good, uri_sans=())),
        Case("ID of another trust domain", replace(good, uri_sans=(elsewhere,))),
        Case("leaf is a CA", replace(good, is_ca=True)),
        Case(
            "no clientAuth usage",
            replace(good, extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        ),
        Case("expired", replace(good, not_before=-2 * hour, not_after=-hour)),
        Case("not yet valid", replace(good, not_before=hour, not_after=2 * hour)),
        Case("an ID outside the policy", replace(good, uri_sans=(intruder,))),
    ]


def _signing_ca(settings: StackSettings) -> Signer:
    try:
        state = settings.home_of("issuer") / "issuer" / "authority.json"
        active = AuthorityFile(state).load().active
    except IssuerError as error:
        raise LabError(str(error)) from None
    if active is None:
        raise LabError("the issuer has no signing CA yet; is the stack up? (make up)")
    return Signer(active.ca_cert, active.ca_key)


def run_misissued_lab(settings: StackSettings, say: Say) -> bool:
    say("lab mis-issued: certificates a correct CA would never issue, presented to the gateway")
    teller = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    token = teller.token(CUSTOMER)
    signer = _signing_ca(settings)
    bundle = list(teller.material.bundle)
    gateway = FileRegistry(settings.registry).lookup(GATEWAY.name)
    serial = format(signer.certificate.serial_number, "x")
    say(f"  every case but one is signed by the issuer's active signing CA ({serial[:12]}…)")
    results: list[bool] = []
    for number, case in enumerate(cases(settings.trust_domain), start=1):
        ca = impostor_ca(settings.trust_domain) if case.foreign else signer
        leaf, key = build_leaf(case.spec, ca)
        outcome = present(
            (gateway.host, gateway.port),
            certificates_to_pem([leaf, ca.certificate]),
            private_key_pem(key),
            certificates_to_pem(bundle),
            token,
        )
        if case.served:
            ok = outcome.answer == "HTTP 200"
            detail = outcome.answer
        else:
            reason = last_gateway_denial(settings, source_port=outcome.local_port)
            ok = outcome.answer != "HTTP 200" and reason is not None
            audit = f"audited: {reason!r}" if reason else "NOT audited"
            detail = f"{outcome.answer}; {audit}"
        results.append(ok)
        say(f"  {number:>2} {'ok ' if ok else 'BAD'} {case.name}: {detail}")
    refused = len(results) - 1
    if all(results):
        say(
            f"lab passed: {refused} mis-issued certificates refused and audited, the control served"
        )
        return True
    say("lab failed: see the cases marked BAD")
    return False
