"""CRLs: one per published signing CA, signed by it, numbered by one persistent counter."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from services.issuer.domain.crl import REFRESH_AT, PublishedCrl, build_crl
from services.issuer.domain.revocation import RevokedCertificate
from tests.unit.issuer.revocation_world import CRL_TTL, GATEWAY, LEDGER, SECOND, World


def serial_of(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def crl_number(crl: x509.CertificateRevocationList) -> int:
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def listed(crl: x509.CertificateRevocationList) -> dict[str, x509.RevokedCertificate]:
    return {format(entry.serial_number, "x"): entry for entry in crl}


def reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags | None:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return None


def pem_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    end = b"-----END X509 CRL-----\n"
    return [x509.load_pem_x509_crl(part + end) for part in data.split(end) if part.strip()]


def only_crl(world: World) -> PublishedCrl:
    (published,) = world.crls.current()
    return published


def assert_signed_by_ca(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> None:
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(key)
    assert crl.signature_hash_algorithm is not None
    assert crl.signature_hash_algorithm.name == "sha256"
    assert crl.issuer == ca.subject
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).critical


# -- what one CRL says ------------------------------------------------------------------------


def test_crl_is_signed_by_its_ca_and_valid_for_the_crl_ttl(world: World) -> None:
    world.crls.refresh()
    published = only_crl(world)
    signer = world.signer()
    assert published.ca_serial == signer.serial
    assert_signed_by_ca(published.crl, signer.ca_cert)
    # Not by the root or any other key.
    root_key = world.root_ca.public_key()
    assert isinstance(root_key, ec.EllipticCurvePublicKey)
    assert not published.crl.is_signature_valid(root_key)
    assert published.crl.last_update_utc == world.clock()
    assert published.crl.next_update_utc == world.clock() + CRL_TTL
    assert list(published.crl) == []
    # DER and PEM forms of the same CRL.
    assert x509.load_der_x509_crl(published.der) == published.crl
    assert x509.load_pem_x509_crl(published.pem) == published.crl


def test_entries_are_the_unexpired_revocations_with_their_reasons(world: World) -> None:
    compromised = world.service.mint(LEDGER).leaf
    superseded = world.service.mint(LEDGER).leaf
    unspecified = world.service.mint(GATEWAY).leaf
    short = world.service.mint(GATEWAY, ttl=timedelta(seconds=30)).leaf
    untouched = world.service.mint(GATEWAY).leaf
    world.service.revoke_serial(serial_of(compromised), "keyCompromise")
    world.clock.advance(SECOND)
    world.service.revoke_serial(serial_of(superseded), "superseded")
    world.service.revoke_serial(serial_of(unspecified))
    world.service.revoke_serial(serial_of(short), "cessationOfOperation")
    revoked_at = world.clock()

    world.crls.refresh(force=True)
    entries = listed(only_crl(world).crl)

    assert set(entries) == {serial_of(c) for c in (compromised, superseded, unspecified, short)}
    assert serial_of(untouched) not in entries
    assert reason(entries[serial_of(compromised)]) is x509.ReasonFlags.key_compromise
    assert reason(entries[serial_of(superseded)]) is x509.ReasonFlags.superseded
    assert reason(entries[serial_of(short)]) is x509.ReasonFlags.cessation_of_operation
    # RFC 5280 5.3.1: unspecified is expressed by leaving the reason out.
    assert reason(entries[serial_of(unspecified)]) is None
    assert entries[serial_of(compromised)].revocation_date_utc == revoked_at - SECOND
    assert entries[serial_of(superseded)].revocation_date_utc == revoked_at

    # Once a certificate has expired it leaves the CRL.
    world.clock.now = short.not_valid_after_utc
    world.crls.refresh(force=True)
    assert serial_of(short) not in listed(only_crl(world).crl)
    assert serial_of(compromised) in listed(only_crl(world).crl)


def test_build_crl_uses_whole_seconds(world: World) -> None:
    signer = world.signer()
    now = world.clock() + timedelta(microseconds=700_000)
    revoked = RevokedCertificate("abc", LEDGER, "keyCompromise", now, now + CRL_TTL, None)
    crl = build_crl(signer, [revoked], number=9, this_update=now, next_update=now + CRL_TTL)
    assert crl.last_update_utc == world.clock()
    assert crl_number(crl) == 9
    (entry,) = crl
    assert entry.serial_number == 0xABC
    assert entry.revocation_date_utc == world.clock()


# -- numbering and re-issue -------------------------------------------------------------------


def test_every_crl_gets_a_higher_number_even_within_one_second(world: World) -> None:
    made = []
    for _ in range(4):
        world.crls.refresh(force=True)
        made.append(only_crl(world))
    numbers = [p.number for p in made]
    assert numbers == sorted(set(numbers)), "CRL numbers must strictly increase"
    assert [crl_number(p.crl) for p in made] == numbers
    assert world.crls.latest_number == numbers[-1]
    # All made in the same second: thisUpdate is equal, the number alone orders them.
    assert {p.crl.last_update_utc for p in made} == {world.clock()}


def test_numbers_keep_increasing_across_a_restart(world: World) -> None:
    world.crls.refresh()
    world.crls.refresh(force=True)
    before = world.crls.latest_number

    restarted = world.restarted()
    assert restarted.crls.current() == []
    restarted.crls.refresh()

    assert only_crl(restarted).number > before


def test_refresh_re_signs_at_half_of_the_validity(world: World) -> None:
    due = world.crls.refresh()
    first = only_crl(world)
    assert due == world.clock() + CRL_TTL * REFRESH_AT == first.refresh_at

    world.clock.now = due - SECOND
    assert world.crls.refresh() == due
    assert only_crl(world) is first, "re-signed before it was due"

    world.clock.now = due
    next_due = world.crls.refresh()
    second = only_crl(world)
    assert second.number > first.number
    assert second.crl.last_update_utc == due
    assert next_due == due + CRL_TTL * REFRESH_AT


def test_a_forced_refresh_re_signs_at_once(world: World) -> None:
    world.crls.refresh()
    first = only_crl(world)
    world.crls.refresh(force=True)
    assert only_crl(world).number > first.number


# -- one CRL per published CA -----------------------------------------------------------------


def test_each_published_ca_has_its_own_crl_listing_only_its_serials(world: World) -> None:
    world.approach_rotation()
    old = world.service.mint(LEDGER)
    world.rotate()
    new = world.service.mint(LEDGER)
    assert serial_of(old.chain[1]) != serial_of(new.chain[1])
    world.service.revoke_serial(serial_of(old.leaf), "keyCompromise")
    world.service.revoke_serial(serial_of(new.leaf), "superseded")

    world.crls.refresh(force=True)
    by_ca = {p.ca_serial: p for p in world.crls.current()}

    assert list(by_ca) == [s.serial for s in world.authority.signers()]  # active first
    assert set(by_ca) == {serial_of(old.chain[1]), serial_of(new.chain[1])}
    old_crl = by_ca[serial_of(old.chain[1])].crl
    new_crl = by_ca[serial_of(new.chain[1])].crl
    assert_signed_by_ca(old_crl, old.chain[1])
    assert_signed_by_ca(new_crl, new.chain[1])
    assert set(listed(old_crl)) == {serial_of(old.leaf)}
    assert set(listed(new_crl)) == {serial_of(new.leaf)}
    assert crl_number(old_crl) != crl_number(new_crl)
    assert world.crls.get(serial_of(old.chain[1])) is by_ca[serial_of(old.chain[1])]
    assert pem_crls(world.crls.pem_bundle()) == [p.crl for p in world.crls.current()]


def test_a_prepared_ca_gets_a_crl_and_an_expired_one_loses_it(world: World) -> None:
    world.crls.refresh()
    first = world.signer()
    world.approach_rotation()
    world.crls.refresh()
    prepared = world.signer(1)
    assert world.crls.get(prepared.serial) is not None
    world.rotate()  # first is now retired, still published
    world.crls.refresh()
    assert {p.ca_serial for p in world.crls.current()} == {
        s.serial for s in world.authority.signers()
    }

    world.clock.now = first.ca_cert.not_valid_after_utc
    world.authority.maintain()
    world.crls.refresh()
    assert first.serial not in {p.ca_serial for p in world.crls.current()}
    assert world.crls.get(first.serial) is None


def test_revocations_of_unknown_ca_appear_on_every_crl(world: World) -> None:
    """Records from before the issuer noted the signing CA cannot be attributed to one."""
    world.rotate()
    now = world.clock()
    legacy = RevokedCertificate("abc", LEDGER, "keyCompromise", now, now + CRL_TTL, None)
    world.store.add_revocations([legacy])
    world.crls.refresh(force=True)
    assert all("abc" in listed(p.crl) for p in world.crls.current())


@pytest.mark.parametrize("fraction", [0.0, 0.49])
def test_refresh_is_idempotent_before_half(world: World, fraction: float) -> None:
    world.crls.refresh()
    first = only_crl(world)
    world.clock.advance(CRL_TTL * fraction)
    world.crls.refresh()
    assert only_crl(world) is first


def test_crl_signature_hash_is_sha256(world: World) -> None:
    world.crls.refresh()
    assert isinstance(only_crl(world).crl.signature_hash_algorithm, hashes.SHA256)
