import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from services.common.errors import CommonError, InvalidCertificateError
from services.common.identity.pem import (
    certificates_to_der,
    certificates_to_pem,
    fingerprint_sha256,
    load_der_certificates,
    load_pem_certificates,
    serial_hex,
)
from tests.support.pki import (
    Issued,
    create_intermediate_ca,
    create_leaf,
    create_root_ca,
    write_pem_files,
)


@pytest.fixture(scope="module")
def root() -> Issued:
    return create_root_ca()


@pytest.fixture(scope="module")
def chain(root: Issued) -> list[x509.Certificate]:
    intermediate = create_intermediate_ca(root)
    return [create_leaf(intermediate).certificate, intermediate.certificate, root.certificate]


def test_pem_round_trip_keeps_order(chain: list[x509.Certificate]) -> None:
    assert load_pem_certificates(certificates_to_pem(chain)) == chain


def test_pem_ignores_text_around_blocks(chain: list[x509.Certificate]) -> None:
    data = b"subject=leaf\n" + certificates_to_pem(chain[:1]) + b"\n# trailing comment\n"
    assert load_pem_certificates(data) == chain[:1]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not pem at all",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_pem_refuses_garbage(data: bytes) -> None:
    with pytest.raises(InvalidCertificateError):
        load_pem_certificates(data)


def test_invalid_certificate_error_is_a_common_value_error() -> None:
    assert issubclass(InvalidCertificateError, CommonError)
    assert issubclass(InvalidCertificateError, ValueError)


def test_der_round_trip_splits_concatenated_certificates(chain: list[x509.Certificate]) -> None:
    der = certificates_to_der(chain)
    assert der == b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
    assert load_der_certificates(der) == chain


def test_der_single_certificate(chain: list[x509.Certificate]) -> None:
    assert load_der_certificates(certificates_to_der(chain[:1])) == chain[:1]


def test_der_with_short_form_length_is_split() -> None:
    # Real certificates always use long-form lengths; a 2-byte SEQUENCE exercises the short form
    # and must fail as "not a certificate", not as a framing error.
    with pytest.raises(InvalidCertificateError, match="not a DER certificate"):
        load_der_certificates(b"\x30\x00")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no DER certificate"),
        (b"\x04\x01\x00", "expected a DER SEQUENCE"),
        (b"\x30", "truncated"),
        (b"\x30\x82\x01", "truncated"),
        (b"\x30\x80\x00\x00", "length encoding"),
        (b"\x30\x85\x01\x01\x01\x01\x01", "length encoding"),
        (b"\x30\x82\xff\xff\x00", "truncated"),
    ],
)
def test_der_refuses_bad_framing(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidCertificateError, match=reason):
        load_der_certificates(data)


def test_der_refuses_truncated_and_trailing_data(chain: list[x509.Certificate]) -> None:
    der = certificates_to_der(chain)
    with pytest.raises(InvalidCertificateError, match="truncated"):
        load_der_certificates(der[:-1])
    with pytest.raises(InvalidCertificateError, match="expected a DER SEQUENCE"):
        load_der_certificates(der + b"\x00")


def test_der_refuses_corrupt_certificate(chain: list[x509.Certificate]) -> None:
    der = bytearray(certificates_to_der(chain[:1]))
    der[4:8] = b"\xff\xff\xff\xff"
    with pytest.raises(InvalidCertificateError, match="not a DER certificate"):
        load_der_certificates(bytes(der))


def test_fingerprint_is_lowercase_sha256_hex(chain: list[x509.Certificate]) -> None:
    fingerprint = fingerprint_sha256(chain[0])
    assert fingerprint == chain[0].fingerprint(hashes.SHA256()).hex()
    assert len(fingerprint) == 64
    assert fingerprint == fingerprint.lower()
    assert ":" not in fingerprint


def test_serial_hex_is_lowercase_without_prefix(chain: list[x509.Certificate]) -> None:
    text = serial_hex(chain[0])
    assert int(text, 16) == chain[0].serial_number
    assert text == text.lower()
    assert not text.startswith("0x")


def test_written_pem_files_load_back_and_key_is_private(root: Issued, tmp_path: Path) -> None:
    leaf = create_leaf(root)
    cert_path, key_path = tmp_path / "svid.crt", tmp_path / "svid.key"
    key_path.write_bytes(b"old")
    key_path.chmod(0o644)
    write_pem_files(leaf, cert_path=cert_path, key_path=key_path, chain=[root.certificate])
    assert load_pem_certificates(cert_path.read_bytes()) == [leaf.certificate, root.certificate]
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == leaf.key.public_key()
