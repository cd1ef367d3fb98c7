import json
import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_x509_svid
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.sqlite_store import SqliteStore
from services.issuer.adapters.upstream.disk import DiskUpstream, init_root_ca
from services.issuer.domain.authority import CertificateAuthority
from services.issuer.domain.certificates import MAX_BACKDATE, new_key
from services.issuer.domain.entries import Selector
from services.issuer.domain.jwt_svid import InvalidJwtSvidError, sign_jwt_svid
from services.issuer.domain.service import IssuerService, WorkloadSvid
from services.issuer.errors import EntryError, MintError, NotEntitledError
from services.issuer.settings import MAX_SVID_TTL

TD = "ztbank.example"
LEDGER = f"spiffe://{TD}/env/dev/zone/az1/team/payments/svc/ledger"
GATEWAY = f"spiffe://{TD}/env/dev/zone/az1/team/edge/svc/gateway"
SVID_TTL = timedelta(minutes=5)
JWT_TTL = timedelta(minutes=5)
SECOND = timedelta(seconds=1)
AUDIENCE = "spiffe://ztbank.example/env/dev/zone/az1/team/payments/svc/accounts"


def assert_validity(cert: x509.Certificate, *, now: datetime, ttl: timedelta) -> None:
    """Lifetime exactly ``ttl``, started min(MAX_BACKDATE, ttl / 10) before ``now`` (X.509 times
    drop the fraction of a second at both ends)."""
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert not_after - not_before == ttl
    assert not_before <= now - min(MAX_BACKDATE, ttl / 10) < not_before + SECOND


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def selectors(*texts: str) -> frozenset[Selector]:
    return frozenset(Selector.parse(text) for text in texts)


LEDGER_PROCESS = selectors("unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/ledger")
STRANGER = selectors("unix:uid:4242", "unix:gid:4242")


@pytest.fixture
def clock() -> FakeClock:
    # The disk upstream signs the CA at the wall clock, so the fake clock starts there too.
    return FakeClock(datetime.now(UTC))


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "issuer" / "issuer.db")


