"""ztbank's certificate templates pass strict verifiers that know nothing of SPIFFE."""

from __future__ import annotations

import pytest
from cryptography import x509

from services.issuer.domain.certificates import build_x509_svid, new_key
from tests.support.strict_verifiers import cryptography_verifies, openssl_strict_verify
from tests.unit.issuer.test_certificates import SVID_ID, TTL, Pki

CRL_URL = "http://127.0.0.1:8443/crl/ca.crl"
OCSP_URL = "http://127.0.0.1:8443/ocsp"


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="module")
def svid(pki: Pki) -> x509.Certificate:
    """An SVID with every optional part the issuer can add: DNS SANs, CRL and OCSP pointers."""
    return build_x509_svid(
        SVID_ID,
        new_key().public_key(),
        ca_cert=pki.ca,
        ca_key=pki.ca_key,
        ttl=TTL,
        dns_names=("ledger",),
        now=pki.now,
        crl_url=CRL_URL,
        ocsp_url=OCSP_URL,
    )


def test_the_uri_san_is_not_critical_beside_a_subject(svid: x509.Certificate) -> None:
    # RFC 5280 4.2.1.6: critical only when the subject is empty; strict verifiers enforce it.
    assert svid.subject != x509.Name([])
    assert not svid.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_cryptography_verifier_accepts_an_svid_and_sees_its_spiffe_id(
    pki: Pki, svid: x509.Certificate
) -> None:
    subjects = cryptography_verifies(svid, [pki.ca], [pki.root], now=pki.now)
    assert x509.UniformResourceIdentifier(str(SVID_ID)) in subjects


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_x509_strict_accepts_an_svid(
    pki: Pki, svid: x509.Certificate, purpose: str
) -> None:
    result = openssl_strict_verify(svid, [pki.ca], [pki.root], purpose=purpose)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")
