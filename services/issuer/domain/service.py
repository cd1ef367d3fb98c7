"""The issuer's use cases: entries, SVIDs for attested workloads, JWT-SVIDs, admin minting and
revocation (see ``domain.revocation`` for what revoking a serial or a SPIFFE ID means)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from services.common.identity.spiffe_id import SpiffeId
from services.issuer.domain.authority import CertificateAuthority, Clock, IssuedSvid, utc_now
from services.issuer.domain.entries import (
    Entry,
    IssuedRecord,
    Selector,
    entitled_entries,
    parse_selectors,
    parse_workload_id,
    validate_dns_names,
)
from services.issuer.domain.jwt_svid import (
    InvalidJwtSvidError,
    jwks,
    sign_jwt_svid,
    validate_jwt_svid,
)
from services.issuer.domain.revocation import (
    RevocationResult,
    RevokedCertificate,
    RevokedId,
    parse_reason,
    parse_serial,
)
from services.issuer.errors import (
    AlreadyRevokedError,
    EntryError,
    MintError,
    NotEntitledError,
    NotRevokedError,
    RevocationError,
    RevokedIdentityError,
    UnknownSerialError,
)

# Workloads get a new SVID between 40% and 50% of its lifetime: at or before half, jittered so
# that a fleet started together does not rotate together.
ROTATE_FROM, ROTATE_TO = 0.40, 0.50


class IssuerRepository(Protocol):
    def add_entry(self, entry: Entry) -> None: ...

    def delete_entry(self, entry_id: str) -> bool: ...

    def entries(self) -> list[Entry]: ...

    def record_issued(self, record: IssuedRecord) -> None: ...

    def issued(self, spiffe_id: str | None = None) -> list[IssuedRecord]: ...

    def issued_record(self, serial: str) -> IssuedRecord | None: ...

    def add_revocations(
        self, certificates: Sequence[RevokedCertificate], identity: RevokedId | None = None
    ) -> None: ...

    def revoked_certificate(self, serial: str) -> RevokedCertificate | None: ...

    def revoked_ids(self) -> list[RevokedId]: ...

    def remove_revoked_id(self, spiffe_id: str) -> bool: ...


@dataclass(frozen=True)
class WorkloadSvid:
    entry: Entry
    svid: IssuedSvid
    rotate_at: datetime


class IssuerService:
    def __init__(
        self,
        *,
        authority: CertificateAuthority,
        repository: IssuerRepository,
        svid_ttl: timedelta,
        max_ttl: timedelta,
        jwt_svid_ttl: timedelta,
        clock: Clock = utc_now,
        rng: random.Random | None = None,
    ) -> None:
        self.authority = authority
        self.trust_domain = authority.trust_domain
        self._repository = repository
        self._svid_ttl = svid_ttl
        self._max_ttl = max_ttl
        self._jwt_svid_ttl = jwt_svid_ttl
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._entries = repository.entries()
        self._cache: dict[str, WorkloadSvid] = {}
        self._entries_version = 0
        self._revoked_ids = {r.spiffe_id: r for r in repository.revoked_ids()}

    @property
    def version(self) -> tuple[int, int]:
        """Changes when the entries or the published bundle change."""
        return self._entries_version, self.authority.generation

    # -- entries -----------------------------------------------------------------------------

    def _ttl(self, ttl: timedelta | None) -> timedelta:
        if ttl is None:
            return self._svid_ttl
        if ttl > self._max_ttl:
            raise EntryError(f"TTL {ttl} exceeds the maximum of {self._max_ttl}")
        if ttl < timedelta(seconds=5):
            raise EntryError("TTL must be at least 5s")
        return ttl

    def create_entry(
        self,
        spiffe_id: str,
        selectors: Sequence[str],
        *,
        ttl: timedelta | None = None,
        dns_names: Sequence[str] = (),
    ) -> Entry:
        entry = Entry(
            id=str(uuid.uuid4()),
            spiffe_id=parse_workload_id(spiffe_id, self.trust_domain),
            selectors=parse_selectors(selectors),
            ttl=self._ttl(ttl) if ttl is not None else None,
            dns_names=validate_dns_names(dns_names),
            created_at=self._clock(),
        )
        self._repository.add_entry(entry)
        self._reload()
        return entry

    def delete_entry(self, entry_id: str) -> None:
        if not self._repository.delete_entry(entry_id):
            raise EntryError(f"no entry with id {entry_id!r}")
        self._cache.pop(entry_id, None)
        self._reload()

    def entries(self) -> list[Entry]:
        return list(self._entries)

    def _reload(self) -> None:
        self._entries = self._repository.entries()
        self._entries_version += 1

    def socket_names(self) -> set[str]:
        return {
            s.value
            for entry in self._entries
            for s in entry.selectors
            if (s.type, s.key) == ("ztbank", "socket")
        }

    # -- X509-SVIDs --------------------------------------------------------------------------

    def _entitled(self, selectors: frozenset[Selector]) -> list[Entry]:
        """The workload's entries whose SPIFFE ID is not revoked."""
        entries = entitled_entries(self._entries, selectors)
        if not entries:
            raise NotEntitledError("no registration entry matches this workload")
        allowed = [entry for entry in entries if str(entry.spiffe_id) not in self._revoked_ids]
        if not allowed:
            ids = ", ".join(sorted({str(entry.spiffe_id) for entry in entries}))
            raise RevokedIdentityError(f"{ids}: SPIFFE ID revoked")
        return allowed

    def _issue(
        self,
        spiffe_id: SpiffeId,
        ttl: timedelta,
        dns: Sequence[str],
        source: str,
        entry_id: str | None,
    ) -> IssuedSvid:
        svid = self.authority.sign_x509_svid(spiffe_id, ttl=ttl, dns_names=dns)
        self._repository.record_issued(
            IssuedRecord(
                serial=format(svid.leaf.serial_number, "x"),
                spiffe_id=str(spiffe_id),
                not_after=svid.leaf.not_valid_after_utc,
                issued_at=self._clock(),
                source=source,
                entry_id=entry_id,
                ca_serial=svid.ca_serial,
            )
        )
        return svid

    def x509_svids(self, selectors: frozenset[Selector]) -> list[WorkloadSvid]:
        """The SVIDs of every entry the workload matches; one SVID per entry, shared by all
        workloads of that entry, renewed once it reaches its rotation time."""
        now = self._clock()
        result = []
        for entry in self._entitled(selectors):
            cached = self._cache.get(entry.id)
            if cached is None or now >= cached.rotate_at:
                svid = self._issue(
                    entry.spiffe_id, self._ttl(entry.ttl), entry.dns_names, "workload", entry.id
                )
                start = svid.leaf.not_valid_before_utc
                lifetime = svid.leaf.not_valid_after_utc - start
                fraction = self._rng.uniform(ROTATE_FROM, ROTATE_TO)
                cached = WorkloadSvid(entry, svid, start + lifetime * fraction)
                self._cache[entry.id] = cached
            result.append(cached)
        return result

    def check_entitled(self, selectors: frozenset[Selector]) -> None:
        self._entitled(selectors)

    def mint(
        self, spiffe_id: str, *, ttl: timedelta | None = None, dns_names: Sequence[str] = ()
    ) -> IssuedSvid:
        """Admin path: issue for any workload ID of the trust domain, recorded like the rest."""
        try:
            parsed = parse_workload_id(spiffe_id, self.trust_domain)
            lifetime = self._ttl(ttl)
            names = validate_dns_names(dns_names)
        except EntryError as error:
            raise MintError(str(error)) from None
        revoked = self._revoked_ids.get(str(parsed))
        if revoked is not None:
            raise RevokedIdentityError(
                f"{parsed} is revoked ({revoked.reason}, {revoked.revoked_at:%Y-%m-%dT%H:%M:%SZ})"
            )
        return self._issue(parsed, lifetime, names, "mint", None)

    # -- revocation --------------------------------------------------------------------------

    def revoked_ids(self) -> list[RevokedId]:
        return list(self._revoked_ids.values())

    def _drop_cached(self, *, serials: Collection[str] = (), spiffe_id: str = "") -> list[str]:
        """Forget cached SVIDs that were revoked (or belong to ``spiffe_id``): the next fetch
        issues a fresh one.  Returns the serials dropped."""
        dropped = []
        for entry_id, cached in list(self._cache.items()):
            serial = format(cached.svid.leaf.serial_number, "x")
            if serial in serials or str(cached.entry.spiffe_id) == spiffe_id:
                del self._cache[entry_id]
                dropped.append(serial)
        return dropped

    def revoke_serial(self, serial_text: str, reason_text: str = "") -> RevocationResult:
        """Revoke one certificate this issuer issued and that has not expired yet.  If it is an
        entry's current SVID (and the ID is not revoked) that entry gets a new one at once."""
        serial, reason = parse_serial(serial_text), parse_reason(reason_text)
        now = self._clock()
        record = self._repository.issued_record(serial)
        if record is None or record.not_after <= now:
            raise UnknownSerialError(
                f"unknown serial {serial}: not issued by this issuer, or already expired"
            )
        existing = self._repository.revoked_certificate(serial)
        if existing is not None:
            raise AlreadyRevokedError(
                f"serial {serial} is already revoked"
                f" ({existing.reason}, {existing.revoked_at:%Y-%m-%dT%H:%M:%SZ})"
            )
        self._repository.add_revocations([_revoked(record, reason, now)])
        replaced = self._drop_cached(serials={serial})
        return RevocationResult((serial,), record.spiffe_id, reason, now, tuple(replaced))

    def revoke_spiffe_id(self, spiffe_id: str, reason_text: str = "") -> RevocationResult:
        """Revoke every unexpired certificate issued for ``spiffe_id`` and refuse it new SVIDs
        (Workload API and mint) until ``lift_revocation``.  Revoking it again revokes whatever
        was issued since (nothing, normally) and keeps the first reason and time."""
        try:
            parsed = str(parse_workload_id(spiffe_id, self.trust_domain))
        except EntryError as error:
            raise RevocationError(str(error)) from None
        reason = parse_reason(reason_text)
        now = self._clock()
        revoked = [
            _revoked(record, reason, now)
            for record in self._repository.issued(parsed)
            if record.not_after > now
            and self._repository.revoked_certificate(record.serial) is None
        ]
        identity = self._revoked_ids.get(parsed) or RevokedId(parsed, reason, now)
        self._repository.add_revocations(revoked, identity)
        self._revoked_ids[parsed] = identity
        self._drop_cached(spiffe_id=parsed)
        serials = tuple(c.serial for c in revoked)
        return RevocationResult(serials, parsed, identity.reason, identity.revoked_at)

    def lift_revocation(self, spiffe_id: str) -> RevocationResult:
        """Let ``spiffe_id`` be issued SVIDs again.  Certificates revoked with it stay revoked;
        its workloads receive new ones on their next fetch."""
        try:
            parsed = str(parse_workload_id(spiffe_id, self.trust_domain))
        except EntryError as error:
            raise RevocationError(str(error)) from None
        identity = self._revoked_ids.get(parsed)
        if identity is None or not self._repository.remove_revoked_id(parsed):
            raise NotRevokedError(f"{parsed} is not revoked")
        del self._revoked_ids[parsed]
        return RevocationResult((), parsed, identity.reason, identity.revoked_at)

    # -- JWT-SVIDs ---------------------------------------------------------------------------

    def jwt_svids(
        self, selectors: frozenset[Selector], audience: Sequence[str], spiffe_id: str = ""
    ) -> list[tuple[SpiffeId, str]]:
        ids = list(dict.fromkeys(entry.spiffe_id for entry in self._entitled(selectors)))
        if spiffe_id:
            wanted = [i for i in ids if str(i) == spiffe_id]
            if not wanted:
                raise NotEntitledError(f"this workload is not entitled to {spiffe_id}")
            ids = wanted
        kid, key, key_expires = self.authority.jwt_signing_key()
        now = self._clock()
        return [
            (
                i,
                sign_jwt_svid(
                    i,
                    audience,
                    kid=kid,
                    key=key,
                    ttl=self._jwt_svid_ttl,
                    key_expires=key_expires,
                    now=now,
                ),
            )
            for i in ids
        ]

    def jwt_bundle(self) -> bytes:
        return jwks(self.authority.jwt_public_keys())

    def validate_jwt(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        """Validate a JWT-SVID; one whose subject is a revoked SPIFFE ID is refused too (JWT-SVIDs
        carry no serial: until they expire, only this validation can tell)."""
        if not audience:
            raise InvalidJwtSvidError("audience is required")
        spiffe_id, claims = validate_jwt_svid(
            token,
            audience,
            keys=self.authority.jwt_public_keys(),
            trust_domain=self.trust_domain,
            now=self._clock(),
        )
        if str(spiffe_id) in self._revoked_ids:
            raise InvalidJwtSvidError(f"{spiffe_id} is revoked")
        return spiffe_id, claims


def _revoked(record: IssuedRecord, reason: str, now: datetime) -> RevokedCertificate:
    return RevokedCertificate(
        serial=record.serial,
        spiffe_id=record.spiffe_id,
        reason=reason,
        revoked_at=now,
        not_after=record.not_after,
        ca_serial=record.ca_serial,
    )
