from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_x509_svid
from services.issuer.domain.certificates import (
    MAX_BACKDATE,
    ROOT_LIFETIME,
    build_root_ca,
    build_signing_ca_csr,
    build_x509_svid,
    new_key,
    sign_signing_ca,
)

TD = "ztbank.example"
SVID_ID = SpiffeId.parse(f"spiffe://{TD}/env/dev/zone/az1/team/payments/svc/ledger")
TTL = timedelta(minutes=5)
SECOND = timedelta(seconds=1)


def assert_validity(cert: x509.Certificate, *, now: datetime, ttl: timedelta) -> None:
    """Lifetime exactly ``ttl``, started min(MAX_BACKDATE, ttl / 10) before ``now``.

    X.509 times have one-second resolution: both ends lose the same fraction of a second.
    """
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert not_after - not_before == ttl
    backdated = now - min(MAX_BACKDATE, ttl / 10)
    assert not_before <= backdated < not_before + SECOND


class Pki:
    def __init__(self, *, ca_ttl: timedelta = timedelta(hours=24)) -> None:
        self.now = datetime.now(UTC)
        self.root_key = new_key()
        self.root = build_root_ca(self.root_key, TD, now=self.now)
        self.ca_key = new_key()
        self.ca = sign_signing_ca(
            build_signing_ca_csr(self.ca_key, TD, "ztbank issuer CA 1"),
            issuer_cert=self.root,
            issuer_key=self.root_key,
            trust_domain=TD,
            ttl=ca_ttl,
            now=self.now,
        )

    def svid(
        self,
        *,
        ttl: timedelta = TTL,
        dns_names: tuple[str, ...] = (),
        spiffe_id: SpiffeId = SVID_ID,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> x509.Certificate:
        public_key = (key or new_key()).public_key()
        return build_x509_svid(
            spiffe_id,
            public_key,
            ca_cert=self.ca,
            ca_key=self.ca_key,
            ttl=ttl,
            dns_names=dns_names,
            now=self.now,
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


# -- X509-SVID ------------------------------------------------------------------------------


def test_svid_has_exactly_one_uri_san(pki: Pki) -> None:
    san = pki.svid().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SVID_ID)]
    assert list(san) == [x509.UniformResourceIdentifier(str(SVID_ID))]


def test_svid_dns_sans_follow_the_uri_san(pki: Pki) -> None:
    leaf = pki.svid(dns_names=("ledger", "ledger.ztbank.example"))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SVID_ID)]
    assert san.get_values_for_type(x509.DNSName) == ["ledger", "ledger.ztbank.example"]
    assert len(list(san)) == 3


def test_svid_is_not_a_ca(pki: Pki) -> None:
    basic = pki.svid().extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is False
    assert basic.value.path_length is None


def test_svid_key_usage_is_digital_signature_only(pki: Pki) -> None:
    usage = pki.svid().extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert not usage.value.content_commitment
    assert not usage.value.key_encipherment
    assert not usage.value.data_encipherment
    assert not usage.value.key_agreement


def test_svid_extended_key_usage_is_server_and_client_auth(pki: Pki) -> None:
    purposes = pki.svid().extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(purposes) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_new_keys_are_ecdsa_p256() -> None:
    key = new_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)


def test_svid_certifies_the_given_p256_key_signed_with_sha256(pki: Pki) -> None:
    key = new_key()
    leaf = pki.svid(key=key)
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert public_key == key.public_key()
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    leaf.verify_directly_issued_by(pki.ca)


@pytest.mark.parametrize(
    "ttl", [TTL, timedelta(seconds=10), timedelta(seconds=30), timedelta(hours=1)]
)
def test_svid_lifetime_is_exactly_the_ttl(pki: Pki, ttl: timedelta) -> None:
    leaf = pki.svid(ttl=ttl)
    assert_validity(leaf, now=pki.now, ttl=ttl)
    assert leaf.not_valid_before_utc >= pki.ca.not_valid_before_utc


def test_svid_never_outlives_its_ca() -> None:
    short = Pki(ca_ttl=timedelta(minutes=2))
    leaf = short.svid(ttl=timedelta(minutes=10))
    assert leaf.not_valid_after_utc == short.ca.not_valid_after_utc
    assert short.ca.not_valid_after_utc < short.now + timedelta(minutes=10)


