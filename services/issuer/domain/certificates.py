"""Certificate templates: the trust domain's root, the issuer's signing CA and X509-SVIDs.

Everything here is pure: keys and certificates in, certificates out.  SVIDs follow the X509-SVID
specification to the letter (one URI SAN, not a CA, critical key usage with digitalSignature only,
EKU serverAuth + clientAuth, ECDSA P-256).  Given the issuer's revocation URLs they also say where
their status is published: a CRL distribution point (the issuing CA's CRL) and an OCSP responder
(authority information access), both non-critical.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from services.common.identity.spiffe_id import SpiffeId

# Certificates start slightly in the past so that a peer whose clock lags a little accepts them;
# notAfter - notBefore still equals the TTL, so the backdate comes out of the lifetime.
MAX_BACKDATE = timedelta(seconds=10)
ROOT_LIFETIME = timedelta(days=3650)

SigningKey = ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def validity(now: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) spanning exactly ``ttl``, backdated by at most a tenth of it."""
    not_before = now - min(MAX_BACKDATE, ttl / 10)
    return not_before, not_before + ttl


def _serial() -> int:
    # 159 random bits: positive, unique, and within RFC 5280's 20-octet limit.
    return secrets.randbits(159) | 1


def _name(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztbank"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)

SVID_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _trust_domain_san(trust_domain: str) -> x509.SubjectAlternativeName:
    """The trust domain's own SPIFFE ID, the URI SAN of its CAs."""
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")])


def _ca_template(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    validity_window: tuple[datetime, datetime],
    path_length: int,
    trust_domain: str,
) -> x509.CertificateBuilder:
    """What the root and the signing CA have in common: a CA of the trust domain that signs
    certificates and CRLs, with ``path_length`` CAs at most below it."""
    not_before, not_after = validity_window
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(_trust_domain_san(trust_domain), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def build_root_ca(
    key: SigningKey, trust_domain: str, *, now: datetime | None = None
) -> x509.Certificate:
    """Self-signed root of the trust domain; path length 1 leaves room for the issuer's CA."""
    name = _name("ztbank root CA", trust_domain)
    return _ca_template(
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        validity_window=validity(now or datetime.now(UTC), ROOT_LIFETIME),
        path_length=1,
        trust_domain=trust_domain,
    ).sign(key, hashes.SHA256())


def build_signing_ca_csr(
    key: SigningKey, trust_domain: str, common_name: str
) -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name, trust_domain))
        .add_extension(_trust_domain_san(trust_domain), critical=False)
        .sign(key, hashes.SHA256())
    )


def sign_signing_ca(
    csr: x509.CertificateSigningRequest,
    *,
    issuer_cert: x509.Certificate,
    issuer_key: SigningKey,
    trust_domain: str,
    ttl: timedelta,
    now: datetime | None = None,
) -> x509.Certificate:
    """The issuer's intermediate: signs leaves only (path length 0), never outlives its issuer."""
    not_before, not_after = validity(now or datetime.now(UTC), ttl)
    return (
        _ca_template(
            subject=csr.subject,
            issuer=issuer_cert.subject,
            public_key=csr.public_key(),
            validity_window=(not_before, min(not_after, issuer_cert.not_valid_after_utc)),
            path_length=0,
            trust_domain=trust_domain,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def build_x509_svid(
    spiffe_id: SpiffeId,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ca_cert: x509.Certificate,
    ca_key: SigningKey,
    ttl: timedelta,
    dns_names: Sequence[str] = (),
    now: datetime | None = None,
    crl_url: str | None = None,
    ocsp_url: str | None = None,
) -> x509.Certificate:
    """An X509-SVID whose lifetime never exceeds ``ttl`` nor the signing CA's own expiry."""
    now = now or datetime.now(UTC)
    not_before, not_after = validity(max(now, ca_cert.not_valid_before_utc), ttl)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(name) for name in dns_names)
    # The subject carries the service name for humans reading logs; identity is the URI SAN.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztbank"),
            x509.NameAttribute(NameOID.COMMON_NAME, spiffe_id.path.rsplit("/", 1)[-1][:64]),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SVID_KEY_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if crl_url:
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
    if ocsp_url:
        responder = x509.AccessDescription(
            AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url)
        )
        builder = builder.add_extension(
            x509.AuthorityInformationAccess([responder]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())