@pytest.fixture
def authority(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    init_root_ca(tmp_path / "certs", TD)
    authority = CertificateAuthority(
        trust_domain=TD,
        upstream=DiskUpstream(tmp_path / "certs"),
        store=AuthorityFile(tmp_path / "issuer" / "authority.json"),
        ca_ttl=timedelta(hours=24),
        clock=clock,
    )
    authority.maintain()
    return authority


def make_service(
    authority: CertificateAuthority, store: SqliteStore, clock: FakeClock, seed: int = 7
) -> IssuerService:
    return IssuerService(
        authority=authority,
        repository=store,
        svid_ttl=SVID_TTL,
        max_ttl=MAX_SVID_TTL,
        jwt_svid_ttl=JWT_TTL,
        clock=clock,
        rng=random.Random(seed),
    )


@pytest.fixture
def service(authority: CertificateAuthority, store: SqliteStore, clock: FakeClock) -> IssuerService:
    return make_service(authority, store, clock)


@pytest.fixture
def ledger_service(service: IssuerService) -> IssuerService:
    service.create_entry(LEDGER, ["unix:uid:1000", "unix:path:/usr/bin/ledger"])
    return service


# -- entries --------------------------------------------------------------------------------


def test_create_list_delete_entries(
    service: IssuerService, authority: CertificateAuthority, store: SqliteStore, clock: FakeClock
) -> None:
    ledger = service.create_entry(
        LEDGER, ["unix:uid:1000"], ttl=timedelta(minutes=2), dns_names=["ledger"]
    )
    clock.now += SECOND
    gateway = service.create_entry(GATEWAY, ["ztbank:socket:gateway"])
    assert [e.id for e in service.entries()] == [ledger.id, gateway.id]
    assert ledger.spiffe_id == SpiffeId.parse(LEDGER)
    assert ledger.selectors == selectors("unix:uid:1000")
    assert ledger.ttl == timedelta(minutes=2)
    assert ledger.dns_names == ("ledger",)
    assert gateway.ttl is None
    assert service.socket_names() == {"gateway"}

    # Entries are persisted: a restarted issuer sees them.
    restarted = make_service(authority, store, clock)
    assert [(e.id, e.spiffe_id, e.selectors, e.ttl) for e in restarted.entries()] == [
        (e.id, e.spiffe_id, e.selectors, e.ttl) for e in service.entries()
    ]

    service.delete_entry(ledger.id)
    assert [e.id for e in service.entries()] == [gateway.id]
    assert service.socket_names() == {"gateway"}
    with pytest.raises(NotEntitledError):
        service.x509_svids(selectors("unix:uid:1000"))


def test_duplicate_entry_is_refused(ledger_service: IssuerService) -> None:
    with pytest.raises(EntryError, match="already exists"):
        ledger_service.create_entry(LEDGER, ["unix:path:/usr/bin/ledger", "unix:uid:1000"])
    assert len(ledger_service.entries()) == 1


def test_same_id_with_other_selectors_is_another_entry(ledger_service: IssuerService) -> None:
    ledger_service.create_entry(LEDGER, ["ztbank:socket:ledger"])
    assert len(ledger_service.entries()) == 2


def test_deleting_an_unknown_entry_is_refused(ledger_service: IssuerService) -> None:
    with pytest.raises(EntryError, match="no entry with id 'nope'"):
        ledger_service.delete_entry("nope")
    assert len(ledger_service.entries()) == 1


@pytest.mark.parametrize(
    ("ttl", "reason"),
    [
        (timedelta(minutes=10, seconds=1), "exceeds the maximum"),
        (timedelta(hours=1), "exceeds the maximum"),
        (timedelta(seconds=4), "at least 5s"),
    ],
)
def test_entry_ttl_out_of_bounds_is_refused(
    service: IssuerService, ttl: timedelta, reason: str
) -> None:
    with pytest.raises(EntryError, match=re.escape(reason)):
        service.create_entry(LEDGER, ["unix:uid:1000"], ttl=ttl)
    assert service.entries() == []


@pytest.mark.parametrize(
    ("spiffe_id", "entry_selectors", "dns"),
    [
        ("spiffe://other.example/svc/ledger", ["unix:uid:1000"], []),
        (f"spiffe://{TD}", ["unix:uid:1000"], []),
        ("ledger", ["unix:uid:1000"], []),
        (LEDGER, [], []),
        (LEDGER, ["unix:uid:me"], []),
        (LEDGER, ["unix:uid:1000"], ["Ledger.example"]),
    ],
)
def test_invalid_entries_are_refused(
    service: IssuerService, spiffe_id: str, entry_selectors: list[str], dns: list[str]
) -> None:
    with pytest.raises(EntryError):
        service.create_entry(spiffe_id, entry_selectors, dns_names=dns)
    assert service.entries() == []


# -- X509-SVIDs -----------------------------------------------------------------------------


def test_one_svid_per_matching_entry(
    ledger_service: IssuerService, authority: CertificateAuthority, clock: FakeClock
) -> None:
    clock.now += SECOND
    second = ledger_service.create_entry(GATEWAY, ["unix:gid:1000"], dns_names=["gw"])
    clock.now += SECOND
    ledger_service.create_entry(GATEWAY, ["unix:uid:9999"])
    svids = ledger_service.x509_svids(LEDGER_PROCESS)
    assert [str(s.svid.spiffe_id) for s in svids] == [LEDGER, GATEWAY]
    assert svids[1].entry.id == second.id
    for item in svids:
        assert (
            verify_x509_svid(
                list(item.svid.chain), authority.bundle(), trust_domain=TD, now=clock.now
            )
            == item.entry.spiffe_id
        )
    san = svids[1].svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["gw"]


def test_svid_lifetime_follows_the_entry_ttl(service: IssuerService, clock: FakeClock) -> None:
    service.create_entry(LEDGER, ["unix:uid:1000"], ttl=timedelta(seconds=30))
    (item,) = service.x509_svids(LEDGER_PROCESS)
    assert_validity(item.svid.leaf, now=clock.now, ttl=timedelta(seconds=30))


def test_default_svid_lifetime(ledger_service: IssuerService, clock: FakeClock) -> None:
    (item,) = ledger_service.x509_svids(LEDGER_PROCESS)
    assert_validity(item.svid.leaf, now=clock.now, ttl=SVID_TTL)


def test_svid_is_cached_until_its_rotation_time(
    ledger_service: IssuerService, clock: FakeClock
) -> None:
    (first,) = ledger_service.x509_svids(LEDGER_PROCESS)
    (again,) = ledger_service.x509_svids(LEDGER_PROCESS)
    assert again.svid.leaf.serial_number == first.svid.leaf.serial_number
    assert again.svid.key is first.svid.key

    clock.now = first.rotate_at - timedelta(microseconds=1)
    (still,) = ledger_service.x509_svids(LEDGER_PROCESS)
    assert still.svid.leaf.serial_number == first.svid.leaf.serial_number

    clock.now = first.rotate_at
    (renewed,) = ledger_service.x509_svids(LEDGER_PROCESS)
    assert renewed.svid.leaf.serial_number != first.svid.leaf.serial_number
    assert renewed.svid.key.public_key() != first.svid.key.public_key()
    assert renewed.rotate_at > first.rotate_at
    assert renewed.svid.leaf.not_valid_after_utc > first.svid.leaf.not_valid_after_utc


def rotation_fraction(item: WorkloadSvid) -> float:
    """Where the rotation time falls in the SVID's notBefore..notAfter."""
    start, end = item.svid.leaf.not_valid_before_utc, item.svid.leaf.not_valid_after_utc
    return (item.rotate_at - start) / (end - start)


@pytest.mark.parametrize("seed", range(8))
def test_rotation_time_is_between_40_and_50_percent_of_the_lifetime(
    authority: CertificateAuthority, store: SqliteStore, clock: FakeClock, seed: int
) -> None:
    service = make_service(authority, store, clock, seed=seed)
    service.create_entry(LEDGER, ["unix:uid:1000"])
    (item,) = service.x509_svids(LEDGER_PROCESS)
    leaf = item.svid.leaf
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == SVID_TTL
    assert 0.40 <= rotation_fraction(item) <= 0.50


def test_rotation_fractions_cover_40_to_50_percent(
    authority: CertificateAuthority, store: SqliteStore, clock: FakeClock
) -> None:
    # Measured from notBefore, not from the (later) issue time: the whole range is used.
    service = make_service(authority, store, clock, seed=3)
    for number in range(40):
        service.create_entry(f"{LEDGER}-{number}", ["unix:uid:1000"])
    fractions = [rotation_fraction(item) for item in service.x509_svids(LEDGER_PROCESS)]
    assert len(fractions) == 40
    assert all(0.40 <= fraction <= 0.50 for fraction in fractions)
    assert min(fractions) < 0.41
    assert max(fractions) > 0.49


def test_rotation_times_are_jittered(
    authority: CertificateAuthority, store: SqliteStore, clock: FakeClock
) -> None:
    service = make_service(authority, store, clock, seed=1)
    for number in range(6):
        service.create_entry(f"{LEDGER}-{number}", ["unix:uid:1000"])
    rotations = {item.rotate_at for item in service.x509_svids(LEDGER_PROCESS)}
    assert len(rotations) > 1


def test_workload_without_matching_entry_is_not_entitled(ledger_service: IssuerService) -> None:
    for workload in (STRANGER, selectors("unix:uid:1000"), frozenset()):
        with pytest.raises(NotEntitledError):
            ledger_service.x509_svids(workload)
        with pytest.raises(NotEntitledError):
            ledger_service.check_entitled(workload)
        with pytest.raises(NotEntitledError):
            ledger_service.jwt_svids(workload, [AUDIENCE])
    ledger_service.check_entitled(LEDGER_PROCESS)


def test_every_issued_svid_is_registered(
    ledger_service: IssuerService, store: SqliteStore, clock: FakeClock
) -> None:
    (entry,) = ledger_service.entries()
    (first,) = ledger_service.x509_svids(LEDGER_PROCESS)
    ledger_service.x509_svids(LEDGER_PROCESS)  # cached: not issued again
    clock.now = first.rotate_at
    (second,) = ledger_service.x509_svids(LEDGER_PROCESS)
    records = store.issued(LEDGER)
    assert [(r.serial, r.spiffe_id, r.not_after, r.source, r.entry_id) for r in records] == [
        (
            format(item.svid.leaf.serial_number, "x"),
            LEDGER,
            item.svid.leaf.not_valid_after_utc,
            "workload",
            entry.id,
        )
        for item in (first, second)
    ]
    assert store.issued(GATEWAY) == []


# -- mint -----------------------------------------------------------------------------------


def test_mint_is_recorded_as_mint(
    service: IssuerService, store: SqliteStore, authority: CertificateAuthority, clock: FakeClock
) -> None:
    svid = service.mint(GATEWAY, ttl=timedelta(minutes=1), dns_names=["gateway"])
    assert str(svid.spiffe_id) == GATEWAY
    assert svid.leaf.not_valid_after_utc <= clock.now + timedelta(minutes=1)
    assert verify_x509_svid(list(svid.chain), authority.bundle(), trust_domain=TD, now=clock.now)
    (record,) = store.issued()
    assert record.serial == format(svid.leaf.serial_number, "x")
    assert record.spiffe_id == GATEWAY
    assert record.not_after == svid.leaf.not_valid_after_utc
    assert record.source == "mint"
    assert record.entry_id is None


@pytest.mark.parametrize(
    ("spiffe_id", "ttl", "dns", "reason"),
    [
        ("spiffe://other.example/svc/gateway", None, [], "outside the trust domain"),
        (f"spiffe://{TD}", None, [], "trust domain itself"),
        ("gateway", None, [], "spiffe://"),
        (GATEWAY, timedelta(minutes=11), [], "exceeds the maximum"),
        (GATEWAY, None, ["not a name"], "DNS name"),
    ],
)
def test_mint_refusals(
    service: IssuerService,
    store: SqliteStore,
    spiffe_id: str,
    ttl: timedelta | None,
    dns: list[str],
    reason: str,
) -> None:
    with pytest.raises(MintError, match=re.escape(reason)):
        service.mint(spiffe_id, ttl=ttl, dns_names=dns)
    assert store.issued() == []


# -- JWT-SVIDs ------------------------------------------------------------------------------


def test_jwt_svid_round_trip(ledger_service: IssuerService, clock: FakeClock) -> None:
    ((spiffe_id, token),) = ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE, "bank-api"])
    assert str(spiffe_id) == LEDGER
    for audience in (AUDIENCE, "bank-api"):
        subject, claims = ledger_service.validate_jwt(token, audience)
        assert str(subject) == LEDGER
        assert claims["sub"] == LEDGER
        assert claims["aud"] == [AUDIENCE, "bank-api"]
        assert claims["exp"] <= (clock.now + JWT_TTL).timestamp()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256"
    assert header["kid"] == ledger_service.authority.jwt_signing_key()[0]


