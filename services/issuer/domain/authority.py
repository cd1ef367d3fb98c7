"""The issuer's certificate authority: signing-CA slots, their rotation, and what they sign.

A slot is one signing CA (an intermediate signed by the upstream) plus the JWT key that lives and
dies with it.  Rotation keeps the next slot in the trust bundle before it signs anything:

* at ``PREPARE_AT`` of the active CA's lifetime a new slot is signed by the upstream and published
  in the bundle (workloads receive it on their Workload API stream);
* at ``ACTIVATE_AT`` it becomes the active slot and signs every new SVID;
* a retired slot stays in the bundle until its CA expires, so SVIDs it signed keep verifying.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import issued_directly_by
from services.issuer.domain.certificates import (
    build_signing_ca_csr,
    build_x509_svid,
    new_key,
)
from services.issuer.domain.revocation import crl_url, ocsp_url
from services.issuer.domain.upstream import UpstreamAuthority
from services.issuer.errors import IssuerError

PREPARE_AT = 0.5
ACTIVATE_AT = 0.75
_SHA256 = hashes.SHA256()

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Slot:
    """One generation of the issuer's signing material."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    upstream_chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    jwt_key: ec.EllipticCurvePrivateKey
    jwt_kid: str
    # When the issuer received the CA: upstreams backdate notBefore (Vault by 30 s), so rotation
    # points are measured from here, not from the certificate.
    issued_at: datetime

    def at_fraction(self, fraction: float) -> datetime:
        end = self.ca_cert.not_valid_after_utc
        return self.issued_at + (end - self.issued_at) * fraction

    @property
    def expires(self) -> datetime:
        return self.ca_cert.not_valid_after_utc


@dataclass
class AuthorityState:
    """What the store persists: the active slot first, then the prepared and retired ones."""

    active: Slot | None = None
    prepared: Slot | None = None
    retired: list[Slot] = field(default_factory=list)
    # Numbers the issuer's CAs in their subject names; only ever grows.
    next_number: int = 1


class AuthorityStore(Protocol):
    def load(self) -> AuthorityState: ...

    def save(self, state: AuthorityState) -> None: ...


@dataclass(frozen=True)
class IssuedSvid:
    spiffe_id: SpiffeId
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # leaf first, then the signing CA and upstream chain

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def ca_serial(self) -> str:
        """Lowercase hex serial of the signing CA that issued the leaf."""
        return format(self.chain[1].serial_number, "x")


