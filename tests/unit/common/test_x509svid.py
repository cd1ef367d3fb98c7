import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common.errors import InvalidSpiffeIdError, SvidVerificationError
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_der_chain, verify_x509_svid
from tests.support.pki import (
    CA_KEY_USAGE,
    TRUST_DOMAIN,
    WORKLOAD_ID,
    Issued,
    KeyUsageSpec,
    create_intermediate_ca,
    create_leaf,
    create_root_ca,
    generate_key,
    issue_certificate,
    resign_with_sha1,
)

EXPECTED_ID = SpiffeId.parse(WORKLOAD_ID)
NOW = datetime.now(UTC)


@pytest.fixture(scope="module")
def root() -> Issued:
    return create_root_ca()


@pytest.fixture(scope="module")
def intermediate(root: Issued) -> Issued:
    return create_intermediate_ca(root)


@pytest.fixture(scope="module")
def rsa_2048_key() -> rsa.RSAPrivateKey:
    key = generate_key("rsa-2048")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def rsa_1024_key() -> rsa.RSAPrivateKey:
    key = generate_key("rsa-1024")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def foreign_root() -> Issued:
    return create_root_ca(common_name="someone else's root CA")


def verify(
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    *,
    now: datetime | None = None,
) -> SpiffeId:
    return verify_x509_svid(chain, bundle, trust_domain=TRUST_DOMAIN, now=now)


def refused(fragment: str) -> pytest.RaisesExc[SvidVerificationError]:
    return pytest.raises(SvidVerificationError, match=re.escape(fragment))


def leaf_chain(intermediate: Issued, **knobs: Any) -> list[x509.Certificate]:
    leaf = create_leaf(intermediate, **knobs)
    return [leaf.certificate, intermediate.certificate]


# --- accepted ------------------------------------------------------------------------------


def test_accepts_leaf_intermediate_root(root: Issued, intermediate: Issued) -> None:
    assert verify(leaf_chain(intermediate), [root.certificate]) == EXPECTED_ID


def test_accepts_leaf_chaining_directly_to_an_intermediate_in_the_bundle(
    root: Issued, intermediate: Issued
) -> None:
    leaf = create_leaf(intermediate).certificate
    assert verify([leaf], [intermediate.certificate]) == EXPECTED_ID
    assert verify([leaf], [root.certificate, intermediate.certificate]) == EXPECTED_ID


def test_accepts_leaf_issued_by_the_root(root: Issued) -> None:
    assert verify([create_leaf(root).certificate], [root.certificate]) == EXPECTED_ID


def test_accepts_chain_that_includes_the_root(root: Issued, intermediate: Issued) -> None:
    chain = [*leaf_chain(intermediate), root.certificate]
    assert verify(chain, [root.certificate]) == EXPECTED_ID


def test_accepts_unrelated_anchors_before_the_right_one(
    root: Issued, intermediate: Issued, foreign_root: Issued
) -> None:
    bundle = [foreign_root.certificate, root.certificate]
    assert verify(leaf_chain(intermediate), bundle) == EXPECTED_ID


def test_accepts_two_intermediates(root: Issued) -> None:
    upper = create_intermediate_ca(root, common_name="upper CA", path_length=1)
    lower = create_intermediate_ca(upper, common_name="lower CA", path_length=0)
    chain = [create_leaf(lower).certificate, lower.certificate, upper.certificate]
    assert verify(chain, [root.certificate]) == EXPECTED_ID


def test_accepts_signing_ca_without_spiffe_id_like_vault_intermediates(root: Issued) -> None:
    vault_like = create_intermediate_ca(root, uri_sans=[])
    assert verify(leaf_chain(vault_like), [root.certificate]) == EXPECTED_ID


def test_ignores_non_spiffe_uris_on_signing_cas(root: Issued) -> None:
    ca = create_intermediate_ca(
        root, uri_sans=["https://pki.ztbank.example/ca", f"spiffe://{TRUST_DOMAIN}"]
    )
    assert verify(leaf_chain(ca), [root.certificate]) == EXPECTED_ID


