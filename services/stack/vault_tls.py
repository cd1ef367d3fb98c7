"""Vault's own TLS certificate: a CA of its own for Vault's listener, and the server certificate
it signs, renewed before it runs out.

Why a CA of its own and not the trust domain's: Vault is the issuer's upstream, so the issuer
needs Vault before it has a CA that could certify anything, and a relying party of the SPIFFE
trust domain must never accept Vault's listener as a workload. The issuer and the bootstrap pin
this CA (``VAULT_CACERT``) and verify Vault's certificate and name on every connection.

The server certificate lives ``SERVER_TTL`` and is issued again when less than a third of that
is left, its names differ, or its key does not match; every ``ztbank up`` (and compose's
one-shot ``vault-tls`` job) checks, and a running Vault reloads it on SIGHUP.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.errors import CommonError
from services.common.files import PUBLIC_MODE, ensure_private_dir, write_atomic, write_private_key
from services.issuer.domain.certificates import CA_KEY_USAGE, SVID_KEY_USAGE

CA_TTL = timedelta(days=3 * 365)
SERVER_TTL = timedelta(days=30)
RENEW_WHEN_LEFT = SERVER_TTL / 3
BACKDATE = timedelta(minutes=1)
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


class VaultTlsError(CommonError):
    """Vault's TLS material cannot be read or written (the message names the file)."""


@dataclass(frozen=True)
class VaultTls:
    """Where Vault's TLS files are: ``ca_dir`` keeps the CA's key, ``directory`` what Vault and
    its clients read (the server key and certificate, and a copy of the CA certificate)."""

    directory: Path
    ca_dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY


def _now() -> datetime:
    return datetime.now(UTC)


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    if not cert_path.exists() and not key_path.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise VaultTlsError(f"cannot read Vault's TLS CA in {ca_dir}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise VaultTlsError(f"{key_path} is not an ECDSA key")
    return cert, key


def _new_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztbank"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ztbank Vault TLS CA"),
        ]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_TTL)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _names(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for text in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            raise VaultTlsError(f"{text!r} is not an IP address") from None
    if not names:
        raise VaultTlsError("Vault's certificate needs at least one DNS name or IP address")
    return names


def _issue_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztbank"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "vault"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_TTL, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(SVID_KEY_USAGE, critical=True)  # a TLS server key: signatures only
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _server_is_current(
    tls: VaultTls, ca_cert: x509.Certificate, names: list[x509.GeneralName], now: datetime
) -> bool:
    """True if the server certificate on disk is signed by ``ca_cert``, names exactly ``names``,
    matches its key and has at least a third of its lifetime left."""
    try:
        cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
        key = serialization.load_pem_private_key(tls.server_key.read_bytes(), password=None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return same_key and set(sans) == set(names) and cert.not_valid_after_utc - now > RENEW_WHEN_LEFT


def ensure_vault_tls(
    tls: VaultTls,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    owner: int | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Make what is missing or due; return what was made (empty: everything was current).

    ``owner`` (a uid) gets the server key, for a Vault that runs as another user (compose).
    """
    now = now or _now()
    names = _names(dns_names, ip_addresses)
    made: list[str] = []
    try:
        ensure_private_dir(tls.ca_dir)
        tls.directory.mkdir(parents=True, exist_ok=True)
        loaded = _load_ca(tls.ca_dir)
        if loaded is None or loaded[0].not_valid_after_utc - now <= SERVER_TTL:
            loaded = _new_ca(now)
            write_private_key(tls.ca_dir / CA_KEY, loaded[1])
            write_atomic(tls.ca_dir / CA_CERT, _pem(loaded[0]), PUBLIC_MODE)
            made.append(f"CA {tls.ca_dir / CA_CERT}")
        ca_cert, ca_key = loaded
        if tls.ca_cert.resolve() != (tls.ca_dir / CA_CERT).resolve() and (
            not tls.ca_cert.exists() or tls.ca_cert.read_bytes() != _pem(ca_cert)
        ):
            write_atomic(tls.ca_cert, _pem(ca_cert), PUBLIC_MODE)
        if made or not _server_is_current(tls, ca_cert, names, now):
            cert, key = _issue_server(ca_cert, ca_key, names, now)
            write_private_key(tls.server_key, key)
            write_atomic(tls.server_cert, _pem(cert), PUBLIC_MODE)
            made.append(
                f"server certificate {tls.server_cert} until {cert.not_valid_after_utc:%Y-%m-%d}"
            )
        if owner is not None:
            os.chown(tls.server_key, owner, -1)
    except OSError as error:
        raise VaultTlsError(f"cannot write Vault's TLS material: {error}") from None
    return made


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
