"""A throw-away PKI for tests: roots, intermediates and X509-SVID leaves with every knob exposed.

Defaults produce certificates that ``verify_x509_svid`` accepts; each keyword breaks exactly one
property, so a negative test states only what it changes.  Key generation dominates the cost
(RSA especially), so pass ``key=`` with a key cached in a module-scoped fixture where it matters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from services.common.identity.pem import certificates_to_pem

TRUST_DOMAIN = "ztbank.example"
WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/env/test/zone/az1/team/payments/svc/transfer-engine"
BOTH_PURPOSES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)

KeyType = Literal["ec-p256", "ec-p384", "rsa-1024", "rsa-2048"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# What CertificateBuilder.sign accepts; SHA-1 needs resign_with_sha1.
SignatureHash = (
    hashes.SHA224
    | hashes.SHA256
    | hashes.SHA384
    | hashes.SHA512
    | hashes.SHA3_224
    | hashes.SHA3_256
    | hashes.SHA3_384
    | hashes.SHA3_512
)


class Issued(NamedTuple):
    certificate: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class KeyUsageSpec:
    digital_signature: bool = False
    key_encipherment: bool = False
    key_cert_sign: bool = False
    crl_sign: bool = False
    critical: bool = True

    def extension(self) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=self.digital_signature,
            content_commitment=False,
            key_encipherment=self.key_encipherment,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=self.key_cert_sign,
            crl_sign=self.crl_sign,
            encipher_only=False,
            decipher_only=False,
        )


LEAF_KEY_USAGE = KeyUsageSpec(digital_signature=True)
CA_KEY_USAGE = KeyUsageSpec(digital_signature=True, key_cert_sign=True, crl_sign=True)


def generate_key(key_type: KeyType = "ec-p256") -> PrivateKey:
    match key_type:
        case "ec-p256":
            return ec.generate_private_key(ec.SECP256R1())
        case "ec-p384":
            return ec.generate_private_key(ec.SECP384R1())
        case "rsa-1024":
            return rsa.generate_private_key(public_exponent=65537, key_size=1024)
        case "rsa-2048":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def issue_certificate(
    *,
    common_name: str,
    signer: Issued | None,
    key: PrivateKey | None = None,
    key_type: KeyType = "ec-p256",
    uri_sans: Sequence[str] = (),
    dns_sans: Sequence[str] = (),
    basic_constraints: bool = True,
    is_ca: bool = False,
    path_length: int | None = None,
    key_usage: KeyUsageSpec | None = LEAF_KEY_USAGE,
    extended_key_usage: Sequence[ObjectIdentifier] | None = BOTH_PURPOSES,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    hash_algorithm: SignatureHash | None = None,
) -> Issued:
    """The one builder behind the role helpers; ``signer=None`` makes it self-signed.

    ``key_usage=None`` / ``extended_key_usage=None`` / ``basic_constraints=False`` omit the
    extension; validity defaults to an hour ago until a day from now.
    """
    own_key = key if key is not None else generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signing_key = own_key if signer is None else signer.key
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if signer is None else signer.certificate.subject)
        .public_key(own_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before if not_before is not None else now - timedelta(hours=1))
        .not_valid_after(not_after if not_after is not None else now + timedelta(days=1))
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(own_key.public_key()), critical=False
        )
    )
    if signer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri) for uri in uri_sans]
    names += [x509.DNSName(name) for name in dns_sans]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length),
            critical=True,
        )
    if key_usage is not None:
        builder = builder.add_extension(key_usage.extension(), critical=key_usage.critical)
    if extended_key_usage is not None:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(list(extended_key_usage)), critical=False
        )
    certificate = builder.sign(signing_key, hash_algorithm or hashes.SHA256())
    return Issued(certificate, own_key)


def create_root_ca(
    *,
    trust_domain: str = TRUST_DOMAIN,
    common_name: str = "ztbank test root CA",
    key: PrivateKey | None = None,
    key_type: KeyType = "ec-p256",
    uri_sans: Sequence[str] | None = None,
    path_length: int | None = None,
    key_usage: KeyUsageSpec | None = CA_KEY_USAGE,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """A self-signed CA; ``uri_sans`` defaults to the trust domain ID ``spiffe://<td>``."""
    return issue_certificate(
        common_name=common_name,
        signer=None,
        key=key,
        key_type=key_type,
        uri_sans=[f"spiffe://{trust_domain}"] if uri_sans is None else uri_sans,
        is_ca=True,
        path_length=path_length,
        key_usage=key_usage,
        extended_key_usage=None,
        not_before=not_before,
        not_after=not_after,
    )