def test_svid_serials_are_positive_unique_and_at_most_20_octets(pki: Pki) -> None:
    serials = [pki.svid().serial_number for _ in range(20)]
    assert len(set(serials)) == len(serials)
    for serial in serials:
        assert serial > 0
        # A positive DER INTEGER of at most 20 octets holds at most 159 value bits.
        assert serial.bit_length() <= 159
    # Random rather than counting: the high bits are used too.
    assert max(s.bit_length() for s in serials) > 150


def test_svid_verifies_against_the_root(pki: Pki) -> None:
    leaf = pki.svid()
    assert verify_x509_svid([leaf, pki.ca], [pki.root], trust_domain=TD) == SVID_ID


def test_svid_verifies_against_a_bundle_of_only_the_signing_ca(pki: Pki) -> None:
    leaf = pki.svid(dns_names=("ledger",))
    assert verify_x509_svid([leaf], [pki.ca], trust_domain=TD) == SVID_ID


def test_svid_subject_names_the_service(pki: Pki) -> None:
    names = pki.svid().subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [n.value for n in names] == ["ledger"]


# -- signing CA and root --------------------------------------------------------------------


def test_signing_ca_signs_leaves_only(pki: Pki) -> None:
    basic = pki.ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is True
    assert basic.value.path_length == 0


@pytest.mark.parametrize("which", ["root", "ca"])
def test_ca_key_usage(pki: Pki, which: str) -> None:
    cert = pki.root if which == "root" else pki.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign


@pytest.mark.parametrize("which", ["root", "ca"])
def test_ca_uri_san_is_the_trust_domain(pki: Pki, which: str) -> None:
    cert = pki.root if which == "root" else pki.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]


def test_signing_ca_is_issued_by_the_root(pki: Pki) -> None:
    assert pki.ca.issuer == pki.root.subject
    pki.ca.verify_directly_issued_by(pki.root)
    assert pki.ca.public_key() == pki.ca_key.public_key()
    assert_validity(pki.ca, now=pki.now, ttl=timedelta(hours=24))
    assert pki.ca.serial_number > 0
    assert pki.ca.serial_number.bit_length() <= 159


def test_signing_ca_never_outlives_its_issuer() -> None:
    now = datetime.now(UTC)
    root_key = new_key()
    root = build_root_ca(root_key, TD, now=now - timedelta(days=3650) + timedelta(hours=1))
    ca = sign_signing_ca(
        build_signing_ca_csr(new_key(), TD, "ztbank issuer CA 1"),
        issuer_cert=root,
        issuer_key=root_key,
        trust_domain=TD,
        ttl=timedelta(hours=24),
        now=now,
    )
    assert ca.not_valid_after_utc == root.not_valid_after_utc


def test_root_is_self_signed_with_room_for_one_intermediate(pki: Pki) -> None:
    basic = pki.root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca is True
    assert basic.value.path_length == 1
    assert pki.root.issuer == pki.root.subject
    pki.root.verify_directly_issued_by(pki.root)


def test_root_lifetime_is_exactly_its_ttl(pki: Pki) -> None:
    assert_validity(pki.root, now=pki.now, ttl=ROOT_LIFETIME)


# -- revocation pointers ----------------------------------------------------------------------

CRL_URL = "http://127.0.0.1:8180/crl/abc.crl"
OCSP_URL = "http://127.0.0.1:8180/ocsp"


def test_svid_names_its_crl_and_ocsp_responder_when_given(pki: Pki) -> None:
    leaf = build_x509_svid(
        SVID_ID,
        new_key().public_key(),
        ca_cert=pki.ca,
        ca_key=pki.ca_key,
        ttl=TTL,
        crl_url=CRL_URL,
        ocsp_url=OCSP_URL,
    )
    points = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not points.critical
    (point,) = points.value
    assert point.full_name == [x509.UniformResourceIdentifier(CRL_URL)]
    assert (point.relative_name, point.reasons, point.crl_issuer) == (None, None, None)
    access = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert not access.critical
    assert [(d.access_method, d.access_location) for d in access.value] == [
        (AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(OCSP_URL))
    ]
    # Still exactly one URI SAN, and still a valid X509-SVID.
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SVID_ID)]
    assert verify_x509_svid([leaf], [pki.ca], trust_domain=TD, now=pki.now) == SVID_ID


def test_svid_without_urls_has_no_revocation_pointers(pki: Pki) -> None:
    leaf = pki.svid()
    for kind in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            leaf.extensions.get_extension_for_class(kind)
