"""A throwaway CA (ECDSA P-256) and the pipeline's certificates, written to a directory.

Every certificate may serve and connect (serverAuth + clientAuth): the gateway and the engine are
both.  grpcio matches the server certificate against a DNS name, so the gRPC servers carry DNS
SANs (``engine``, ``risk``) that their clients ask for with ``grpc.ssl_target_name_override``;
the gateway carries the IP SAN 127.0.0.1, so HTTPS clients keep hostname checking on.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LIFETIME = datetime.timedelta(days=1)
# name -> subject alternative names (DNS names; "127.0.0.1" becomes an IP SAN)
IDENTITIES: dict[str, tuple[str, ...]] = {
    "gateway": ("localhost", "127.0.0.1"),
    "engine": ("engine",),
    "risk": ("risk",),
    "client": ("client",),
}


@dataclass(frozen=True)
class CertFiles:
    """Where one identity's files are: ``<dir>/<name>.pem``, ``<dir>/<name>.key``, ``ca.pem``."""

    directory: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.directory / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.directory / f"{self.name}.key"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"


def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


def make_certs(directory: Path) -> dict[str, CertFiles]:
    """Create a CA and one certificate per identity in ``directory``; their file names."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _subject("ztbank bare benchmark CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    files = {}
    for name, names in IDENTITIES.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_subject(name))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(_san(names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        found = CertFiles(directory, name)
        _write(found.key, _key_pem(key), 0o600)
        _write(found.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        files[name] = found
    return files