def create_intermediate_ca(
    signer: Issued,
    *,
    trust_domain: str = TRUST_DOMAIN,
    common_name: str = "ztbank test intermediate CA",
    key: PrivateKey | None = None,
    key_type: KeyType = "ec-p256",
    uri_sans: Sequence[str] | None = None,
    basic_constraints: bool = True,
    is_ca: bool = True,
    path_length: int | None = 0,
    key_usage: KeyUsageSpec | None = CA_KEY_USAGE,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    hash_algorithm: SignatureHash | None = None,
) -> Issued:
    """A signing CA under ``signer``; ``uri_sans`` defaults to ``spiffe://<td>``, pass ``[]`` to
    mimic a Vault PKI intermediate without one."""
    return issue_certificate(
        common_name=common_name,
        signer=signer,
        key=key,
        key_type=key_type,
        uri_sans=[f"spiffe://{trust_domain}"] if uri_sans is None else uri_sans,
        basic_constraints=basic_constraints,
        is_ca=is_ca,
        path_length=path_length,
        key_usage=key_usage,
        extended_key_usage=None,
        not_before=not_before,
        not_after=not_after,
        hash_algorithm=hash_algorithm,
    )


def create_leaf(
    signer: Issued | None,
    *,
    uri_sans: Sequence[str] = (WORKLOAD_ID,),
    dns_sans: Sequence[str] = (),
    common_name: str = "ztbank test workload",
    key: PrivateKey | None = None,
    key_type: KeyType = "ec-p256",
    basic_constraints: bool = True,
    is_ca: bool = False,
    path_length: int | None = None,
    key_usage: KeyUsageSpec | None = LEAF_KEY_USAGE,
    extended_key_usage: Sequence[ObjectIdentifier] | None = BOTH_PURPOSES,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    hash_algorithm: SignatureHash | None = None,
) -> Issued:
    """An X509-SVID; ``signer=None`` makes it self-signed."""
    return issue_certificate(
        common_name=common_name,
        signer=signer,
        key=key,
        key_type=key_type,
        uri_sans=uri_sans,
        dns_sans=dns_sans,
        basic_constraints=basic_constraints,
        is_ca=is_ca,
        path_length=path_length,
        key_usage=key_usage,
        extended_key_usage=extended_key_usage,
        not_before=not_before,
        not_after=not_after,
        hash_algorithm=hash_algorithm,
    )


def resign_with_sha1(certificate: x509.Certificate, signer: Issued) -> x509.Certificate:
    """Return ``certificate`` signed with sha1WithRSAEncryption by an RSA ``signer``.

    cryptography refuses to build SHA-1 signatures, so the DER is patched instead: the
    sha256WithRSAEncryption OID (in the TBS and the outer algorithm) differs from SHA-1's only
    in its last byte, and an RSA signature keeps its length, so no ASN.1 length changes.
    """
    if not isinstance(signer.key, rsa.RSAPrivateKey):
        raise TypeError("resign_with_sha1 needs an RSA signer")
    sha256_oid = bytes.fromhex("06092a864886f70d01010b")
    sha1_oid = bytes.fromhex("06092a864886f70d010105")
    der = certificate.public_bytes(serialization.Encoding.DER)
    if der.count(sha256_oid) != 2:
        raise ValueError("certificate is not signed with sha256WithRSAEncryption")
    patched = der.replace(sha256_oid, sha1_oid)
    tbs = x509.load_der_x509_certificate(patched).tbs_certificate_bytes
    signature = signer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    # The signature BIT STRING's value is the last element of the certificate.
    return x509.load_der_x509_certificate(patched[: -len(signature)] + signature)


def write_pem_files(
    issued: Issued,
    *,
    cert_path: Path,
    key_path: Path,
    chain: Sequence[x509.Certificate] = (),
) -> None:
    """Write the certificate (then ``chain``) and its unencrypted PKCS#8 key with mode 0600."""
    cert_path.write_bytes(certificates_to_pem([issued.certificate, *chain]))
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 rather than chmod-ed afterwards, so the key is never briefly world-readable;
    # fchmod still fixes the mode of a file that already existed.
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(key_pem)


def write_certificates(path: Path, certificates: Sequence[x509.Certificate]) -> None:
    """Write a PEM bundle, e.g. a trust bundle file."""
    path.write_bytes(certificates_to_pem(certificates))
