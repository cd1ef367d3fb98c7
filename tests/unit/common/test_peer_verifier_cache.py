"""PeerVerifier remembers verified chains, but never past what made them valid.

A chain is re-verified when its bytes, the bundle or the time say so; revocation is asked on
every call, so a peer revoked after a remembered success is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.errors import SvidVerificationError
from services.common.identity import x509svid
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier
from services.common.revocation import RevocationListener, RevokedCertificateError
from tests.support.pki import Issued, create_intermediate_ca, create_leaf, create_root_ca

TD = "ztbank.example"
WORKLOAD = f"spiffe://{TD}/env/test/zone/az1/team/payments/svc/transfer-engine"
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class RevokedSet:
    """A RevocationChecker whose answer the test sets; counts how often it was asked."""

    revoked: set[int] = field(default_factory=set)
    asked: int = 0

    def check(self, leaf: x509.Certificate) -> None:
        self.asked += 1
        if leaf.serial_number in self.revoked:
            raise RevokedCertificateError("certificate revoked")

    def subscribe(self, listener: RevocationListener) -> None:
        del listener

    def revoked_serials(self) -> frozenset[str]:
        return frozenset(format(s, "x") for s in self.revoked)


@dataclass
class World:
    root: Issued
    ca: Issued
    material: SvidMaterial
    revocation: RevokedSet
    now: list[datetime]
    verifications: list[int]

    def verifier(self) -> PeerVerifier:
        return PeerVerifier(
            lambda: self.material, TD, revocation=self.revocation, clock=lambda: self.now[0]
        )

    def chain(self, leaf: Issued) -> list[bytes]:
        return [
            c.public_bytes(serialization.Encoding.DER)
            for c in (leaf.certificate, self.ca.certificate)
        ]


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    root = create_root_ca(trust_domain=TD)
    ca = create_intermediate_ca(root, trust_domain=TD)
    own = create_leaf(ca, uri_sans=[WORKLOAD])
    material = SvidMaterial(
        spiffe_id=SpiffeId.parse(WORKLOAD),
        chain=(own.certificate, ca.certificate),
        key=own.key,
        bundle=(root.certificate,),
    )
    verifications: list[int] = []
    real = x509svid.verify_x509_svid

    def counted(*args: object, **kwargs: object) -> SpiffeId:
        verifications.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(x509svid, "verify_x509_svid", counted)
    return World(root, ca, material, RevokedSet(), [NOW], verifications)


def test_a_known_chain_is_verified_once_and_asked_about_revocation_every_time(
    world: World,
) -> None:
    verifier = world.verifier()
    chain = world.chain(create_leaf(world.ca, uri_sans=[WORKLOAD]))
    first = verifier.verify(chain, "127.0.0.1:1")
    second = verifier.verify(chain, "127.0.0.1:2")
    assert (str(first.spiffe_id), second.address) == (WORKLOAD, "127.0.0.1:2")
    assert first.serial == second.serial
    assert len(world.verifications) == 1
    assert world.revocation.asked == 2


def test_a_peer_revoked_after_a_remembered_success_is_refused(world: World) -> None:
    verifier = world.verifier()
    leaf = create_leaf(world.ca, uri_sans=[WORKLOAD])
    chain = world.chain(leaf)
    verifier.verify(chain, "127.0.0.1:1")
    world.revocation.revoked.add(leaf.certificate.serial_number)
    with pytest.raises(RevokedCertificateError):
        verifier.verify(chain, "127.0.0.1:1")


def test_a_new_bundle_means_a_new_verification(world: World) -> None:
    verifier = world.verifier()
    chain = world.chain(create_leaf(world.ca, uri_sans=[WORKLOAD]))
    verifier.verify(chain, "127.0.0.1:1")
    other_root = create_root_ca(trust_domain=TD, common_name="another root")
    world.material = SvidMaterial(
        spiffe_id=world.material.spiffe_id,
        chain=world.material.chain,
        key=world.material.key,
        bundle=(other_root.certificate,),  # our root is gone: the chain no longer verifies
    )
    with pytest.raises(SvidVerificationError):
        verifier.verify(chain, "127.0.0.1:1")
    assert len(world.verifications) == 2


def test_a_remembered_chain_is_refused_once_it_expires(world: World) -> None:
    verifier = world.verifier()
    leaf = create_leaf(
        world.ca,
        uri_sans=[WORKLOAD],
        not_before=NOW - timedelta(minutes=1),
        not_after=NOW + timedelta(minutes=5),
    )
    chain = world.chain(leaf)
    verifier.verify(chain, "127.0.0.1:1")
    world.now[0] = NOW + timedelta(minutes=5, seconds=1)
    with pytest.raises(SvidVerificationError):
        verifier.verify(chain, "127.0.0.1:1")


def test_other_bytes_are_another_chain_even_for_the_same_spiffe_id(world: World) -> None:
    verifier = world.verifier()
    verifier.verify(world.chain(create_leaf(world.ca, uri_sans=[WORKLOAD])), "127.0.0.1:1")
    foreign_ca = create_intermediate_ca(create_root_ca(trust_domain=TD), trust_domain=TD)
    impostor = create_leaf(foreign_ca, uri_sans=[WORKLOAD])
    chain = [
        c.public_bytes(serialization.Encoding.DER)
        for c in (impostor.certificate, foreign_ca.certificate)
    ]
    with pytest.raises(SvidVerificationError):
        verifier.verify(chain, "127.0.0.1:1")


def test_the_memory_is_bounded(world: World) -> None:
    verifier = world.verifier()
    verifier.CACHE_SIZE = 3
    chains = [world.chain(create_leaf(world.ca, uri_sans=[WORKLOAD])) for _ in range(4)]
    for chain in chains:
        verifier.verify(chain, "127.0.0.1:1")
    verifier.verify(chains[0], "127.0.0.1:1")  # the oldest was forgotten
    assert len(world.verifications) == 5
