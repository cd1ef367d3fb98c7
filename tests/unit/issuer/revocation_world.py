"""One issuer's revocation machinery on a fake clock, for the revocation unit tests.

The disk upstream signs CAs at the fake time (as in test_authority), so ``rotate`` can move hours
ahead and get a second signing CA; everything persists in a real SQLite file, so ``restarted``
builds the same issuer again from disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.sqlite_store import SqliteStore
from services.issuer.adapters.upstream.disk import ROOT_CERT_FILE, DiskUpstream
from services.issuer.domain.authority import ACTIVATE_AT, CertificateAuthority, Signer
from services.issuer.domain.crl import CrlPublisher
from services.issuer.domain.entries import Selector
from services.issuer.domain.ocsp import OcspResponder
from services.issuer.domain.service import IssuerService
from services.issuer.settings import MAX_SVID_TTL

TD = "ztbank.example"
LEDGER = f"spiffe://{TD}/env/dev/zone/az1/team/payments/svc/ledger"
GATEWAY = f"spiffe://{TD}/env/dev/zone/az1/team/edge/svc/gateway"
BASE_URL = "http://127.0.0.1:8180"
CA_TTL = timedelta(hours=1)
SVID_TTL = timedelta(minutes=5)
CRL_TTL = timedelta(minutes=2)
SECOND = timedelta(seconds=1)
LEDGER_SELECTORS = frozenset({Selector.parse("unix:uid:1000")})
GATEWAY_SELECTORS = frozenset({Selector.parse("unix:uid:2000")})


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


@dataclass
class World:
    root: Path
    clock: FakeClock
    store: SqliteStore
    authority: CertificateAuthority
    service: IssuerService
    crls: CrlPublisher
    ocsp: OcspResponder

    @property
    def root_ca(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.root / "certs" / ROOT_CERT_FILE).read_bytes())

    def signer(self, index: int = 0) -> Signer:
        return self.authority.signers()[index]

    def _move_near_activation(self, offset: timedelta) -> Signer:
        active = self.authority.signers()[0]
        start = active.ca_cert.not_valid_before_utc
        # Rotation counts from the issue time, which is after the backdated notBefore.
        self.clock.now = start + (active.ca_cert.not_valid_after_utc - start) * ACTIVATE_AT
        self.clock.now += offset
        for _ in range(3):
            self.authority.maintain()
        return active

    def approach_rotation(self) -> None:
        """Two minutes before the next CA activates: it is prepared, the old one still signs."""
        active = self._move_near_activation(-timedelta(minutes=2))
        signers = self.authority.signers()
        assert [s.serial for s in signers][:1] == [active.serial], "rotated too early"
        assert len(signers) == 2, "expected a prepared CA"

    def rotate(self) -> None:
        """Just past the activation point: a new CA signs, the old one is retired."""
        active = self._move_near_activation(timedelta(minutes=1))
        signers = self.authority.signers()
        assert [s.serial for s in signers][1:] == [active.serial], "expected the old CA retired"

    def restarted(self) -> World:
        """The same issuer built again from its files, as after a process restart."""
        return build_world(self.root, self.clock)


def build_world(root: Path, clock: FakeClock) -> World:
    store = SqliteStore(root / "issuer" / "issuer.db")
    authority = CertificateAuthority(
        trust_domain=TD,
        upstream=DiskUpstream(root / "certs"),
        store=AuthorityFile(root / "issuer" / "authority.json"),
        ca_ttl=CA_TTL,
        clock=clock,
        revocation_url=BASE_URL,
    )
    authority.maintain()
    service = IssuerService(
        authority=authority,
        repository=store,
        svid_ttl=SVID_TTL,
        max_ttl=MAX_SVID_TTL,
        jwt_svid_ttl=SVID_TTL,
        clock=clock,
        rng=random.Random(7),
    )
    crls = CrlPublisher(signers=authority, repository=store, ttl=CRL_TTL, clock=clock)
    ocsp = OcspResponder(signers=authority, repository=store, ttl=CRL_TTL, clock=clock)
    return World(root, clock, store, authority, service, crls, ocsp)
