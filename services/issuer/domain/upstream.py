"""Upstream authorities sign the issuer's signing CA; the issuer never holds the root key itself
unless the upstream is ``disk``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from cryptography import x509


@dataclass(frozen=True)
class SignedCA:
    """What an upstream returns for the issuer's CSR.

    ``certificate`` is the issuer's new signing CA; ``chain`` holds the intermediates between it and
    a root (leaf-most first, possibly empty); ``roots`` are the trust anchors to publish in the
    trust bundle.
    """

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]


class UpstreamAuthority(Protocol):
    """Signs the issuer's intermediate CA.  Implementations raise ``UpstreamError`` on failure."""

    name: str

    def sign_signing_ca(
        self, csr: x509.CertificateSigningRequest, *, trust_domain: str, ttl: timedelta
    ) -> SignedCA: ...