def test_accepts_dns_sans_beside_the_uri_san(root: Issued, intermediate: Issued) -> None:
    chain = leaf_chain(intermediate, dns_sans=["transfer-engine.ztbank.example"])
    assert verify(chain, [root.certificate]) == EXPECTED_ID


def test_accepts_p384_and_rsa_2048_leaves(
    root: Issued, intermediate: Issued, rsa_2048_key: rsa.RSAPrivateKey
) -> None:
    assert verify(leaf_chain(intermediate, key_type="ec-p384"), [root.certificate])
    assert verify(leaf_chain(intermediate, key=rsa_2048_key), [root.certificate])


def test_accepts_sha384_and_sha512_signatures(root: Issued, intermediate: Issued) -> None:
    for algorithm in (hashes.SHA384(), hashes.SHA512()):
        assert verify(leaf_chain(intermediate, hash_algorithm=algorithm), [root.certificate])


def test_verify_der_chain(root: Issued, intermediate: Issued) -> None:
    der = [c.public_bytes(Encoding.DER) for c in leaf_chain(intermediate)]
    result = verify_der_chain(der, [root.certificate], trust_domain=TRUST_DOMAIN)
    assert result == EXPECTED_ID


# --- refused: inputs -----------------------------------------------------------------------


def test_refuses_empty_chain(root: Issued) -> None:
    with refused("empty chain"):
        verify([], [root.certificate])


def test_refuses_empty_bundle(intermediate: Issued) -> None:
    with refused("empty trust bundle"):
        verify(leaf_chain(intermediate), [])


def test_refuses_garbage_der(root: Issued, intermediate: Issued) -> None:
    good = create_leaf(intermediate).certificate.public_bytes(Encoding.DER)
    with refused("chain certificate 1 is not a valid DER certificate"):
        verify_der_chain([good, b"\x30\x03garbage"], [root.certificate], trust_domain=TRUST_DOMAIN)
    with refused("chain certificate 0 is not a valid DER certificate"):
        verify_der_chain([good + b"\x00"], [root.certificate], trust_domain=TRUST_DOMAIN)


def test_refuses_overlong_chain(root: Issued, intermediate: Issued) -> None:
    chain = [*leaf_chain(intermediate), *[intermediate.certificate] * 3]
    with refused("chain too long"):
        verify(chain, [root.certificate])


def test_caller_errors_are_not_verification_errors(root: Issued, intermediate: Issued) -> None:
    with pytest.raises(InvalidSpiffeIdError):
        verify_x509_svid(leaf_chain(intermediate), [root.certificate], trust_domain="Bad TD")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(leaf_chain(intermediate), [root.certificate], now=datetime(2030, 1, 1))


# --- refused: the leaf's identity ----------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "fragment"),
    [
        ({"uri_sans": ()}, "exactly one URI SAN, found 0"),
        ({"uri_sans": (), "dns_sans": ["svc.ztbank.example"]}, "exactly one URI SAN, found 0"),
        (
            {"uri_sans": (WORKLOAD_ID, f"spiffe://{TRUST_DOMAIN}/other")},
            "exactly one URI SAN, found 2",
        ),
        ({"uri_sans": ("https://ztbank.example/svc",)}, "URI SAN is not a valid SPIFFE ID"),
        ({"uri_sans": ("SPIFFE://ztbank.example/svc",)}, "URI SAN is not a valid SPIFFE ID"),
        ({"uri_sans": ("spiffe://ztbank.example/a//b",)}, "URI SAN is not a valid SPIFFE ID"),
        ({"uri_sans": ("spiffe://other.example/svc",)}, "is not in trust domain 'ztbank.example'"),
        ({"uri_sans": (f"spiffe://{TRUST_DOMAIN}",)}, "has no path"),
    ],
    ids=[
        "no-san",
        "dns-only",
        "two-uris",
        "non-spiffe-uri",
        "bad-spiffe-syntax",
        "empty-segment",
        "wrong-trust-domain",
        "trust-domain-id",
    ],
)
def test_refuses_leaf_identity(
    root: Issued, intermediate: Issued, knobs: dict[str, Any], fragment: str
) -> None:
    with refused(fragment):
        verify(leaf_chain(intermediate, **knobs), [root.certificate])


