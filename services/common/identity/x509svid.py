"""X509-SVID verification, run on every mTLS connection after OpenSSL's own handshake checks.

OpenSSL validates a generic certificate path and accepts certificates that the X509-SVID
specification forbids: no URI SAN or several, a CA certificate as the leaf, a signing CA of another
trust domain.  Every rule is therefore checked here explicitly, each failure with a message naming
the rule, and the path is rebuilt and its signatures verified again rather than trusting OpenSSL.

Beyond the specification, ztbank policy requires serverAuth and clientAuth on every SVID (each
workload is both client and server), ECDSA P-256/P-384 or RSA >= 2048 keys and SHA-256 or stronger
signatures everywhere in the path, not only on the leaf: a path is as strong as its weakest link.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.common.errors import InvalidSpiffeIdError, SvidVerificationError
from services.common.identity.spiffe_id import SpiffeId, validate_trust_domain

# Leaf plus at most three intermediates; real paths are two or three long, and the bound keeps
# path building trivially finite whatever the peer sends.
MAX_CHAIN_LENGTH = 4
MIN_RSA_BITS = 2048
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
_ALLOWED_HASHES = (
    hashes.SHA256,
    hashes.SHA384,
    hashes.SHA512,
    hashes.SHA3_256,
    hashes.SHA3_384,
    hashes.SHA3_512,
)
_REQUIRED_PURPOSES = (
    (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
    (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
)
_LEAF = "leaf"

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def verify_x509_svid(
    chain: Sequence[x509.Certificate],
    bundle: Sequence[x509.Certificate],
    *,
    trust_domain: str,
    now: datetime | None = None,
) -> SpiffeId:
    """Return the SPIFFE ID of ``chain``'s leaf if it is a valid X509-SVID of ``trust_domain``.

    ``chain`` is the leaf first, then whatever intermediates the peer sent; ``bundle`` holds the
    trust domain's anchors (roots, possibly also signing CAs).  Raise SvidVerificationError
    naming the first rule that fails.  An invalid ``trust_domain`` or a naive ``now`` is a
    caller bug and raises InvalidSpiffeIdError or ValueError instead.
    """
    validate_trust_domain(trust_domain)
    moment = _moment(now)
    if not chain:
        raise SvidVerificationError("empty chain: the peer presented no certificate")
    if not bundle:
        raise SvidVerificationError("empty trust bundle: nothing to verify the chain against")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise SvidVerificationError(
            f"chain too long: {len(chain)} certificates, at most {MAX_CHAIN_LENGTH} allowed"
        )
    leaf = chain[0]
    spiffe_id = _leaf_spiffe_id(leaf, trust_domain)
    _check_leaf_extensions(leaf)
    if leaf.issuer == leaf.subject and issued_directly_by(leaf, leaf):
        raise SvidVerificationError("leaf is self-signed: an X509-SVID must be issued by a CA")
    path = _build_path(chain, bundle)
    for index, certificate in enumerate(path):
        label = _label(certificate, index, is_anchor=index == len(path) - 1)
        _check_key(certificate, label)
        _check_validity(certificate, label, moment)
        if index > 0:
            _check_signing_ca(certificate, label, trust_domain, intermediates_below=index - 1)
    return spiffe_id


def verify_der_chain(
    chain_der: Sequence[bytes],
    bundle: Sequence[x509.Certificate],
    *,
    trust_domain: str,
    now: datetime | None = None,
) -> SpiffeId:
    """``verify_x509_svid`` for one DER certificate per element, as ``ssl`` hands them out."""
    chain: list[x509.Certificate] = []
    for index, der in enumerate(chain_der):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            raise SvidVerificationError(
                f"chain certificate {index} is not a valid DER certificate"
            ) from None
    return verify_x509_svid(chain, bundle, trust_domain=trust_domain, now=now)


def _moment(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _label(certificate: x509.Certificate, index: int, *, is_anchor: bool) -> str:
    if index == 0:
        return _LEAF
    name = certificate.subject.rfc4514_string()
    return f"trust anchor {name!r}" if is_anchor else f"intermediate {name!r}"


def _extension(
    certificate: x509.Certificate, kind: type[_Ext], label: str
) -> x509.Extension[_Ext] | None:
    try:
        return certificate.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (x509.DuplicateExtension, ValueError) as error:
        raise SvidVerificationError(f"{label} has malformed extensions: {error}") from None


def _leaf_spiffe_id(leaf: x509.Certificate, trust_domain: str) -> SpiffeId:
    san = _extension(leaf, x509.SubjectAlternativeName, _LEAF)
    uris = [] if san is None else san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidVerificationError(f"leaf must have exactly one URI SAN, found {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as error:
        raise SvidVerificationError(f"leaf URI SAN is not a valid SPIFFE ID: {error}") from None
    if not spiffe_id.member_of(trust_domain):
        raise SvidVerificationError(
            f"leaf SPIFFE ID {spiffe_id} is not in trust domain {trust_domain!r}"
        )
    if spiffe_id.is_trust_domain_id:
        raise SvidVerificationError(
            f"leaf SPIFFE ID {spiffe_id} has no path: a trust domain ID names no workload"
        )
    return spiffe_id


def _check_leaf_extensions(leaf: x509.Certificate) -> None:
    basic = _extension(leaf, x509.BasicConstraints, _LEAF)
    if basic is None:
        raise SvidVerificationError("leaf has no basicConstraints extension")
    if basic.value.ca:
        raise SvidVerificationError("leaf is a CA certificate (basicConstraints cA=true)")

    usage = _extension(leaf, x509.KeyUsage, _LEAF)
    if usage is None:
        raise SvidVerificationError("leaf has no keyUsage extension")
    if not usage.critical:
        raise SvidVerificationError("leaf keyUsage is not marked critical")
    if not usage.value.digital_signature:
        raise SvidVerificationError("leaf keyUsage lacks digitalSignature")
    if usage.value.key_cert_sign:
        raise SvidVerificationError("leaf keyUsage includes keyCertSign")
    if usage.value.crl_sign:
        raise SvidVerificationError("leaf keyUsage includes cRLSign")

    purposes = _extension(leaf, x509.ExtendedKeyUsage, _LEAF)
    if purposes is None:
        raise SvidVerificationError("leaf has no extendedKeyUsage extension")
    present = list(purposes.value)
    for oid, name in _REQUIRED_PURPOSES:
        if oid not in present:
            raise SvidVerificationError(f"leaf extendedKeyUsage lacks {name}")


def issued_directly_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` names and signed ``certificate``; any failure to tell is False."""
    try:
        certificate.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _find_issuer(
    certificate: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject == certificate.issuer and issued_directly_by(certificate, candidate):
            return candidate
    return None


def _build_path(
    chain: Sequence[x509.Certificate], bundle: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Leaf first, anchor last.  Anchors are preferred at every step, giving the shortest path;
    each chain certificate is used at most once, so a cycle in the names cannot loop."""
    path = [chain[0]]
    unused = list(chain[1:])
    while True:
        current = path[-1]
        label = _label(current, len(path) - 1, is_anchor=False)
        # Checked before the signature is relied on, not after.
        _check_signature_hash(current, label)
        anchor = _find_issuer(current, bundle)
        if anchor is not None:
            path.append(anchor)
            return path
        issuer = _find_issuer(current, unused)
        if issuer is None:
            raise SvidVerificationError(
                f"{label} does not chain to the trust bundle: no CA named "
                f"{current.issuer.rfc4514_string()!r} in the chain or the bundle signed it"
            )
        unused.remove(issuer)
        path.append(issuer)


def _check_signature_hash(certificate: x509.Certificate, label: str) -> None:
    try:
        algorithm = certificate.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if not isinstance(algorithm, _ALLOWED_HASHES):
        name = certificate.signature_algorithm_oid.dotted_string
        if algorithm is not None:
            name = algorithm.name
        raise SvidVerificationError(
            f"{label} signature hash {name} is too weak: SHA-256 or stronger required"
        )


def _check_key(certificate: x509.Certificate, label: str) -> None:
    try:
        key = certificate.public_key()
    except (UnsupportedAlgorithm, ValueError):
        raise SvidVerificationError(f"{label} key type is not supported") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise SvidVerificationError(
                f"{label} key curve {key.curve.name} is not allowed: P-256 or P-384 required"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SvidVerificationError(
                f"{label} key too weak: RSA {key.key_size} bits, at least {MIN_RSA_BITS} required"
            )
    else:
        raise SvidVerificationError(
            f"{label} key type {type(key).__name__} is not allowed: ECDSA P-256/P-384 or RSA"
        )


def _check_validity(certificate: x509.Certificate, label: str, moment: datetime) -> None:
    if moment < certificate.not_valid_before_utc:
        raise SvidVerificationError(
            f"{label} is not yet valid: notBefore {certificate.not_valid_before_utc.isoformat()}"
        )
    if moment > certificate.not_valid_after_utc:
        raise SvidVerificationError(
            f"{label} has expired: notAfter {certificate.not_valid_after_utc.isoformat()}"
        )


def _check_signing_ca(
    certificate: x509.Certificate, label: str, trust_domain: str, *, intermediates_below: int
) -> None:
    basic = _extension(certificate, x509.BasicConstraints, label)
    if basic is None or not basic.value.ca:
        raise SvidVerificationError(f"{label} signs a certificate but is not a CA (cA not true)")
    limit = basic.value.path_length
    if limit is not None and intermediates_below > limit:
        raise SvidVerificationError(
            f"{label} pathLenConstraint {limit} exceeded: "
            f"{intermediates_below} intermediate CAs below it"
        )
    usage = _extension(certificate, x509.KeyUsage, label)
    if usage is None or not usage.value.key_cert_sign:
        raise SvidVerificationError(
            f"{label} signs a certificate but its keyUsage lacks keyCertSign"
        )
    _check_ca_trust_domain(certificate, label, trust_domain)


def _check_ca_trust_domain(certificate: x509.Certificate, label: str, trust_domain: str) -> None:
    """A signing CA's SPIFFE ID is optional (Vault intermediates lack one), but if present it
    must be of our trust domain: otherwise another domain's CA could vouch for our workloads."""
    san = _extension(certificate, x509.SubjectAlternativeName, label)
    if san is None:
        return
    for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
        # Case-insensitive so that "SPIFFE://other" is refused by the strict parser, not skipped.
        if not uri.lower().startswith("spiffe:"):
            continue
        try:
            ca_id = SpiffeId.parse(uri)
        except InvalidSpiffeIdError as error:
            raise SvidVerificationError(
                f"{label} URI SAN is not a valid SPIFFE ID: {error}"
            ) from None
        if not ca_id.member_of(trust_domain):
            raise SvidVerificationError(
                f"{label} is a CA of trust domain {ca_id.trust_domain!r}, not {trust_domain!r}"
            )
