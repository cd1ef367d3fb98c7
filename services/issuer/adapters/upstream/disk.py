"""The ``disk`` upstream: the trust domain's root key lives in ``ZTBANK_CERTS_DIR``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.files import PUBLIC_MODE, write_atomic, write_private_key
from services.issuer.domain.certificates import build_root_ca, new_key, sign_signing_ca
from services.issuer.domain.upstream import SignedCA
from services.issuer.errors import UpstreamError

ROOT_CERT_FILE = "root-ca.pem"
ROOT_KEY_FILE = "root-ca.key"


@dataclass(frozen=True)
class RootInit:
    cert_path: Path
    key_path: Path
    created: bool


def init_root_ca(certs_dir: Path, trust_domain: str) -> RootInit:
    """Create the root CA files only if absent; an existing root is never overwritten."""
    cert_path, key_path = certs_dir / ROOT_CERT_FILE, certs_dir / ROOT_KEY_FILE
    if cert_path.exists() or key_path.exists():
        if not (cert_path.exists() and key_path.exists()):
            raise UpstreamError(
                f"{certs_dir} holds only one of {ROOT_CERT_FILE} / {ROOT_KEY_FILE}; "
                "remove it or restore the other before continuing"
            )
        return RootInit(cert_path, key_path, created=False)
    certs_dir.mkdir(parents=True, exist_ok=True)
    key = new_key()
    write_private_key(key_path, key)
    write_atomic(
        cert_path,
        build_root_ca(key, trust_domain).public_bytes(serialization.Encoding.PEM),
        PUBLIC_MODE,
    )
    return RootInit(cert_path, key_path, created=True)


class DiskUpstream:
    """Signs the issuer's CA with the root found on disk."""

    name = "disk"

    def __init__(self, certs_dir: Path) -> None:
        self._certs_dir = certs_dir

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert_path = self._certs_dir / ROOT_CERT_FILE
        key_path = self._certs_dir / ROOT_KEY_FILE
        try:
            if key_path.stat().st_mode & 0o077:
                raise UpstreamError(f"{key_path} must not be readable by group or others (0600)")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except FileNotFoundError:
            raise UpstreamError(
                f"no root CA in {self._certs_dir}: run `ztbank certs init` (or `make certs`)"
            ) from None
        except ValueError as error:
            raise UpstreamError(f"cannot read the root CA in {self._certs_dir}: {error}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UpstreamError(f"{key_path} is not an ECDSA key")
        return cert, key

    def sign_signing_ca(
        self, csr: x509.CertificateSigningRequest, *, trust_domain: str, ttl: timedelta
    ) -> SignedCA:
        root_cert, root_key = self._load()
        certificate = sign_signing_ca(
            csr, issuer_cert=root_cert, issuer_key=root_key, trust_domain=trust_domain, ttl=ttl
        )
        return SignedCA(certificate=certificate, chain=(), roots=(root_cert,))
