"""RevocationWatcher against a local ``/crls``: verification, freshness, replay, notices."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.errors import CommonError
from services.common.identity.pem import serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier
from services.common.revocation import (
    MAX_RESPONSE_BYTES,
    RevocationError,
    RevocationUnavailableError,
    RevocationWatcher,
    RevokedCertificateError,
    split_pem_crls,
)
from tests.support.crl import Clock, CrlServer, build_crl, crl_pem, crl_server, wait_for
from tests.support.pki import (
    Issued,
    KeyUsageSpec,
    create_intermediate_ca,
    create_leaf,
    create_root_ca,
)

TD = "ztbank.example"
CORRUPT_CRL = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
WORKLOAD = f"spiffe://{TD}/env/test/zone/az1/team/payments/svc/transfer-engine"


@pytest.fixture(scope="module")
def root() -> Issued:
    return create_root_ca(common_name="unit root")


@pytest.fixture(scope="module")
def ca(root: Issued) -> Issued:
    return create_intermediate_ca(root, common_name="unit signing CA 1")


@pytest.fixture(scope="module")
def ca2(root: Issued) -> Issued:
    return create_intermediate_ca(root, common_name="unit signing CA 2")


@pytest.fixture
def server() -> Iterator[CrlServer]:
    with crl_server() as crls:
        yield crls


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Bundle:
    """A trust bundle the test can change, as rotation changes the SVID source's."""

    def __init__(self, *certificates: x509.Certificate) -> None:
        self.certificates = list(certificates)

    def __call__(self) -> list[x509.Certificate]:
        return self.certificates


def watcher_of(server: CrlServer, bundle: Bundle, clock: Clock) -> RevocationWatcher:
    return RevocationWatcher(server.url, bundle, interval=60, clock=clock)


def leaf_of(ca: Issued) -> x509.Certificate:
    return create_leaf(ca, uri_sans=[WORKLOAD]).certificate


def test_errors_are_common_errors() -> None:
    assert issubclass(RevokedCertificateError, RevocationError)
    assert issubclass(RevocationUnavailableError, RevocationError)
    assert issubclass(RevocationError, CommonError)


def test_split_pem_crls_finds_every_block(ca: Issued, ca2: Issued) -> None:
    body = b"junk\n" + crl_pem(build_crl(ca), build_crl(ca2)) + b"trailer"
    blocks = split_pem_crls(body)
    assert len(blocks) == 2
    issuers = [x509.load_pem_x509_crl(block).issuer for block in blocks]
    assert issuers == [ca.certificate.subject, ca2.certificate.subject]


def test_a_listed_serial_is_revoked_others_pass(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    revoked, kept = leaf_of(ca), leaf_of(ca)
    server.publish(build_crl(ca, [revoked]))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()

    watcher.check(kept)
    with pytest.raises(RevokedCertificateError) as caught:
        watcher.check(revoked)
    message = str(caught.value)
    assert message.startswith("certificate revoked: serial ")
    assert serial_hex(revoked) in message
    assert "key_compromise" in message
    assert watcher.revoked_serials() == {serial_hex(revoked)}
    assert watcher.fresh()


def test_each_ca_has_its_own_crl_in_one_response(
    server: CrlServer, root: Issued, ca: Issued, ca2: Issued, clock: Clock
) -> None:
    first, second = leaf_of(ca), leaf_of(ca2)
    server.publish(build_crl(ca, [first]), build_crl(ca2))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate, ca2.certificate), clock)
    watcher.poll()
    with pytest.raises(RevokedCertificateError):
        watcher.check(first)
    watcher.check(second)


def test_no_crl_for_the_issuing_ca_fails_closed(
    server: CrlServer, root: Issued, ca: Issued, ca2: Issued, clock: Clock
) -> None:
    server.publish(build_crl(ca))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate, ca2.certificate), clock)
    watcher.poll()
    with pytest.raises(RevocationUnavailableError, match="no CRL of the issuing CA"):
        watcher.check(leaf_of(ca2))