# --- refused: the leaf's extensions --------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "fragment"),
    [
        ({"is_ca": True}, "leaf is a CA certificate"),
        ({"basic_constraints": False}, "leaf has no basicConstraints"),
        ({"key_usage": None}, "leaf has no keyUsage"),
        (
            {"key_usage": KeyUsageSpec(digital_signature=True, critical=False)},
            "keyUsage is not marked critical",
        ),
        (
            {"key_usage": KeyUsageSpec(digital_signature=True, key_cert_sign=True)},
            "keyUsage includes keyCertSign",
        ),
        (
            {"key_usage": KeyUsageSpec(digital_signature=True, crl_sign=True)},
            "keyUsage includes cRLSign",
        ),
        ({"key_usage": KeyUsageSpec(key_encipherment=True)}, "keyUsage lacks digitalSignature"),
        ({"extended_key_usage": None}, "leaf has no extendedKeyUsage"),
        (
            {"extended_key_usage": [ExtendedKeyUsageOID.SERVER_AUTH]},
            "extendedKeyUsage lacks clientAuth",
        ),
        (
            {"extended_key_usage": [ExtendedKeyUsageOID.CLIENT_AUTH]},
            "extendedKeyUsage lacks serverAuth",
        ),
        ({"extended_key_usage": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]}, "lacks serverAuth"),
    ],
    ids=[
        "ca-leaf",
        "no-basic-constraints",
        "no-key-usage",
        "key-usage-not-critical",
        "key-cert-sign",
        "crl-sign",
        "no-digital-signature",
        "no-eku",
        "eku-server-only",
        "eku-client-only",
        "eku-any",
    ],
)
def test_refuses_leaf_extensions(
    root: Issued, intermediate: Issued, knobs: dict[str, Any], fragment: str
) -> None:
    with refused(fragment):
        verify(leaf_chain(intermediate, **knobs), [root.certificate])


# --- refused: keys and signature algorithms ------------------------------------------------


def test_refuses_rsa_1024_leaf(
    root: Issued, intermediate: Issued, rsa_1024_key: rsa.RSAPrivateKey
) -> None:
    with refused("leaf key too weak: RSA 1024 bits"):
        verify(leaf_chain(intermediate, key=rsa_1024_key), [root.certificate])


def test_refuses_p521_leaf(root: Issued, intermediate: Issued) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    with refused("leaf key curve secp521r1 is not allowed"):
        verify(leaf_chain(intermediate, key=key), [root.certificate])


def test_refuses_rsa_1024_intermediate(root: Issued, rsa_1024_key: rsa.RSAPrivateKey) -> None:
    weak = create_intermediate_ca(root, key=rsa_1024_key)
    with refused("intermediate 'CN=ztbank test intermediate CA' key too weak"):
        verify(leaf_chain(weak), [root.certificate])


def test_refuses_sha224_leaf_signature(root: Issued, intermediate: Issued) -> None:
    with refused("leaf signature hash sha224 is too weak"):
        verify(leaf_chain(intermediate, hash_algorithm=hashes.SHA224()), [root.certificate])


def test_refuses_sha224_intermediate_signature(root: Issued) -> None:
    weak = create_intermediate_ca(root, hash_algorithm=hashes.SHA224())
    with refused("intermediate 'CN=ztbank test intermediate CA' signature hash sha224"):
        verify(leaf_chain(weak), [root.certificate])