def test_jwt_svid_for_a_chosen_entitled_id(ledger_service: IssuerService) -> None:
    ledger_service.create_entry(GATEWAY, ["unix:uid:1000"])
    issued = ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE])
    assert sorted(str(i) for i, _ in issued) == sorted([LEDGER, GATEWAY])
    ((chosen, token),) = ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE], GATEWAY)
    assert str(chosen) == GATEWAY
    assert str(ledger_service.validate_jwt(token, AUDIENCE)[0]) == GATEWAY
    with pytest.raises(NotEntitledError):
        ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE], f"spiffe://{TD}/svc/admin")


@pytest.fixture
def token(ledger_service: IssuerService) -> str:
    ((_, token),) = ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE])
    return token


def test_jwt_wrong_audience_is_refused(ledger_service: IssuerService, token: str) -> None:
    with pytest.raises(InvalidJwtSvidError, match="audience"):
        ledger_service.validate_jwt(token, "spiffe://ztbank.example/svc/other")
    with pytest.raises(InvalidJwtSvidError, match="audience is required"):
        ledger_service.validate_jwt(token, "")


def test_expired_jwt_is_refused(
    ledger_service: IssuerService, token: str, clock: FakeClock
) -> None:
    clock.now += JWT_TTL - SECOND
    ledger_service.validate_jwt(token, AUDIENCE)
    clock.now += SECOND
    with pytest.raises(InvalidJwtSvidError, match="expired"):
        ledger_service.validate_jwt(token, AUDIENCE)


