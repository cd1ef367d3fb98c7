"""The OCSP responder: good, revoked, unknown; signed by the issuing CA; nonce echoed."""

from __future__ import annotations

import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from services.issuer.domain.ocsp import OcspAnswer, cert_id_hashes
from tests.unit.issuer.revocation_world import CRL_TTL, GATEWAY, LEDGER, SECOND, World


def request_for(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm or hashes.SHA1())
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def request_by_serial(issuer: x509.Certificate, serial: int) -> bytes:
    name_hash, key_hash = cert_id_hashes(issuer, hashes.SHA1())
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(name_hash, key_hash, serial, hashes.SHA1())
        .build()
    )
    return request.public_bytes(serialization.Encoding.DER)


def parse(answer: OcspAnswer) -> ocsp.OCSPResponse:
    response = ocsp.load_der_ocsp_response(answer.der)
    assert response.response_status == answer.status
    return response


def assert_signed_by(response: ocsp.OCSPResponse, ca: x509.Certificate) -> None:
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert response.responder_key_hash == ski.digest  # responder ID by key hash
    assert response.responder_name is None
    assert response.certificates == [ca]


# -- statuses ---------------------------------------------------------------------------------


def test_good_for_an_issued_unrevoked_certificate(world: World) -> None:
    svid = world.service.mint(LEDGER)
    answer = world.ocsp.respond(request_for(svid.leaf, svid.chain[1]))

    assert answer.status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert answer.cert_status == ocsp.OCSPCertStatus.GOOD
    response = parse(answer)
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert response.serial_number == svid.leaf.serial_number
    assert response.this_update_utc == world.clock()
    assert response.next_update_utc == world.clock() + CRL_TTL
    assert response.revocation_time_utc is None
    assert_signed_by(response, svid.chain[1])


def test_revoked_with_time_and_reason(world: World) -> None:
    svid = world.service.mint(LEDGER)
    world.service.revoke_serial(format(svid.leaf.serial_number, "x"), "keyCompromise")
    revoked_at = world.clock()
    world.clock.advance(SECOND)

    response = parse(world.ocsp.respond(request_for(svid.leaf, svid.chain[1])))

    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_time_utc == revoked_at
    assert response.revocation_reason is x509.ReasonFlags.key_compromise
    assert response.this_update_utc == world.clock()
    assert_signed_by(response, svid.chain[1])


def test_revoked_by_id_without_a_stated_reason(world: World) -> None:
    svid = world.service.mint(GATEWAY)
    world.service.revoke_spiffe_id(GATEWAY)
    response = parse(world.ocsp.respond(request_for(svid.leaf, svid.chain[1])))
    assert response.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert response.revocation_reason is None


def test_unknown_for_a_serial_the_ca_never_issued(world: World) -> None:
    world.service.mint(LEDGER)
    answer = world.ocsp.respond(request_by_serial(world.signer().ca_cert, 0xC0FFEE))
    assert answer.cert_status == ocsp.OCSPCertStatus.UNKNOWN
    response = parse(answer)
    assert response.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert response.serial_number == 0xC0FFEE
    assert_signed_by(response, world.signer().ca_cert)


def test_answers_come_from_the_ca_that_issued_the_certificate(world: World) -> None:
    world.approach_rotation()
    old = world.service.mint(LEDGER)
    world.rotate()
    new = world.service.mint(LEDGER)
    world.service.revoke_serial(format(old.leaf.serial_number, "x"))

    old_answer = parse(world.ocsp.respond(request_for(old.leaf, old.chain[1])))
    new_answer = parse(world.ocsp.respond(request_for(new.leaf, new.chain[1])))

    assert old_answer.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert_signed_by(old_answer, old.chain[1])
    assert new_answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert_signed_by(new_answer, new.chain[1])
    # Asking the other CA about a serial it did not issue: unknown, even when revoked elsewhere.
    crossed = world.ocsp.respond(request_by_serial(new.chain[1], old.leaf.serial_number))
    assert crossed.cert_status == ocsp.OCSPCertStatus.UNKNOWN


@pytest.mark.parametrize("algorithm", [hashes.SHA1(), hashes.SHA256(), hashes.SHA384()])
def test_cert_id_hash_algorithm_is_followed(world: World, algorithm: hashes.HashAlgorithm) -> None:
    svid = world.service.mint(LEDGER)
    request = ocsp.load_der_ocsp_request(request_for(svid.leaf, svid.chain[1], algorithm=algorithm))
    response = parse(world.ocsp.respond(request_for(svid.leaf, svid.chain[1], algorithm=algorithm)))
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert isinstance(response.hash_algorithm, type(algorithm))
    assert response.issuer_key_hash == request.issuer_key_hash
    assert response.issuer_name_hash == request.issuer_name_hash


# -- nonce ------------------------------------------------------------------------------------


def test_nonce_is_echoed(world: World) -> None:
    svid = world.service.mint(LEDGER)
    nonce = os.urandom(16)
    response = parse(world.ocsp.respond(request_for(svid.leaf, svid.chain[1], nonce=nonce)))
    echoed = response.extensions.get_extension_for_class(x509.OCSPNonce)
    assert echoed.value.nonce == nonce
    assert not echoed.critical


def test_no_nonce_in_the_request_no_nonce_in_the_answer(world: World) -> None:
    svid = world.service.mint(LEDGER)
    response = parse(world.ocsp.respond(request_for(svid.leaf, svid.chain[1])))
    with pytest.raises(x509.ExtensionNotFound):
        response.extensions.get_extension_for_class(x509.OCSPNonce)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"", b"not DER at all", b"\x30\x03\x02\x01\x01", b"\x30\x82\xff\xff" + b"\x00" * 8]
)
def test_malformed_request(world: World, body: bytes) -> None:
    answer = world.ocsp.respond(body)
    assert answer.status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    assert answer.cert_status is None
    assert (
        ocsp.load_der_ocsp_response(answer.der).response_status
        == ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )


def test_unsupported_cert_id_hash_is_malformed(world: World) -> None:
    svid = world.service.mint(LEDGER)
    request = request_for(svid.leaf, svid.chain[1], algorithm=hashes.SHA224())
    assert world.ocsp.respond(request).status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_a_ca_the_issuer_does_not_publish_is_unauthorized(world: World) -> None:
    svid = world.service.mint(LEDGER)
    # The root is a CA, but not one of the issuer's signing CAs.
    answer = world.ocsp.respond(request_by_serial(world.root_ca, svid.leaf.serial_number))
    assert answer.status == ocsp.OCSPResponseStatus.UNAUTHORIZED
    assert (
        ocsp.load_der_ocsp_response(answer.der).response_status
        == ocsp.OCSPResponseStatus.UNAUTHORIZED
    )


def test_cert_id_hashes_match_what_cryptography_puts_in_a_request(world: World) -> None:
    svid = world.service.mint(LEDGER)
    for algorithm in (hashes.SHA1(), hashes.SHA256()):
        request = ocsp.load_der_ocsp_request(
            request_for(svid.leaf, svid.chain[1], algorithm=algorithm)
        )
        assert cert_id_hashes(svid.chain[1], algorithm) == (
            request.issuer_name_hash,
            request.issuer_key_hash,
        )
