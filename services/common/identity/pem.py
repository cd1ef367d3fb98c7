"""Certificate encoding helpers: PEM files, concatenated DER and short printable identifiers.

The SPIFFE Workload API sends chains and bundles as concatenated DER certificates without any
framing, and cryptography only parses one DER certificate at a time, so the outer ASN.1 SEQUENCE
lengths are read here to split them.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from services.common.errors import InvalidCertificateError

_SEQUENCE_TAG = 0x30
# Four length octets allow a 4 GiB certificate; anything claiming more is garbage, not a chain.
_MAX_LENGTH_OCTETS = 4


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in ``data``, in order; raise InvalidCertificateError if there is none."""
    try:
        # Raises rather than returning an empty list when there is no certificate at all.
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidCertificateError("no valid PEM certificate found") from None


def _der_element_length(data: bytes, offset: int) -> int:
    """Total length (header included) of the DER SEQUENCE starting at ``offset``."""
    if data[offset] != _SEQUENCE_TAG:
        raise InvalidCertificateError(f"byte {offset}: expected a DER SEQUENCE")
    if offset + 1 >= len(data):
        raise InvalidCertificateError(f"byte {offset}: DER header is truncated")
    first = data[offset + 1]
    if first < 0x80:
        return 2 + first
    octets = first & 0x7F
    # 0x80 is BER's indefinite length, which DER forbids.
    if octets == 0 or octets > _MAX_LENGTH_OCTETS:
        raise InvalidCertificateError(f"byte {offset}: invalid DER length encoding")
    # A short header yields fewer length octets, hence a length the caller finds truncated.
    start = offset + 2
    return 2 + octets + int.from_bytes(data[start : start + octets], "big")


def load_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Split concatenated DER certificates; raise InvalidCertificateError on any malformed one."""
    certificates: list[x509.Certificate] = []
    offset = 0
    while offset < len(data):
        end = offset + _der_element_length(data, offset)
        if end > len(data):
            raise InvalidCertificateError(f"byte {offset}: DER certificate is truncated")
        try:
            certificates.append(x509.load_der_x509_certificate(data[offset:end]))
        except ValueError as error:
            raise InvalidCertificateError(
                f"byte {offset}: not a DER certificate: {error}"
            ) from None
        offset = end
    if not certificates:
        raise InvalidCertificateError("no DER certificate found")
    return certificates


def certificates_to_pem(certificates: Iterable[x509.Certificate]) -> bytes:
    return b"".join(certificate.public_bytes(Encoding.PEM) for certificate in certificates)


def certificates_to_der(certificates: Iterable[x509.Certificate]) -> bytes:
    """Concatenated DER, the Workload API's encoding of chains and bundles."""
    return b"".join(certificate.public_bytes(Encoding.DER) for certificate in certificates)


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """Lowercase hex without colons, as logged and compared across ztbank."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def serial_hex(certificate: x509.Certificate) -> str:
    """Lowercase hex without a ``0x`` prefix."""
    return format(certificate.serial_number, "x")
