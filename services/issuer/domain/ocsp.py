"""An RFC 6960 OCSP responder for the certificates this issuer signed.

Each answer is signed by the CA that issued the certificate in question (no delegated responder
certificate: the responder ID is that CA's key hash, and the CA certificate rides along in the
response), names the certificate by the request's own CertID, echoes the request's nonce and is
valid from now for the CRL TTL.  Status:

* ``revoked`` (with time and reason) if the serial was issued by that CA and revoked;
* ``good`` if it was issued by that CA and not revoked (expired certificates included: expiry is
  the relying party's check, not the responder's);
* ``unknown`` if that CA never issued the serial.

A request for a CA the issuer does not publish gets ``unauthorized``; one cryptography cannot
parse (or with more than one certificate, which this responder does not batch) gets
``malformedRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from services.issuer.domain.authority import Signer
from services.issuer.domain.crl import RevocationStatusSigner, whole_seconds
from services.issuer.domain.entries import IssuedRecord
from services.issuer.domain.revocation import RevokedCertificate, reason_flag

# Hashes a CertID may use; anything else is refused as malformed.
_CERT_ID_HASHES = (hashes.SHA1, hashes.SHA256, hashes.SHA384, hashes.SHA512)


class OcspRepository(Protocol):
    def issued_record(self, serial: str) -> IssuedRecord | None: ...

    def revoked_certificate(self, serial: str) -> RevokedCertificate | None: ...


@dataclass(frozen=True)
class OcspAnswer:
    der: bytes
    # successful, malformedRequest, unauthorized... (the HTTP layer maps malformed to 400)
    status: ocsp.OCSPResponseStatus
    cert_status: ocsp.OCSPCertStatus | None = None


def _digest(algorithm: hashes.HashAlgorithm, data: bytes) -> bytes:
    digest = hashes.Hash(algorithm)
    digest.update(data)
    return digest.finalize()


def cert_id_hashes(
    ca_cert: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of a CA as a CertID names it: the hash of its subject DER
    and of the value of its subjectPublicKey BIT STRING (RFC 6960 4.1.1)."""
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TypeError("the issuer's signing CAs have EC keys")
    # For an EC key the BIT STRING holds the X9.62 point, uncompressed as cryptography encodes it.
    point = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return _digest(algorithm, ca_cert.subject.public_bytes()), _digest(algorithm, point)


def unsuccessful(status: ocsp.OCSPResponseStatus) -> OcspAnswer:
    response = ocsp.OCSPResponseBuilder.build_unsuccessful(status)
    return OcspAnswer(response.public_bytes(serialization.Encoding.DER), status)


class OcspResponder(RevocationStatusSigner[OcspRepository]):
    def respond(self, request_der: bytes) -> OcspAnswer:
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            nonce = _nonce(request)
        except (ValueError, UnsupportedAlgorithm):
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        if not isinstance(algorithm, _CERT_ID_HASHES):
            return unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        signer = self._signer_for(request, algorithm)
        if signer is None:
            return unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        return self._answer(request, algorithm, signer, nonce)

    def _signer_for(
        self, request: ocsp.OCSPRequest, algorithm: hashes.HashAlgorithm
    ) -> Signer | None:
        wanted = (request.issuer_name_hash, request.issuer_key_hash)
        for signer in self._signers.signers():
            if cert_id_hashes(signer.ca_cert, algorithm) == wanted:
                return signer
        return None

    def _answer(
        self,
        request: ocsp.OCSPRequest,
        algorithm: hashes.HashAlgorithm,
        signer: Signer,
        nonce: bytes | None,
    ) -> OcspAnswer:
        serial = format(request.serial_number, "x")
        now = whole_seconds(self._clock())
        ours = (None, signer.serial)
        revoked = self._repository.revoked_certificate(serial)
        revocation_time: datetime | None = None
        reason: x509.ReasonFlags | None = None
        if revoked is not None and revoked.ca_serial in ours:
            status = ocsp.OCSPCertStatus.REVOKED
            revocation_time, reason = whole_seconds(revoked.revoked_at), reason_flag(revoked.reason)
        else:
            issued = self._repository.issued_record(serial)
            known = issued is not None and issued.ca_serial in ours
            status = ocsp.OCSPCertStatus.GOOD if known else ocsp.OCSPCertStatus.UNKNOWN
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                issuer_name_hash=request.issuer_name_hash,
                issuer_key_hash=request.issuer_key_hash,
                serial_number=request.serial_number,
                algorithm=algorithm,
                cert_status=status,
                this_update=now,
                next_update=now + self._ttl,
                revocation_time=revocation_time,
                revocation_reason=reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signer.ca_cert)
            .certificates([signer.ca_cert])
        )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        response = builder.sign(signer.ca_key, hashes.SHA256())
        return OcspAnswer(
            response.public_bytes(serialization.Encoding.DER),
            ocsp.OCSPResponseStatus.SUCCESSFUL,
            status,
        )


def _nonce(request: ocsp.OCSPRequest) -> bytes | None:
    try:
        return request.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None
