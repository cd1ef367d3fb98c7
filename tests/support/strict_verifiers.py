"""Verify certificates the way strict third-party verifiers do: ``cryptography``'s X.509 path
validation (RFC 5280 and CA/B-style profile checks) and ``openssl verify -x509_strict``.

ztbank's own verifier follows the X509-SVID specification; these show that a relying party that
is not SPIFFE-aware (a proxy, a Java or Go client, a CA/B-minded linter) accepts the same chain.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store


def _pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)


def cryptography_verifies(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
) -> list[x509.GeneralName]:
    """The leaf's SANs as ``cryptography``'s client verifier validated them (raises
    ``VerificationError`` on any refusal)."""
    verifier = PolicyBuilder().store(Store(list(roots))).time(now).build_client_verifier()
    verified = verifier.verify(leaf, list(intermediates))
    return list(verified.subjects or ())


def openssl_strict_verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    purpose: str,
) -> subprocess.CompletedProcess[str]:
    """``openssl verify -x509_strict`` of the leaf for ``purpose`` (sslclient, sslserver)."""
    with tempfile.TemporaryDirectory() as scratch:
        files = {"roots": roots, "untrusted": intermediates, "leaf": [leaf]}
        for name, certificates in files.items():
            (Path(scratch) / f"{name}.pem").write_bytes(_pem(certificates))
        return subprocess.run(
            [
                "openssl",
                "verify",
                "-x509_strict",
                "-purpose",
                purpose,
                "-CAfile",
                f"{scratch}/roots.pem",
                "-untrusted",
                f"{scratch}/untrusted.pem",
                f"{scratch}/leaf.pem",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