def test_jwt_is_validated_at_the_service_clock(
    ledger_service: IssuerService, clock: FakeClock
) -> None:
    clock.now += timedelta(minutes=1)
    ((_, token),) = ledger_service.jwt_svids(LEDGER_PROCESS, [AUDIENCE])
    assert str(ledger_service.validate_jwt(token, AUDIENCE)[0]) == LEDGER


def _claims(clock: FakeClock, subject: str = LEDGER) -> dict[str, object]:
    return {
        "sub": subject,
        "aud": [AUDIENCE],
        "iat": int(clock.now.timestamp()),
        "exp": int((clock.now + JWT_TTL).timestamp()),
    }


def test_jwt_signed_by_an_unknown_key_is_refused(
    ledger_service: IssuerService, clock: FakeClock
) -> None:
    kid = ledger_service.authority.jwt_signing_key()[0]
    stranger = new_key()
    unknown_kid = jwt.encode(_claims(clock), stranger, algorithm="ES256", headers={"kid": "x"})
    with pytest.raises(InvalidJwtSvidError, match="not in the trust bundle"):
        ledger_service.validate_jwt(unknown_kid, AUDIENCE)
    borrowed_kid = jwt.encode(_claims(clock), stranger, algorithm="ES256", headers={"kid": kid})
    with pytest.raises(InvalidJwtSvidError, match="invalid JWT-SVID"):
        ledger_service.validate_jwt(borrowed_kid, AUDIENCE)


