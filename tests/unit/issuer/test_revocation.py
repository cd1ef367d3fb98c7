"""Revocation semantics of the issuer service: by serial, by SPIFFE ID, lifting, persistence."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest
from cryptography import x509

from services.issuer.adapters.sqlite_store import SqliteStore
from services.issuer.domain.entries import IssuedRecord, Selector
from services.issuer.domain.jwt_svid import InvalidJwtSvidError
from services.issuer.domain.revocation import (
    REASONS,
    RevokedCertificate,
    parse_reason,
    parse_serial,
    reason_flag,
)
from services.issuer.errors import (
    AlreadyRevokedError,
    NotEntitledError,
    NotRevokedError,
    RevocationError,
    RevokedIdentityError,
    UnknownSerialError,
)
from tests.unit.issuer.revocation_world import (
    BASE_URL,
    GATEWAY,
    GATEWAY_SELECTORS,
    LEDGER,
    LEDGER_SELECTORS,
    SECOND,
    SVID_TTL,
    World,
)


def serial_of(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def current_serial(world: World, selectors: frozenset[Selector] = LEDGER_SELECTORS) -> str:
    (svid,) = world.service.x509_svids(selectors)
    return serial_of(svid.svid.leaf)


# -- vocabulary -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4F0C", "4f0c"),
        ("0x4f0c", "4f0c"),
        ("4F:0C", "4f0c"),
        ("  004f0c\n", "4f0c"),
        ("a" * 40, "a" * 40),
    ],
)
def test_serials_are_normalised_to_lowercase_hex(text: str, expected: str) -> None:
    assert parse_serial(text) == expected


@pytest.mark.parametrize("text", ["", "0", "00", "xyz", "-1", "4f 0c", "1_0", "a" * 41, "\uff11"])
def test_malformed_serials_are_refused(text: str) -> None:
    with pytest.raises(RevocationError, match="not a certificate serial"):
        parse_serial(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "unspecified"),
        ("keyCompromise", "keyCompromise"),
        ("keycompromise", "keyCompromise"),
        ("SUPERSEDED", "superseded"),
        ("cessationOfOperation", "cessationOfOperation"),
    ],
)
def test_reasons_are_rfc_5280_names(text: str, expected: str) -> None:
    assert parse_reason(text) == expected


@pytest.mark.parametrize("text", ["cACompromise", "certificateHold", "removeFromCRL", "stolen"])
def test_other_reasons_are_refused_listing_the_valid_ones(text: str) -> None:
    with pytest.raises(RevocationError, match="keyCompromise, affiliationChanged, superseded"):
        parse_reason(text)


def test_unspecified_is_left_out_of_crls_and_ocsp() -> None:
    assert reason_flag("unspecified") is None
    assert reason_flag("keyCompromise") is x509.ReasonFlags.key_compromise
    assert all(reason_flag(name) is not None for name in REASONS if name != "unspecified")


# -- by serial --------------------------------------------------------------------------------


def test_revoking_a_minted_serial_records_it_with_reason_and_time(world: World) -> None:
    svid = world.service.mint(LEDGER)
    serial = serial_of(svid.leaf)

    result = world.service.revoke_serial(serial.upper(), "keyCompromise")

    assert result.serials == (serial,)
    assert (result.spiffe_id, result.reason, result.at) == (LEDGER, "keyCompromise", world.clock())
    assert result.replaced == ()
    record = world.store.revoked_certificate(serial)
    assert record is not None
    assert (record.spiffe_id, record.reason, record.revoked_at) == (
        LEDGER,
        "keyCompromise",
        world.clock(),
    )
    assert record.not_after == svid.leaf.not_valid_after_utc
    assert record.ca_serial == world.signer().serial
    # Revoking a serial does not revoke the ID: minting goes on.
    world.service.mint(LEDGER)


def test_unknown_serial_is_not_found(world: World) -> None:
    with pytest.raises(UnknownSerialError, match="unknown serial abcdef"):
        world.service.revoke_serial("abcdef")


def test_expired_serial_is_not_found(world: World) -> None:
    svid = world.service.mint(LEDGER, ttl=timedelta(seconds=30))
    world.clock.now = svid.leaf.not_valid_after_utc
    with pytest.raises(UnknownSerialError, match="unknown serial"):
        world.service.revoke_serial(serial_of(svid.leaf))


def test_revoking_a_serial_twice_is_refused_and_keeps_the_first(world: World) -> None:
    serial = serial_of(world.service.mint(LEDGER).leaf)
    world.service.revoke_serial(serial, "superseded")
    world.clock.advance(SECOND)
    with pytest.raises(AlreadyRevokedError, match="already revoked \\(superseded"):
        world.service.revoke_serial(serial, "keyCompromise")
    record = world.store.revoked_certificate(serial)
    assert record is not None
    assert record.reason == "superseded"


def test_bad_reason_is_refused_before_anything_is_recorded(world: World) -> None:
    serial = serial_of(world.service.mint(LEDGER).leaf)
    with pytest.raises(RevocationError, match="unknown revocation reason"):
        world.service.revoke_serial(serial, "stolen")
    assert world.store.revoked_certificate(serial) is None


def test_revoking_the_current_svid_of_an_entry_replaces_it(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    first = current_serial(world)
    assert current_serial(world) == first  # cached until rotation

    result = world.service.revoke_serial(first)

    assert result.replaced == (first,)
    second = current_serial(world)
    assert second != first
    assert world.store.revoked_certificate(second) is None
    assert current_serial(world) == second


def test_revoking_an_older_svid_leaves_the_current_one(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    first = current_serial(world)
    world.clock.advance(SVID_TTL / 2)  # past the rotation point
    second = current_serial(world)
    assert second != first

    assert world.service.revoke_serial(first).replaced == ()
    assert current_serial(world) == second


# -- by SPIFFE ID -----------------------------------------------------------------------------


def test_revoking_an_id_revokes_its_unexpired_serials_only(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    expired = serial_of(world.service.mint(LEDGER, ttl=timedelta(seconds=10)).leaf)
    world.clock.advance(timedelta(seconds=20))
    workload = current_serial(world)
    minted = serial_of(world.service.mint(LEDGER).leaf)
    other = serial_of(world.service.mint(GATEWAY).leaf)
    already = serial_of(world.service.mint(LEDGER).leaf)
    world.service.revoke_serial(already)

    result = world.service.revoke_spiffe_id(LEDGER, "cessationOfOperation")

    assert set(result.serials) == {workload, minted}
    assert (result.spiffe_id, result.reason) == (LEDGER, "cessationOfOperation")
    for serial in (workload, minted):
        record = world.store.revoked_certificate(serial)
        assert record is not None
        assert record.reason == "cessationOfOperation"
    assert world.store.revoked_certificate(expired) is None
    assert world.store.revoked_certificate(other) is None
    first = world.store.revoked_certificate(already)
    assert first is not None
    assert first.reason == "unspecified"


def test_revoked_id_gets_no_svid_from_the_workload_api_nor_mint(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    world.service.create_entry(GATEWAY, ["unix:uid:2000"])
    current_serial(world)

    world.service.revoke_spiffe_id(LEDGER)

    with pytest.raises(RevokedIdentityError, match="revoked") as refused:
        world.service.x509_svids(LEDGER_SELECTORS)
    # The Workload API maps "not entitled" to PERMISSION_DENIED; a revoked ID is one such case.
    assert isinstance(refused.value, NotEntitledError)
    with pytest.raises(RevokedIdentityError):
        world.service.check_entitled(LEDGER_SELECTORS)
    with pytest.raises(RevokedIdentityError):
        world.service.jwt_svids(LEDGER_SELECTORS, ["bank"])
    with pytest.raises(RevokedIdentityError, match=f"{LEDGER} is revoked"):
        world.service.mint(LEDGER)
    # Other IDs are untouched.
    assert current_serial(world, GATEWAY_SELECTORS)
    world.service.mint(GATEWAY)


def test_a_workload_with_another_unrevoked_entry_keeps_that_svid(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    world.service.create_entry(GATEWAY, ["unix:uid:1000"])
    assert len(world.service.x509_svids(LEDGER_SELECTORS)) == 2

    world.service.revoke_spiffe_id(LEDGER)

    (remaining,) = world.service.x509_svids(LEDGER_SELECTORS)
    assert str(remaining.entry.spiffe_id) == GATEWAY


def test_an_id_may_be_revoked_before_anything_was_issued_for_it(world: World) -> None:
    result = world.service.revoke_spiffe_id(LEDGER)
    assert result.serials == ()
    with pytest.raises(RevokedIdentityError):
        world.service.mint(LEDGER)
    # An entry may still be created (the native stack re-registers its workloads on `up`).
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    with pytest.raises(RevokedIdentityError):
        world.service.x509_svids(LEDGER_SELECTORS)


def test_revoking_an_id_again_keeps_the_first_reason_and_time(world: World) -> None:
    first = world.service.revoke_spiffe_id(LEDGER, "superseded")
    world.clock.advance(SECOND)
    again = world.service.revoke_spiffe_id(LEDGER, "keyCompromise")
    assert (again.reason, again.at) == ("superseded", first.at)
    assert again.serials == ()


@pytest.mark.parametrize(
    "spiffe_id",
    ["spiffe://other.example/svc/ledger", "spiffe://ztbank.example", "ledger", ""],
)
def test_revoking_a_non_workload_id_is_refused(world: World, spiffe_id: str) -> None:
    with pytest.raises(RevocationError):
        world.service.revoke_spiffe_id(spiffe_id)
    assert world.service.revoked_ids() == []


# -- lifting ----------------------------------------------------------------------------------


def test_lifting_lets_the_id_be_issued_again_with_fresh_certificates(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    before = current_serial(world)
    revoked = world.service.revoke_spiffe_id(LEDGER, "superseded")

    lifted = world.service.lift_revocation(LEDGER)

    assert (lifted.serials, lifted.reason, lifted.at) == ((), "superseded", revoked.at)
    after = current_serial(world)
    assert after != before, "the revoked SVID came back from the cache"
    world.service.mint(LEDGER)
    # Certificates revoked with the ID stay revoked.
    assert world.store.revoked_certificate(before) is not None


def test_lifting_an_id_that_is_not_revoked_is_not_found(world: World) -> None:
    with pytest.raises(NotRevokedError, match="is not revoked"):
        world.service.lift_revocation(LEDGER)


# -- persistence ------------------------------------------------------------------------------


def test_revocations_survive_a_restart(world: World) -> None:
    serial = serial_of(world.service.mint(GATEWAY).leaf)
    world.service.revoke_serial(serial, "keyCompromise")
    world.service.revoke_spiffe_id(LEDGER, "superseded")

    restarted = world.restarted()

    with pytest.raises(RevokedIdentityError):
        restarted.service.mint(LEDGER)
    assert [(r.spiffe_id, r.reason) for r in restarted.service.revoked_ids()] == [
        (LEDGER, "superseded")
    ]
    with pytest.raises(AlreadyRevokedError):
        restarted.service.revoke_serial(serial)


def test_issued_records_name_their_signing_ca(world: World) -> None:
    svid = world.service.mint(LEDGER)
    record = world.store.issued_record(serial_of(svid.leaf))
    assert record is not None
    assert record.ca_serial == serial_of(svid.chain[1]) == world.signer().serial


def test_an_old_database_gains_the_ca_column(world: World) -> None:
    path = world.root / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE issued (serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL,"
            " not_after TEXT NOT NULL, issued_at TEXT NOT NULL, source TEXT NOT NULL,"
            " entry_id TEXT)"
        )
        db.execute(
            "INSERT INTO issued VALUES ('abc', ?, ?, ?, 'mint', NULL)",
            (LEDGER, world.clock().isoformat(), world.clock().isoformat()),
        )
    db.close()
    store = SqliteStore(path)
    assert store.issued_record("abc") == IssuedRecord(
        "abc", LEDGER, world.clock(), world.clock(), "mint", None, None
    )
    SqliteStore(path)  # migrating twice is a no-op


def test_records_of_certificates_long_expired_are_pruned(world: World) -> None:
    now = world.clock()
    store = SqliteStore(world.root / "prune.db")
    for serial, expires in (("0a", now - timedelta(days=2)), ("0b", now + timedelta(minutes=5))):
        store.record_issued(IssuedRecord(serial, LEDGER, expires, now, "mint", None, None))
    store.add_revocations(
        [
            RevokedCertificate("0a", LEDGER, "keyCompromise", now, now - timedelta(days=2), None),
            RevokedCertificate(
                "0b", LEDGER, "keyCompromise", now, now + timedelta(minutes=5), None
            ),
        ]
    )

    assert store.prune_expired(now - timedelta(days=1)) == (1, 1)

    assert [r.serial for r in store.issued()] == ["0b"]
    assert [r.serial for r in store.revoked_certificates()] == ["0b"]
    assert store.prune_expired(now - timedelta(days=1)) == (0, 0)


def test_issued_svids_point_at_their_cas_crl_and_the_ocsp_responder(world: World) -> None:
    svid = world.service.mint(LEDGER)
    ca_serial = serial_of(svid.chain[1])
    points = svid.leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [p.full_name for p in points] == [
        [x509.UniformResourceIdentifier(f"{BASE_URL}/crl/{ca_serial}.crl")]
    ]
    access = svid.leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [d.access_location for d in access] == [
        x509.UniformResourceIdentifier(f"{BASE_URL}/ocsp")
    ]


def test_jwt_svids_of_a_revoked_id_no_longer_validate_at_the_issuer(world: World) -> None:
    world.service.create_entry(LEDGER, ["unix:uid:1000"])
    ((_, token),) = world.service.jwt_svids(LEDGER_SELECTORS, ["bank"])
    assert str(world.service.validate_jwt(token, "bank")[0]) == LEDGER

    world.service.revoke_spiffe_id(LEDGER)
    with pytest.raises(InvalidJwtSvidError, match="is revoked"):
        world.service.validate_jwt(token, "bank")

    world.service.lift_revocation(LEDGER)
    assert str(world.service.validate_jwt(token, "bank")[0]) == LEDGER