def test_nothing_fetched_yet_fails_closed(server: CrlServer, root: Issued, ca: Issued) -> None:
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), Clock())
    with pytest.raises(RevocationUnavailableError):
        watcher.check(leaf_of(ca))
    assert not watcher.fresh()
    assert watcher.age_seconds() is None


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param("other-key", id="same-name-other-key"),
        pytest.param("unknown-ca", id="ca-not-in-bundle"),
        pytest.param("no-crl-sign", id="ca-without-crlsign"),
    ],
)
def test_an_unverifiable_crl_is_ignored_and_logged(
    forge: str,
    server: CrlServer,
    root: Issued,
    ca: Issued,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaf = leaf_of(ca)
    trusted = ca
    if forge == "other-key":
        signer = create_intermediate_ca(root, common_name="unit signing CA 1")  # same subject
    elif forge == "unknown-ca":
        signer = create_intermediate_ca(root, common_name="not in the bundle")
    else:
        signer = create_intermediate_ca(
            root,
            common_name="CA without cRLSign",
            key_usage=KeyUsageSpec(digital_signature=True, key_cert_sign=True),
        )
        trusted = signer
        leaf = leaf_of(signer)
    server.publish(build_crl(signer, [leaf]))
    watcher = watcher_of(server, Bundle(root.certificate, trusted.certificate), clock)
    with caplog.at_level(logging.WARNING, "services.common.revocation"):
        watcher.poll()
    assert "ignored" in caplog.text
    assert watcher.revoked_serials() == frozenset()
    # The forgery revokes nothing, and vouches for nothing either.
    with pytest.raises(RevocationUnavailableError):
        watcher.check(leaf)
    with pytest.raises(RevocationUnavailableError):
        watcher.wait_ready(0)


def test_a_forged_crl_next_to_the_real_one_changes_nothing(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    leaf = leaf_of(ca)
    impostor = create_intermediate_ca(root, common_name="unit signing CA 1")
    server.publish(build_crl(impostor, [leaf], number=99), build_crl(ca, number=1))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    watcher.check(leaf)


def test_past_next_update_fails_closed_but_revoked_stays_revoked(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    revoked, kept = leaf_of(ca), leaf_of(ca)
    server.publish(build_crl(ca, [revoked], validity=timedelta(seconds=20)))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    watcher.check(kept)

    clock.advance(timedelta(seconds=21))
    with pytest.raises(RevocationUnavailableError, match=r"expired at .*nextUpdate"):
        watcher.check(kept)
    with pytest.raises(RevokedCertificateError):
        watcher.check(revoked)
    assert not watcher.fresh()
    assert watcher.age_seconds() == pytest.approx(21, abs=1)


def test_readiness_names_the_ca_whose_crl_is_stale(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    assert watcher.problem() == f"failing closed: no CRL verified yet from {server.url}"
    server.publish(build_crl(ca, validity=timedelta(seconds=20)))
    watcher.poll()
    assert watcher.problem() is None

    clock.advance(timedelta(seconds=21))

    problem = watcher.problem()
    assert problem is not None
    assert problem.startswith("failing closed: no fresh CRL of CN=unit signing CA 1")
    assert problem.endswith("(nextUpdate)")


def test_issuer_away_longer_than_the_crl_validity_fails_closed(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    # An issuer clock ahead of ours: nextUpdate alone would keep this CRL 20 minutes.
    ahead = datetime.now(UTC) + timedelta(minutes=10)
    server.publish(build_crl(ca, this_update=ahead, validity=timedelta(minutes=10)))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    assert watcher.fresh()
    server.status = 503
    clock.advance(timedelta(minutes=11))
    watcher.poll()
    with pytest.raises(RevocationUnavailableError, match="longer ago than its validity"):
        watcher.check(leaf_of(ca))


def test_outage_then_recovery_without_restart(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    leaf = leaf_of(ca)
    server.publish(build_crl(ca, number=1))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    server.status = 503  # the issuer is broken ...
    clock.advance(timedelta(seconds=10))
    watcher.poll()
    watcher.check(leaf)  # ... but the CRL is valid until nextUpdate
    assert watcher.age_seconds() == pytest.approx(10, abs=1)

    clock.advance(timedelta(seconds=15))
    watcher.poll()
    with pytest.raises(RevocationUnavailableError):
        watcher.check(leaf)
    assert not watcher.fresh()

    server.publish(build_crl(ca, number=2, this_update=clock()))  # the issuer is back
    watcher.poll()
    watcher.check(leaf)
    assert watcher.fresh()
    assert watcher.age_seconds() == pytest.approx(0, abs=1)


def test_an_older_crl_is_a_replay_and_is_ignored(
    server: CrlServer,
    root: Issued,
    ca: Issued,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    leaf = leaf_of(ca)
    start = datetime.now(UTC)
    old = build_crl(ca, number=1, this_update=start - timedelta(seconds=5))
    server.publish(build_crl(ca, [leaf], number=2, this_update=start))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    server.publish(old)
    with caplog.at_level(logging.WARNING, "services.common.revocation"):
        watcher.poll()
    assert "replay" in caplog.text
    with pytest.raises(RevokedCertificateError):
        watcher.check(leaf)


def test_the_same_crl_served_again_refreshes_the_age(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    server.publish(build_crl(ca, validity=timedelta(minutes=5)))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    clock.advance(timedelta(seconds=30))
    assert watcher.age_seconds() == pytest.approx(30, abs=1)
    watcher.poll()
    assert watcher.age_seconds() == pytest.approx(0, abs=1)


def test_not_modified_answers_keep_the_crls_fresh(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    revoked = leaf_of(ca)
    server.publish(build_crl(ca, [revoked], validity=timedelta(minutes=5)))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    clock.advance(timedelta(seconds=30))
    watcher.poll()  # If-None-Match: the issuer answers 304 without a body
    assert server.not_modified == 1
    assert watcher.age_seconds() == pytest.approx(0, abs=1)
    with pytest.raises(RevokedCertificateError):
        watcher.check(revoked)

    clock.advance(timedelta(minutes=5))  # a 304 does not stretch a CRL past its nextUpdate
    watcher.poll()
    assert server.not_modified == 2
    assert not watcher.fresh()

    server.publish(build_crl(ca, number=2, this_update=clock()))  # a new ETag
    watcher.poll()
    assert server.not_modified == 2
    assert watcher.fresh()
    watcher.check(revoked)  # it left the CRL (expired, say)


def test_a_ca_leaving_the_bundle_takes_its_crl_along(
    server: CrlServer, root: Issued, ca: Issued, ca2: Issued, clock: Clock
) -> None:
    revoked = leaf_of(ca)
    bundle = Bundle(root.certificate, ca.certificate, ca2.certificate)
    server.publish(build_crl(ca, [revoked]), build_crl(ca2))
    watcher = watcher_of(server, bundle, clock)
    watcher.poll()
    assert watcher.revoked_serials() == {serial_hex(revoked)}

    bundle.certificates = [root.certificate, ca2.certificate]  # ca retired
    watcher.poll()
    assert watcher.revoked_serials() == frozenset()
    with pytest.raises(RevocationUnavailableError):
        watcher.check(revoked)
    watcher.check(leaf_of(ca2))


def test_the_crl_of_an_expired_ca_is_dropped(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    short = create_intermediate_ca(
        root, common_name="short-lived CA", not_after=datetime.now(UTC) + timedelta(hours=1)
    )
    server.publish(build_crl(ca, validity=timedelta(hours=3)), build_crl(short))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate, short.certificate), clock)
    watcher.poll()
    clock.advance(timedelta(hours=2))  # short expired; its last CRL is long stale
    server.publish(build_crl(ca, number=2, this_update=clock(), validity=timedelta(hours=3)))
    watcher.poll()
    assert watcher.fresh()  # no false alarm for a CA whose certificates are all dead
    watcher.check(leaf_of(ca))


def test_listeners_hear_of_growth_only(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    first, second = leaf_of(ca), leaf_of(ca)
    heard: list[frozenset[str]] = []
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.subscribe(heard.append)
    server.publish(build_crl(ca, number=1))
    watcher.poll()
    assert heard == []

    server.publish(build_crl(ca, [first], number=2))
    watcher.poll()
    watcher.poll()  # the same CRL again: no news
    assert heard == [{serial_hex(first)}]

    server.publish(build_crl(ca, [first, second], number=3))
    watcher.poll()
    server.publish(build_crl(ca, [second], number=4))  # first expired and left the CRL
    watcher.poll()
    assert heard == [{serial_hex(first)}, {serial_hex(first), serial_hex(second)}]


def test_a_failing_listener_does_not_stop_the_others(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    heard: list[frozenset[str]] = []

    def broken(_: frozenset[str]) -> None:
        raise RuntimeError("boom")

    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.subscribe(broken)
    watcher.subscribe(heard.append)
    server.publish(build_crl(ca, [leaf_of(ca)]))
    watcher.poll()
    assert len(heard) == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(404, b"not found", id="404"),
        pytest.param(200, b"", id="empty"),
        pytest.param(
            200, b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", id="corrupt"
        ),
    ],
)
def test_wait_ready_fails_closed_with_the_reason(
    status: int, body: bytes, server: CrlServer, root: Issued, ca: Issued
) -> None:
    server.body, server.status = body, status
    watcher = RevocationWatcher(server.url, Bundle(root.certificate, ca.certificate), interval=0.02)
    watcher.start()
    try:
        with pytest.raises(RevocationUnavailableError, match="no fresh CRL from http://"):
            watcher.wait_ready(0.2)
    finally:
        watcher.close()


def test_wait_ready_returns_once_the_issuer_answers(
    server: CrlServer, root: Issued, ca: Issued
) -> None:
    server.status = 503
    watcher = RevocationWatcher(server.url, Bundle(root.certificate, ca.certificate), interval=0.02)
    watcher.start()
    try:
        with pytest.raises(RevocationUnavailableError, match="503"):
            watcher.wait_ready(0.1)
        server.publish(build_crl(ca))
        watcher.wait_ready(5)
        assert watcher.fresh()
    finally:
        watcher.close()


def test_unreachable_issuer_is_reported(root: Issued, ca: Issued) -> None:
    with crl_server() as gone:
        url = gone.url
    watcher = RevocationWatcher(url, Bundle(root.certificate, ca.certificate), interval=0.02)
    watcher.start()
    try:
        with pytest.raises(RevocationUnavailableError, match="cannot fetch"):
            watcher.wait_ready(0.2)
    finally:
        watcher.close()


def crl_watcher_threads() -> int:
    return sum(thread.name == "crl-watcher" for thread in threading.enumerate())


def test_close_joins_the_watcher_thread(server: CrlServer, root: Issued, ca: Issued) -> None:
    server.publish(build_crl(ca))
    before = crl_watcher_threads()
    watcher = RevocationWatcher(server.url, Bundle(root.certificate, ca.certificate), interval=60)
    watcher.start()
    watcher.wait_ready(5)
    assert crl_watcher_threads() == before + 1
    watcher.close()
    assert crl_watcher_threads() == before
    watcher.close()  # idempotent


def test_a_listener_may_close_the_watcher_from_the_watchers_thread(
    server: CrlServer, root: Issued, ca: Issued
) -> None:
    server.publish(build_crl(ca, [leaf_of(ca)]))
    watcher = RevocationWatcher(server.url, Bundle(root.certificate, ca.certificate), interval=0.02)
    closed_from: list[str] = []

    def close_on_revocation(_: frozenset[str]) -> None:
        watcher.close()  # must not wait for the thread it runs in
        closed_from.append(threading.current_thread().name)

    watcher.subscribe(close_on_revocation)
    before = crl_watcher_threads()
    watcher.start()
    try:
        assert wait_for(lambda: crl_watcher_threads() == before and closed_from)
        assert closed_from == ["crl-watcher"]
        assert watcher.closed
    finally:
        watcher.close()


def test_an_oversized_answer_is_refused(server: CrlServer, root: Issued, ca: Issued) -> None:
    server.body = b"x" * (MAX_RESPONSE_BYTES + 1)
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), Clock())
    watcher.poll()
    with pytest.raises(RevocationUnavailableError, match="larger than"):
        watcher.wait_ready(0)


def test_a_persistent_problem_is_logged_once(
    server: CrlServer, root: Issued, ca: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    server.status = 503
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), Clock())
    with caplog.at_level(logging.INFO, "services.common.revocation"):
        for _ in range(3):
            watcher.poll()
        server.publish(build_crl(ca))
        watcher.poll()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "verified again" in caplog.records[-1].getMessage()


def test_only_http_urls_and_positive_intervals(root: Issued) -> None:
    with pytest.raises(ValueError, match="http"):
        RevocationWatcher("file:///etc/passwd", lambda: [root.certificate])
    with pytest.raises(ValueError, match="positive"):
        RevocationWatcher("http://127.0.0.1:1/crls", lambda: [root.certificate], interval=0)


def test_peer_verifier_refuses_a_revoked_svid_naming_the_peer(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock
) -> None:
    leaf = create_leaf(ca, uri_sans=[WORKLOAD])
    server.publish(build_crl(ca, [leaf.certificate]))
    watcher = watcher_of(server, Bundle(root.certificate, ca.certificate), clock)
    watcher.poll()
    own = create_leaf(ca, uri_sans=[WORKLOAD])
    material = SvidMaterial(
        spiffe_id=SpiffeId.parse(WORKLOAD),
        chain=(own.certificate, ca.certificate),
        key=own.key,
        bundle=(root.certificate, ca.certificate),
    )
    verifier = PeerVerifier(lambda: material, TD, revocation=watcher)
    chain = [c.public_bytes(serialization.Encoding.DER) for c in (leaf.certificate, ca.certificate)]
    with pytest.raises(RevokedCertificateError) as caught:
        verifier.verify(chain, "127.0.0.1:4000")
    peer = caught.value.peer
    assert peer is not None
    assert str(peer.spiffe_id) == WORKLOAD
    assert peer.serial == serial_hex(leaf.certificate)
    assert peer.address == "127.0.0.1:4000"

    other = create_leaf(ca, uri_sans=[WORKLOAD])
    chain[0] = other.certificate.public_bytes(serialization.Encoding.DER)
    assert verifier.verify(chain, "127.0.0.1:4001").serial == serial_hex(other.certificate)


def test_a_client_started_during_an_outage_uses_the_kept_crls(
    server: CrlServer, root: Issued, ca: Issued, clock: Clock, tmp_path: Path
) -> None:
    """Short-lived clients (the teller CLI) keep the last verified answer in a cache file."""
    cache = tmp_path / "cache" / "crls.pem"
    revoked, kept = leaf_of(ca), leaf_of(ca)
    server.publish(build_crl(ca, [revoked]))
    bundle = Bundle(root.certificate, ca.certificate)
    first = RevocationWatcher(server.url, bundle, clock=clock, cache=cache)
    first.poll()
    assert b"-----BEGIN X509 CRL-----" in cache.read_bytes()

    server.status = 503  # the issuer goes away; a new client starts
    later = RevocationWatcher(server.url, bundle, clock=clock, cache=cache)
    later.poll()
    later.check(kept)
    with pytest.raises(RevokedCertificateError):
        later.check(revoked)

    clock.advance(timedelta(minutes=30))  # the kept CRLs are judged like fetched ones
    stale = RevocationWatcher(server.url, bundle, clock=clock, cache=cache)
    stale.poll()
    with pytest.raises(RevocationUnavailableError):
        stale.check(kept)


def test_only_a_verified_answer_is_kept(
    server: CrlServer, root: Issued, ca: Issued, ca2: Issued, clock: Clock, tmp_path: Path
) -> None:
    cache = tmp_path / "crls.pem"
    server.publish(build_crl(ca2))  # signed by a CA the bundle does not hold
    watcher = RevocationWatcher(
        server.url, Bundle(root.certificate, ca.certificate), clock=clock, cache=cache
    )
    watcher.poll()
    assert not cache.exists()