def test_unsigned_and_hmac_jwts_are_refused(
    ledger_service: IssuerService, clock: FakeClock
) -> None:
    kid = ledger_service.authority.jwt_signing_key()[0]
    unsigned = jwt.encode(_claims(clock), "", algorithm="none", headers={"kid": kid})
    hmac = jwt.encode(
        _claims(clock), "a shared secret of 32+ bytes....", algorithm="HS256", headers={"kid": kid}
    )
    for token in (unsigned, hmac):
        with pytest.raises(InvalidJwtSvidError, match="unsupported JWT-SVID algorithm"):
            ledger_service.validate_jwt(token, AUDIENCE)


def test_malformed_jwt_is_refused(ledger_service: IssuerService) -> None:
    with pytest.raises(InvalidJwtSvidError, match="malformed"):
        ledger_service.validate_jwt("not.a.jwt", AUDIENCE)


def test_jwt_subject_of_another_trust_domain_is_refused(
    ledger_service: IssuerService, clock: FakeClock
) -> None:
    kid, key, expires = ledger_service.authority.jwt_signing_key()
    foreign = sign_jwt_svid(
        SpiffeId.parse("spiffe://other.example/svc/ledger"),
        [AUDIENCE],
        kid=kid,
        key=key,
        ttl=JWT_TTL,
        key_expires=expires,
        now=clock.now,
    )
    with pytest.raises(InvalidJwtSvidError, match=r"outside ztbank\.example"):
        ledger_service.validate_jwt(foreign, AUDIENCE)


def test_jwt_bundle_is_a_jwks_with_the_signing_kid(ledger_service: IssuerService) -> None:
    kid = ledger_service.authority.jwt_signing_key()[0]
    document = json.loads(ledger_service.jwt_bundle())
    (key,) = document["keys"]
    assert key["kid"] == kid
    assert key["kty"] == "EC"
    assert key["crv"] == "P-256"
    assert key["use"] == "jwt-svid"
    assert "d" not in key  # public only