@dataclass(frozen=True)
class Signer:
    """A published signing CA and its key: what signs that CA's CRLs and OCSP answers."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def serial(self) -> str:
        return format(self.ca_cert.serial_number, "x")


class CertificateAuthority:
    """Thread-safe: ``maintain`` may run in a worker thread while the event loop signs SVIDs."""

    def __init__(
        self,
        *,
        trust_domain: str,
        upstream: UpstreamAuthority,
        store: AuthorityStore,
        ca_ttl: timedelta,
        clock: Clock = utc_now,
        revocation_url: str | None = None,
    ) -> None:
        """``revocation_url`` (e.g. http://127.0.0.1:8180) is where the issuer serves CRLs and
        OCSP; SVIDs then name their CA's CRL and the OCSP responder.  None leaves them out."""
        self.trust_domain = trust_domain
        self.revocation_url = revocation_url
        self._upstream = upstream
        self._store = store
        self._ca_ttl = ca_ttl
        self._clock = clock
        self._lock = threading.RLock()
        self._state = store.load()
        self._generation = 0
        self._renewal_requested = False
        self.last_signed_at: datetime | None = None  # when the upstream last signed a CA

    @property
    def generation(self) -> int:
        """Changes whenever the published bundle changes."""
        return self._generation

    def _new_slot(self) -> Slot:
        number = self._state.next_number
        key = new_key()
        csr = build_signing_ca_csr(key, self.trust_domain, f"ztbank issuer CA {number}")
        signed = self._upstream.sign_signing_ca(
            csr, trust_domain=self.trust_domain, ttl=self._ca_ttl
        )
        self._state.next_number = number + 1
        self.last_signed_at = self._clock()
        return Slot(
            issued_at=self._clock(),
            ca_cert=signed.certificate,
            ca_key=key,
            upstream_chain=signed.chain,
            roots=signed.roots,
            jwt_key=new_key(),
            jwt_kid=secrets.token_urlsafe(12),
        )

    def request_renewal(self) -> None:
        """Get the next signing CA from the upstream at the next ``maintain``, not at half of
        the active CA's life (an operator's or a lab's request).  A prepared CA, already in
        every bundle, then becomes the active one."""
        with self._lock:
            self._renewal_requested = True

    def maintain(self) -> datetime:
        """Bring the slots up to date; return when to call again.  May call the upstream; when
        that fails (UpstreamError) a requested renewal stays requested, for the next call."""
        with self._lock:
            now = self._clock()
            state = self._state
            changed = False
            kept = [slot for slot in state.retired if slot.expires > now]
            if len(kept) != len(state.retired):
                state.retired, changed = kept, True
            active = state.active
            if active is None or active.expires <= now:
                state.active = state.prepared or self._new_slot()
                state.prepared = None
                changed = True
            elif self._renewal_requested:
                fresh = self._new_slot()
                if state.prepared is not None:
                    state.retired.append(active)
                    state.active = state.prepared
                state.prepared = fresh
                self._renewal_requested = False
                changed = True
            elif state.prepared is None and now >= active.at_fraction(PREPARE_AT):
                state.prepared = self._new_slot()
                changed = True
            elif state.prepared is not None and now >= active.at_fraction(ACTIVATE_AT):
                state.retired.append(active)
                state.active, state.prepared = state.prepared, None
                changed = True
            if changed:
                self._store.save(state)
                self._generation += 1
                return now
            assert state.active is not None
            upcoming = [
                state.active.at_fraction(ACTIVATE_AT if state.prepared else PREPARE_AT),
                *(slot.expires for slot in state.retired),
            ]
            return min(upcoming)

    def _active(self) -> Slot:
        slot = self._state.active
        if slot is None or slot.expires <= self._clock():
            raise IssuerError("the issuer has no valid signing CA (upstream unreachable?)")
        return slot

    def _slots(self) -> list[Slot]:
        state = self._state
        return [s for s in (state.active, state.prepared, *state.retired) if s is not None]

    def bundle(self) -> list[x509.Certificate]:
        """Trust anchors: the upstream roots plus every published signing CA, de-duplicated.

        Signing CAs are anchors too so that a peer that only sees a leaf (Python's ssl module
        exposes only the leaf before 3.13) can still build a path, and so that a prepared CA is
        trusted everywhere before it signs anything.
        """
        with self._lock:
            seen: dict[bytes, x509.Certificate] = {}
            for slot in self._slots():
                for cert in (*slot.roots, *slot.upstream_chain, slot.ca_cert):
                    seen.setdefault(cert.fingerprint(_SHA256), cert)
            return list(seen.values())

    def signers(self) -> list[Signer]:
        """Every published, unexpired signing CA: active, prepared, then retired ones."""
        with self._lock:
            now = self._clock()
            return [Signer(s.ca_cert, s.ca_key) for s in self._slots() if s.expires > now]

    def active_chain(self) -> list[x509.Certificate]:
        """The active signing CA, its upstream chain, then the root(s) that issued its top."""
        with self._lock:
            slot = self._active()
            path = [slot.ca_cert, *slot.upstream_chain]
            anchors = [root for root in slot.roots if issued_directly_by(path[-1], root)]
            return path + [a for a in anchors if a not in path]

    def active_ca(self) -> x509.Certificate:
        """The signing CA that signs SVIDs now."""
        with self._lock:
            return self._active().ca_cert

    def jwt_public_keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        with self._lock:
            return {slot.jwt_kid: slot.jwt_key.public_key() for slot in self._slots()}

    def jwt_signing_key(self) -> tuple[str, ec.EllipticCurvePrivateKey, datetime]:
        with self._lock:
            slot = self._active()
            return slot.jwt_kid, slot.jwt_key, slot.expires

    def sign_x509_svid(
        self, spiffe_id: SpiffeId, *, ttl: timedelta, dns_names: Sequence[str] = ()
    ) -> IssuedSvid:
        """A fresh key and certificate for ``spiffe_id``; the caller records the serial."""
        if not spiffe_id.member_of(self.trust_domain) or spiffe_id.is_trust_domain_id:
            raise IssuerError(f"{spiffe_id} is not a workload ID of {self.trust_domain}")
        key = new_key()
        base = self.revocation_url
        with self._lock:
            slot = self._active()
            ca_serial = format(slot.ca_cert.serial_number, "x")
            leaf = build_x509_svid(
                spiffe_id,
                key.public_key(),
                ca_cert=slot.ca_cert,
                ca_key=slot.ca_key,
                ttl=ttl,
                dns_names=dns_names,
                now=self._clock(),
                crl_url=crl_url(base, ca_serial) if base else None,
                ocsp_url=ocsp_url(base) if base else None,
            )
            return IssuedSvid(spiffe_id, key, (leaf, slot.ca_cert, *slot.upstream_chain))
