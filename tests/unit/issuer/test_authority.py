import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.x509svid import verify_x509_svid
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.upstream.disk import (
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    DiskUpstream,
    init_root_ca,
)
from services.issuer.domain.authority import AuthorityState, CertificateAuthority
from services.issuer.domain.certificates import (
    MAX_BACKDATE,
    build_signing_ca_csr,
    new_key,
    sign_signing_ca,
)
from services.issuer.domain.upstream import SignedCA
from services.issuer.errors import IssuerError, UpstreamError

TD = "ztbank.example"
WORKLOAD = SpiffeId.parse(f"spiffe://{TD}/env/dev/zone/az1/team/payments/svc/ledger")
CA_TTL = timedelta(hours=1)
SVID_TTL = timedelta(minutes=5)
SECOND = timedelta(seconds=1)


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class MemoryStore:
    """Keeps snapshots, so a save the authority forgot cannot pass unnoticed."""

    def __init__(self) -> None:
        self.saved: list[AuthorityState] = []

    def load(self) -> AuthorityState:
        if not self.saved:
            return AuthorityState()
        last = self.saved[-1]
        return AuthorityState(last.active, last.prepared, list(last.retired), last.next_number)

    def save(self, state: AuthorityState) -> None:
        self.saved.append(
            AuthorityState(state.active, state.prepared, list(state.retired), state.next_number)
        )


class SwitchableUpstream:
    """Delegates to the disk upstream, counts calls, and fails on demand."""

    name = "switchable"

    def __init__(self, inner: DiskUpstream) -> None:
        self.inner = inner
        self.calls = 0
        self.failing = False
        self.issued: list[x509.Certificate] = []

    def sign_signing_ca(
        self, csr: x509.CertificateSigningRequest, *, trust_domain: str, ttl: timedelta
    ) -> SignedCA:
        self.calls += 1
        if self.failing:
            raise UpstreamError("upstream unreachable")
        signed = self.inner.sign_signing_ca(csr, trust_domain=trust_domain, ttl=ttl)
        self.issued.append(signed.certificate)
        return signed


@pytest.fixture
def clock() -> FakeClock:
    # On a whole second, so that ``at`` can recover the issue time exactly from the certificate
    # (X.509 times drop the fraction of a second).
    return FakeClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def certs_dir(tmp_path: Path) -> Path:
    init_root_ca(tmp_path / "certs", TD)
    return tmp_path / "certs"


