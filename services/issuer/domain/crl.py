"""Certificate revocation lists: one per published signing CA, signed by that CA's own key.

Every CRL carries the CA's subject as issuer, its key identifier (AuthorityKeyIdentifier) and a
CRLNumber drawn from one counter the repository persists, so numbers strictly increase across all
CRLs of the issuer and across restarts.  X.509 times have one-second resolution: two CRLs made in
the same second share thisUpdate, and the number alone orders them (RFC 5280 5.2.3), so
consumers should compare CRL numbers, not times.

A CRL is re-signed on every revocation (``refresh(force=True)``) and otherwise once half of its
validity (thisUpdate..nextUpdate = the CRL TTL) has passed, so a relying party that fetched one
always holds a CRL that is still current.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Generic, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from services.issuer.domain.authority import Clock, Signer, utc_now
from services.issuer.domain.revocation import RevokedCertificate, reason_flag

REFRESH_AT = 0.5


class SignerSource(Protocol):
    def signers(self) -> list[Signer]: ...


class CrlRepository(Protocol):
    def revoked_certificates(
        self, *, ca_serial: str | None = None, unexpired_at: datetime | None = None
    ) -> list[RevokedCertificate]: ...

    def next_crl_number(self) -> int: ...


RepositoryT = TypeVar("RepositoryT")


class RevocationStatusSigner(Generic[RepositoryT]):
    """What both forms of signed revocation status (the CRLs here, the OCSP answers in
    ``ocsp``) are made from: the published signing CAs (each signs for its own certificates),
    the issuer's record of what it issued and revoked, how long a signed status stays valid (the
    CRL TTL), and the clock."""

    def __init__(
        self,
        *,
        signers: SignerSource,
        repository: RepositoryT,
        ttl: timedelta,
        clock: Clock = utc_now,
    ) -> None:
        self._signers = signers
        self._repository = repository
        self._ttl = ttl
        self._clock = clock


def whole_seconds(moment: datetime) -> datetime:
    """What an X.509 time can hold."""
    return moment.replace(microsecond=0)


def authority_key_identifier(signer: Signer) -> x509.AuthorityKeyIdentifier:
    """The CA's own subject key identifier if it has one (what path builders match), else one
    derived from its key the same way (RFC 5280 4.2.1.2 method 1)."""
    try:
        ski = signer.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_crl(
    signer: Signer,
    revoked: Sequence[RevokedCertificate],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(signer.ca_cert.subject)
        .last_update(whole_seconds(this_update))
        .next_update(whole_seconds(next_update))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(authority_key_identifier(signer), critical=False)
    )
    for certificate in revoked:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(certificate.serial, 16))
            .revocation_date(whole_seconds(certificate.revoked_at))
        )
        flag = reason_flag(certificate.reason)
        if flag is not None:
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(signer.ca_key, hashes.SHA256())


@dataclass(frozen=True)
class PublishedCrl:
    ca_serial: str
    number: int
    crl: x509.CertificateRevocationList
    # Encoded once: watchers poll these every fraction of a second.
    der: bytes = field(init=False, repr=False)
    pem: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "der", self.crl.public_bytes(serialization.Encoding.DER))
        object.__setattr__(self, "pem", self.crl.public_bytes(serialization.Encoding.PEM))

    @property
    def refresh_at(self) -> datetime:
        this_update = self.crl.last_update_utc
        next_update = self.crl.next_update_utc
        assert next_update is not None  # build_crl always sets it
        return this_update + (next_update - this_update) * REFRESH_AT


class CrlPublisher(RevocationStatusSigner[CrlRepository]):
    """Holds the current CRL of every published signing CA.  Not thread-safe: the issuer calls
    it from its event loop only."""

    # None signed before the first ``refresh``; it replaces both and never changes them in place,
    # so these empty defaults can be shared by every publisher.
    _current: Mapping[str, PublishedCrl] = MappingProxyType({})
    _pem = b""

    def refresh(self, *, force: bool = False) -> datetime:
        """Sign a new CRL for every CA that has none, whose CRL is half-way through its validity
        or, with ``force`` (after a revocation), for every CA; drop the CRLs of CAs no longer
        published.  Returns when to call again."""
        now = self._clock()
        current: dict[str, PublishedCrl] = {}
        for signer in self._signers.signers():
            published = self._current.get(signer.serial)
            if force or published is None or now >= published.refresh_at:
                published = self._sign(signer, now)
            current[signer.serial] = published
        self._current = current
        self._pem = b"".join(p.pem for p in current.values())
        return min((p.refresh_at for p in current.values()), default=now + self._ttl * REFRESH_AT)

    def _sign(self, signer: Signer, now: datetime) -> PublishedCrl:
        revoked = self._repository.revoked_certificates(ca_serial=signer.serial, unexpired_at=now)
        number = self._repository.next_crl_number()
        crl = build_crl(
            signer, revoked, number=number, this_update=now, next_update=now + self._ttl
        )
        return PublishedCrl(signer.serial, number, crl)

    def current(self) -> list[PublishedCrl]:
        """The current CRLs, in the order of the signers (active CA first)."""
        return list(self._current.values())

    def get(self, ca_serial: str) -> PublishedCrl | None:
        return self._current.get(ca_serial)

    def pem_bundle(self) -> bytes:
        """Every current CRL as concatenated PEM, in the order of ``current``."""
        return self._pem

    @property
    def latest_number(self) -> int:
        """The highest CRL number published so far by this process (0 before the first)."""
        return max((p.number for p in self._current.values()), default=0)