def test_refuses_sha1_leaf_signature(root: Issued, rsa_2048_key: rsa.RSAPrivateKey) -> None:
    rsa_ca = create_intermediate_ca(root, key=rsa_2048_key)
    leaf = create_leaf(rsa_ca).certificate
    try:
        sha1_leaf = resign_with_sha1(leaf, rsa_ca)
    except Exception as error:  # e.g. a crypto policy that forbids SHA-1 signing outright
        pytest.skip(f"cannot produce a SHA-1 signature here: {error}")
    assert isinstance(sha1_leaf.signature_hash_algorithm, hashes.SHA1)
    # The patched certificate must be genuinely signed, or the test proves nothing;
    # verify_directly_issued_by no longer accepts SHA-1, so check the signature by hand.
    issuer_key = rsa_ca.certificate.public_key()
    assert isinstance(issuer_key, rsa.RSAPublicKey)
    issuer_key.verify(
        sha1_leaf.signature, sha1_leaf.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA1()
    )
    assert verify([leaf, rsa_ca.certificate], [root.certificate]) == EXPECTED_ID
    with refused("leaf signature hash sha1 is too weak"):
        verify([sha1_leaf, rsa_ca.certificate], [root.certificate])


# --- refused: validity ---------------------------------------------------------------------


def test_refuses_expired_leaf(root: Issued, intermediate: Issued) -> None:
    chain = leaf_chain(
        intermediate, not_before=NOW - timedelta(days=2), not_after=NOW - timedelta(seconds=1)
    )
    with refused("leaf has expired"):
        verify(chain, [root.certificate])


def test_refuses_not_yet_valid_leaf(root: Issued, intermediate: Issued) -> None:
    # From the clock at the test, not at import: a slow suite can pass NOW + 5 min.
    chain = leaf_chain(intermediate, not_before=datetime.now(UTC) + timedelta(minutes=5))
    with refused("leaf is not yet valid"):
        verify(chain, [root.certificate])


def test_validity_is_judged_at_now(root: Issued, intermediate: Issued) -> None:
    chain = leaf_chain(intermediate)
    assert verify(chain, [root.certificate], now=NOW) == EXPECTED_ID
    with refused("leaf has expired"):
        verify(chain, [root.certificate], now=NOW + timedelta(days=2))
    with refused("leaf is not yet valid"):
        verify(chain, [root.certificate], now=NOW - timedelta(days=2))


def test_refuses_expired_intermediate(root: Issued) -> None:
    expired = create_intermediate_ca(
        root, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    with refused("intermediate 'CN=ztbank test intermediate CA' has expired"):
        verify(leaf_chain(expired), [root.certificate])


def test_refuses_expired_trust_anchor() -> None:
    old_root = create_root_ca(
        not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)
    )
    with refused("trust anchor 'CN=ztbank test root CA' has expired"):
        verify(leaf_chain(create_intermediate_ca(old_root)), [old_root.certificate])


# --- refused: the path ---------------------------------------------------------------------


def test_refuses_leaf_from_a_foreign_ca(root: Issued, foreign_root: Issued) -> None:
    foreign = create_intermediate_ca(foreign_root, common_name="foreign CA")
    with refused("leaf does not chain to the trust bundle"):
        verify([create_leaf(foreign).certificate], [root.certificate])
    with refused("intermediate 'CN=foreign CA' does not chain to the trust bundle"):
        verify(leaf_chain(foreign), [root.certificate])


def test_refuses_impostor_ca_with_the_same_name(root: Issued, intermediate: Issued) -> None:
    impostor = create_intermediate_ca(create_root_ca())
    assert impostor.certificate.subject == intermediate.certificate.subject
    leaf = create_leaf(impostor).certificate
    with refused("leaf does not chain to the trust bundle"):
        verify([leaf], [intermediate.certificate])
    with refused("does not chain to the trust bundle"):
        verify([leaf, intermediate.certificate], [root.certificate])


def test_refuses_self_signed_leaf(root: Issued) -> None:
    self_signed = create_leaf(None).certificate
    with refused("leaf is self-signed"):
        verify([self_signed], [root.certificate])
    with refused("leaf is self-signed"):
        verify([self_signed], [self_signed])