@pytest.fixture
def root(certs_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((certs_dir / ROOT_CERT_FILE).read_bytes())


@pytest.fixture
def upstream(
    certs_dir: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> SwitchableUpstream:
    # The upstream protocol carries no time: DiskUpstream signs at the wall clock.  Make it sign
    # at the authority's (fake) time so a rotation hours ahead yields CAs valid at that time.
    def sign_at_fake_now(csr: x509.CertificateSigningRequest, **kwargs: Any) -> x509.Certificate:
        return sign_signing_ca(csr, **kwargs, now=clock())

    monkeypatch.setattr("services.issuer.adapters.upstream.disk.sign_signing_ca", sign_at_fake_now)
    return SwitchableUpstream(DiskUpstream(certs_dir))


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def authority(
    upstream: SwitchableUpstream, store: MemoryStore, clock: FakeClock
) -> CertificateAuthority:
    return CertificateAuthority(
        trust_domain=TD, upstream=upstream, store=store, ca_ttl=CA_TTL, clock=clock
    )


def fingerprints(certs: list[x509.Certificate]) -> list[bytes]:
    return [cert.fingerprint(hashes.SHA256()) for cert in certs]


def at(cert: x509.Certificate, fraction: float) -> datetime:
    """``fraction`` of the CA's life, counted from when it was issued (notBefore is backdated)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    issued = start + min(MAX_BACKDATE, (end - start) / 10)
    return issued + (end - issued) * fraction


def ca_number(cert: x509.Certificate) -> int:
    (common_name,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    prefix = "ztbank issuer CA "
    assert isinstance(common_name.value, str)
    assert common_name.value.startswith(prefix)
    return int(common_name.value.removeprefix(prefix))


def signing_ca(authority: CertificateAuthority) -> x509.Certificate:
    """The CA that signs new SVIDs right now."""
    return authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL).chain[1]


def settle(authority: CertificateAuthority, clock: FakeClock, when: datetime) -> datetime:
    """Move to ``when`` and maintain until nothing is due now; return the next due time."""
    clock.now = when
    for _ in range(5):
        due = authority.maintain()
        if due > clock.now:
            return due
    raise AssertionError("maintain kept asking to be called again")


# -- rotation -------------------------------------------------------------------------------


def test_first_maintain_creates_the_active_ca(
    authority: CertificateAuthority, clock: FakeClock, root: x509.Certificate
) -> None:
    with pytest.raises(IssuerError, match="no valid signing CA"):
        authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    assert authority.bundle() == []
    assert authority.maintain() <= clock.now  # changed: call again right away
    ca = signing_ca(authority)
    assert ca.issuer == root.subject
    ca.verify_directly_issued_by(root)
    # Lifetime exactly the TTL, backdated by MAX_BACKDATE (a tenth of an hour is more).
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == CA_TTL
    assert ca.not_valid_before_utc == clock.now - MAX_BACKDATE
    assert fingerprints(authority.bundle()) == fingerprints([root, ca])
    assert authority.active_ca() == ca


def test_svids_are_p256_and_chain_to_the_root(
    authority: CertificateAuthority, clock: FakeClock, root: x509.Certificate
) -> None:
    authority.maintain()
    svid = authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL, dns_names=["ledger"])
    assert isinstance(svid.key.curve, ec.SECP256R1)
    assert svid.leaf.public_key() == svid.key.public_key()
    assert svid.leaf.not_valid_after_utc <= clock.now + SVID_TTL
    assert verify_x509_svid(list(svid.chain), [root], trust_domain=TD, now=clock.now) == WORKLOAD
    assert verify_x509_svid([svid.leaf], authority.bundle(), trust_domain=TD, now=clock.now)


def test_rotation_prepares_at_half_and_activates_at_three_quarters(
    authority: CertificateAuthority, clock: FakeClock, root: x509.Certificate
) -> None:
    first_due = settle(authority, clock, clock.now)
    ca1 = signing_ca(authority)
    assert first_due == at(ca1, 0.5)

    # Just before half-life nothing changes.
    assert settle(authority, clock, at(ca1, 0.5) - SECOND) == at(ca1, 0.5)
    assert fingerprints(authority.bundle()) == fingerprints([root, ca1])

    # At half-life a new CA is published but does not sign yet.
    assert settle(authority, clock, at(ca1, 0.5)) == at(ca1, 0.75)
    bundle = authority.bundle()
    assert len(bundle) == 3
    (ca2,) = [c for c in bundle if c.fingerprint(hashes.SHA256()) not in fingerprints([root, ca1])]
    ca2.verify_directly_issued_by(root)
    half_svid = authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    assert half_svid.chain[1] == ca1
    half_svid.leaf.verify_directly_issued_by(ca1)

    # Just before three quarters, still ca1.
    settle(authority, clock, at(ca1, 0.75) - SECOND)
    old_svid = authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    assert old_svid.chain[1] == ca1

    # At three quarters the prepared CA signs; the old one stays trusted.
    next_due = settle(authority, clock, at(ca1, 0.75))
    new_svid = authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    assert new_svid.chain[1] == ca2
    assert new_svid.leaf.issuer == ca2.subject
    new_svid.leaf.verify_directly_issued_by(ca2)
    assert set(fingerprints(authority.bundle())) == set(fingerprints([root, ca1, ca2]))
    assert next_due == min(at(ca2, 0.5), ca1.not_valid_after_utc)
    # SVIDs signed by the retired CA keep verifying against the published bundle.
    assert (
        verify_x509_svid([old_svid.leaf], authority.bundle(), trust_domain=TD, now=clock.now)
        == WORKLOAD
    )

    # The retired CA is published until it expires, then dropped.
    settle(authority, clock, ca1.not_valid_after_utc - SECOND)
    assert ca1.fingerprint(hashes.SHA256()) in fingerprints(authority.bundle())
    settle(authority, clock, ca1.not_valid_after_utc)
    remaining = fingerprints(authority.bundle())
    assert ca1.fingerprint(hashes.SHA256()) not in remaining
    assert ca2.fingerprint(hashes.SHA256()) in remaining
    assert root.fingerprint(hashes.SHA256()) in remaining
    assert signing_ca(authority) == ca2


class BackdatingUpstream:
    """Signs like Vault: notBefore 30 s before the request, notAfter the TTL after it."""

    name = "backdating"
    BACKDATE = timedelta(seconds=30)

    def __init__(self, certs_dir: Path, clock: FakeClock) -> None:
        self.root = x509.load_pem_x509_certificate((certs_dir / ROOT_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key(
            (certs_dir / ROOT_KEY_FILE).read_bytes(), password=None
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.clock = clock

    def sign_signing_ca(
        self, csr: x509.CertificateSigningRequest, *, trust_domain: str, ttl: timedelta
    ) -> SignedCA:
        # validity() backdates by MAX_BACKDATE itself (the TTLs here are over 100 s).
        certificate = sign_signing_ca(
            csr,
            issuer_cert=self.root,
            issuer_key=self.key,
            trust_domain=trust_domain,
            ttl=ttl + self.BACKDATE,
            now=self.clock() - (self.BACKDATE - MAX_BACKDATE),
        )
        return SignedCA(certificate=certificate, chain=(), roots=(self.root,))


def test_rotation_points_count_from_the_issue_time_not_the_backdated_not_before(
    certs_dir: Path, clock: FakeClock
) -> None:
    clock.now += timedelta(microseconds=250_000)  # X.509 drops it; the issuer's clock does not
    authority = CertificateAuthority(
        trust_domain=TD,
        upstream=BackdatingUpstream(certs_dir, clock),
        store=MemoryStore(),
        ca_ttl=CA_TTL,
        clock=clock,
    )
    issued = clock.now
    due = settle(authority, clock, issued)
    ca = signing_ca(authority)
    start, end = ca.not_valid_before_utc, ca.not_valid_after_utc
    assert issued - start > BackdatingUpstream.BACKDATE  # backdated, fraction of a second dropped
    assert end == (issued + CA_TTL).replace(microsecond=0)

    def fraction_from_issue(fraction: float) -> datetime:
        return issued + (end - issued) * fraction

    assert due == fraction_from_issue(0.5)
    # Counting from notBefore would prepare about 15 s early.
    assert due > start + (end - start) * 0.5 + timedelta(seconds=14)

    assert settle(authority, clock, due - timedelta(microseconds=1)) == due
    assert len(authority.bundle()) == 2
    assert settle(authority, clock, due) == fraction_from_issue(0.75)
    assert len(authority.bundle()) == 3
    assert signing_ca(authority) == ca
    settle(authority, clock, fraction_from_issue(0.75) - timedelta(microseconds=1))
    assert signing_ca(authority) == ca
    settle(authority, clock, fraction_from_issue(0.75))
    assert signing_ca(authority) != ca


def test_maintain_due_time_is_never_in_the_past_when_idle(
    authority: CertificateAuthority, clock: FakeClock
) -> None:
    when = clock.now
    for _ in range(12):
        due = settle(authority, clock, when)
        assert due > clock.now
        when = due
    # Twelve rounds later the issuer still signs with a valid CA.
    assert signing_ca(authority).not_valid_after_utc > clock.now


def test_generation_changes_exactly_when_the_bundle_changes(
    authority: CertificateAuthority, clock: FakeClock
) -> None:
    changes = steady = 0
    previous = (authority.generation, fingerprints(authority.bundle()))
    start = clock.now
    for minutes in range(0, 4 * 60, 3):
        clock.now = start + timedelta(minutes=minutes)
        for _ in range(2):
            authority.maintain()
            current = (authority.generation, fingerprints(authority.bundle()))
            if current[1] != previous[1]:
                assert current[0] == previous[0] + 1
                changes += 1
            else:
                assert current[0] == previous[0]
                steady += 1
            previous = current
    assert changes >= 8
    assert steady > changes


def test_sign_refuses_ids_outside_the_trust_domain(authority: CertificateAuthority) -> None:
    authority.maintain()
    with pytest.raises(IssuerError, match=r"not a workload ID of ztbank\.example"):
        authority.sign_x509_svid(SpiffeId.parse("spiffe://other.example/svc/ledger"), ttl=SVID_TTL)
    with pytest.raises(IssuerError, match="not a workload ID"):
        authority.sign_x509_svid(SpiffeId.parse(f"spiffe://{TD}"), ttl=SVID_TTL)


# -- failing upstream -----------------------------------------------------------------------


def test_failing_upstream_leaves_no_active_ca(
    authority: CertificateAuthority, upstream: SwitchableUpstream, store: MemoryStore
) -> None:
    upstream.failing = True
    with pytest.raises(UpstreamError, match="unreachable"):
        authority.maintain()
    assert authority.bundle() == []
    assert authority.generation == 0
    assert store.saved == []
    with pytest.raises(IssuerError, match="no valid signing CA"):
        authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    with pytest.raises(IssuerError):
        authority.jwt_signing_key()
    with pytest.raises(IssuerError):
        authority.active_ca()


def test_expired_ca_is_not_used_when_renewal_fails(
    authority: CertificateAuthority, upstream: SwitchableUpstream, clock: FakeClock
) -> None:
    authority.maintain()
    ca = signing_ca(authority)
    upstream.failing = True
    clock.now = ca.not_valid_after_utc
    with pytest.raises(UpstreamError):
        authority.maintain()
    with pytest.raises(IssuerError, match="no valid signing CA"):
        authority.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)


def test_failed_preparation_keeps_signing_with_the_valid_ca(
    authority: CertificateAuthority, upstream: SwitchableUpstream, clock: FakeClock
) -> None:
    authority.maintain()
    ca = signing_ca(authority)
    upstream.failing = True
    clock.now = at(ca, 0.5)
    with pytest.raises(UpstreamError):
        authority.maintain()
    assert signing_ca(authority) == ca
    upstream.failing = False
    authority.maintain()
    assert len(authority.bundle()) == 3


def test_a_requested_renewal_prepares_the_next_ca_now_and_the_one_after_activates_it(
    authority: CertificateAuthority, upstream: SwitchableUpstream, root: x509.Certificate
) -> None:
    authority.maintain()
    first = signing_ca(authority)

    authority.request_renewal()
    authority.maintain()
    second = upstream.issued[-1]
    assert signing_ca(authority) == first  # published first, signs nothing yet
    assert fingerprints(authority.bundle()) == fingerprints([root, first, second])
    authority.maintain()
    assert upstream.calls == 2  # a renewal is asked for once, not on every maintain

    authority.request_renewal()
    authority.maintain()
    assert signing_ca(authority) == second  # the prepared CA took over
    assert authority.active_chain() == [second, root]
    assert upstream.calls == 3
    assert authority.last_signed_at is not None


def test_a_renewal_the_upstream_refuses_stays_requested_until_it_signs(
    authority: CertificateAuthority, upstream: SwitchableUpstream
) -> None:
    authority.maintain()
    first = signing_ca(authority)
    upstream.failing = True

    authority.request_renewal()
    for _ in range(2):
        with pytest.raises(UpstreamError, match="upstream unreachable"):
            authority.maintain()
    assert signing_ca(authority) == first
    upstream.failing = False
    authority.maintain()

    assert upstream.calls == 4
    assert upstream.issued[-1] in authority.bundle()


# -- persistence ----------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.75])
def test_state_survives_a_restart_through_the_authority_file(
    upstream: SwitchableUpstream, clock: FakeClock, tmp_path: Path, fraction: float
) -> None:
    path = tmp_path / "state" / "authority.json"
    first = CertificateAuthority(
        trust_domain=TD, upstream=upstream, store=AuthorityFile(path), ca_ttl=CA_TTL, clock=clock
    )
    settle(first, clock, clock.now)
    due = settle(first, clock, at(signing_ca(first), fraction))
    calls = upstream.calls

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = CertificateAuthority(
        trust_domain=TD, upstream=upstream, store=AuthorityFile(path), ca_ttl=CA_TTL, clock=clock
    )
    assert fingerprints(second.bundle()) == fingerprints(first.bundle())
    assert second.active_ca() == first.active_ca()
    assert second.jwt_public_keys() == first.jwt_public_keys()
    assert second.jwt_signing_key()[0] == first.jwt_signing_key()[0]
    assert signing_ca(second) == signing_ca(first)
    # Nothing is due after the restart: no new CA from the upstream.
    assert second.maintain() == due
    assert upstream.calls == calls
    svid = second.sign_x509_svid(WORKLOAD, ttl=SVID_TTL)
    assert verify_x509_svid([svid.leaf], first.bundle(), trust_domain=TD, now=clock.now)


def test_ca_numbers_never_repeat_even_after_retired_cas_expire(
    upstream: SwitchableUpstream, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "authority.json"
    authority = CertificateAuthority(
        trust_domain=TD, upstream=upstream, store=AuthorityFile(path), ca_ttl=CA_TTL, clock=clock
    )
    when = clock.now
    for _ in range(40):
        when = settle(authority, clock, when)
        if len(upstream.issued) >= 6:
            break
    first = upstream.issued[0]
    assert first.not_valid_after_utc <= clock.now
    assert first.fingerprint(hashes.SHA256()) not in fingerprints(authority.bundle())
    numbers = [ca_number(ca) for ca in upstream.issued]
    assert numbers[0] == 1
    assert numbers == sorted(set(numbers)), "CA numbers must strictly grow"

    # next_number goes through the authority file; a restart after every CA has expired (the
    # issuer was down longer than a CA TTL) must not start again from 1.
    persisted = AuthorityFile(path).load().next_number
    assert persisted > max(numbers)
    clock.now = max(ca.not_valid_after_utc for ca in upstream.issued) + SECOND
    restarted = CertificateAuthority(
        trust_domain=TD, upstream=upstream, store=AuthorityFile(path), ca_ttl=CA_TTL, clock=clock
    )
    settle(restarted, clock, clock.now)
    fresh = signing_ca(restarted)
    assert ca_number(fresh) == persisted
    assert fingerprints(restarted.bundle())[-1:] == fingerprints([fresh])
    assert len(restarted.bundle()) == 2  # the root and the fresh CA: everything else expired
    assert AuthorityFile(path).load().next_number > persisted


def test_next_number_survives_an_authority_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "authority.json"
    AuthorityFile(path).save(AuthorityState(next_number=42))
    loaded = AuthorityFile(path).load()
    assert loaded.next_number == 42
    assert (loaded.active, loaded.prepared, loaded.retired) == (None, None, [])


def test_unreadable_authority_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "authority.json"
    path.write_text('{"active": {"ca_cert": "not a certificate"}}')
    with pytest.raises(IssuerError, match="cannot read the issuer's CA state"):
        AuthorityFile(path).load()


def test_missing_authority_file_is_an_empty_state(tmp_path: Path) -> None:
    state = AuthorityFile(tmp_path / "absent.json").load()
    assert (state.active, state.prepared, state.retired) == (None, None, [])


# -- disk upstream --------------------------------------------------------------------------


def _csr() -> x509.CertificateSigningRequest:
    return build_signing_ca_csr(new_key(), TD, "ztbank issuer CA 1")


def test_disk_upstream_without_root_points_to_certs_init(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match="ztbank certs init"):
        DiskUpstream(tmp_path / "empty").sign_signing_ca(_csr(), trust_domain=TD, ttl=CA_TTL)


def test_disk_upstream_signs_with_the_root(certs_dir: Path, root: x509.Certificate) -> None:
    signed = DiskUpstream(certs_dir).sign_signing_ca(_csr(), trust_domain=TD, ttl=CA_TTL)
    signed.certificate.verify_directly_issued_by(root)
    assert signed.roots == (root,)
    assert signed.chain == ()


def test_init_root_ca_creates_a_private_key(tmp_path: Path) -> None:
    result = init_root_ca(tmp_path / "certs", TD)
    assert result.created
    assert result.key_path == tmp_path / "certs" / ROOT_KEY_FILE
    assert result.cert_path == tmp_path / "certs" / ROOT_CERT_FILE
    assert stat.S_IMODE(result.key_path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(result.cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]


def test_init_root_ca_never_overwrites(certs_dir: Path) -> None:
    before = {name: (certs_dir / name).read_bytes() for name in (ROOT_CERT_FILE, ROOT_KEY_FILE)}
    result = init_root_ca(certs_dir, TD)
    assert not result.created
    after = {name: (certs_dir / name).read_bytes() for name in (ROOT_CERT_FILE, ROOT_KEY_FILE)}
    assert after == before


@pytest.mark.parametrize("kept", [ROOT_CERT_FILE, ROOT_KEY_FILE])
def test_init_root_ca_refuses_half_a_root(certs_dir: Path, kept: str) -> None:
    for name in (ROOT_CERT_FILE, ROOT_KEY_FILE):
        if name != kept:
            (certs_dir / name).unlink()
    content = (certs_dir / kept).read_bytes()
    with pytest.raises(UpstreamError, match="only one of"):
        init_root_ca(certs_dir, TD)
    assert (certs_dir / kept).read_bytes() == content


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_disk_upstream_refuses_a_readable_root_key(certs_dir: Path, mode: int) -> None:
    (certs_dir / ROOT_KEY_FILE).chmod(mode)
    with pytest.raises(UpstreamError, match="0600"):
        DiskUpstream(certs_dir).sign_signing_ca(_csr(), trust_domain=TD, ttl=CA_TTL)