@pytest.mark.parametrize(
    ("knobs", "fragment"),
    [
        ({"is_ca": False, "path_length": None}, "is not a CA"),
        ({"basic_constraints": False}, "is not a CA"),
        ({"key_usage": KeyUsageSpec(digital_signature=True)}, "its keyUsage lacks keyCertSign"),
        ({"key_usage": None}, "its keyUsage lacks keyCertSign"),
    ],
    ids=["ca-false", "no-basic-constraints", "no-key-cert-sign", "no-key-usage"],
)
def test_refuses_intermediate_that_is_not_a_signing_ca(
    root: Issued, knobs: dict[str, Any], fragment: str
) -> None:
    bad = create_intermediate_ca(root, **knobs)
    with refused(
        f"intermediate 'CN=ztbank test intermediate CA' signs a certificate but {fragment}"
    ):
        verify(leaf_chain(bad), [root.certificate])
    with refused(fragment):
        verify([create_leaf(bad).certificate], [bad.certificate])


def test_refuses_root_that_is_not_a_signing_ca(intermediate: Issued) -> None:
    no_ca_usage = create_root_ca(key_usage=KeyUsageSpec(digital_signature=True))
    with refused("trust anchor 'CN=ztbank test root CA' signs a certificate but"):
        verify(leaf_chain(create_intermediate_ca(no_ca_usage)), [no_ca_usage.certificate])


def test_refuses_violated_path_length() -> None:
    strict_root = create_root_ca(path_length=0)
    with refused("trust anchor 'CN=ztbank test root CA' pathLenConstraint 0 exceeded"):
        verify(leaf_chain(create_intermediate_ca(strict_root)), [strict_root.certificate])


def test_refuses_violated_path_length_of_an_intermediate(root: Issued) -> None:
    upper = create_intermediate_ca(root, common_name="upper CA", path_length=0)
    lower = create_intermediate_ca(upper, common_name="lower CA", path_length=0)
    chain = [create_leaf(lower).certificate, lower.certificate, upper.certificate]
    with refused("intermediate 'CN=upper CA' pathLenConstraint 0 exceeded"):
        verify(chain, [root.certificate])


def test_refuses_signing_ca_of_another_trust_domain(root: Issued) -> None:
    other = create_intermediate_ca(root, trust_domain="other.example")
    with refused("is a CA of trust domain 'other.example', not 'ztbank.example'"):
        verify(leaf_chain(other), [root.certificate])
    with refused("is a CA of trust domain 'other.example'"):
        verify([create_leaf(other).certificate], [other.certificate])


def test_refuses_trust_anchor_of_another_trust_domain() -> None:
    other_root = create_root_ca(trust_domain="other.example")
    with refused("trust anchor 'CN=ztbank test root CA' is a CA of trust domain 'other.example'"):
        verify(leaf_chain(create_intermediate_ca(other_root)), [other_root.certificate])


def test_refuses_signing_ca_with_malformed_spiffe_id(root: Issued) -> None:
    sloppy = create_intermediate_ca(root, uri_sans=["SPIFFE://ztbank.example"])
    with refused("intermediate 'CN=ztbank test intermediate CA' URI SAN is not a valid SPIFFE ID"):
        verify(leaf_chain(sloppy), [root.certificate])


def test_refuses_name_cycle_without_looping(root: Issued) -> None:
    key_a, key_b = generate_key(), generate_key()
    b_stub = issue_certificate(common_name="B", signer=None, key=key_b, is_ca=True)
    a = issue_certificate(
        common_name="A", signer=b_stub, key=key_a, is_ca=True, key_usage=CA_KEY_USAGE
    )
    b = issue_certificate(common_name="B", signer=a, key=key_b, is_ca=True, key_usage=CA_KEY_USAGE)
    chain = [create_leaf(a).certificate, a.certificate, b.certificate]
    with refused("intermediate 'CN=B' does not chain to the trust bundle"):
        verify(chain, [root.certificate])
