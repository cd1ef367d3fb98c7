"""The identity-aware circuit breaker: score (trust x certificate lifetime left), failure rate
over its window, and the closed / open / half-open states, on an injected clock."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum

from services.common.authz.policy import RELOAD_CHECK_SECONDS
from services.common.identity.spiffe_id import SpiffeId
from services.common.resilience.circuit import BreakerOpenError, BreakerState, CircuitBreaker
from services.common.resilience.metrics import register_breaker_metrics
from services.common.resilience.peer_watch import PeerCertificate
from services.common.resilience.settings import BreakerConfig, BreakerSettings
from services.common.resilience.trailers import pushback_trailer, retry_pushback_seconds
from services.common.resilience.trust_table import (
    TrustLevels,
    TrustTable,
    TrustTableError,
    parse_trust_levels,
)
from services.common.settings import InvalidSettingsError, load_settings

LIFETIME = 300.0  # a five-minute SVID
PROD = SpiffeId.parse("spiffe://ztbank.example/env/prod/zone/az1/team/risk/svc/risk")
STAGING = SpiffeId.parse("spiffe://ztbank.example/env/staging/zone/az1/team/risk/svc/risk")
LAB = SpiffeId.parse("spiffe://ztbank.example/env/lab/zone/az1/team/risk/svc/risk")
TABLE = """{"default": 0.5, "levels": {"env/prod": 0.95, "env/staging": 0.6,
            "env/prod/zone/az1/team/risk": 0.7}}"""
SHIPPED = Path(__file__).resolve().parents[3] / "infra" / "trust-levels.json"


class Clock:
    """Monotonic and wall time moving together; certificates are issued at wall time 0."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now - 1000.0

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakePeer:
    certificate: PeerCertificate | None
    problem: str = "no verified handshake with risk yet"
    woken: int = field(default=0)
    closed: bool = False

    def wake(self) -> None:
        self.woken += 1

    def close(self) -> None:
        self.closed = True


def certificate(
    spiffe_id: SpiffeId, left: float = 1.0, *, serial: str = "01", lifetime: float = LIFETIME
) -> PeerCertificate:
    """A certificate with ``left`` of its lifetime remaining at wall time 0."""
    not_after = left * lifetime
    return PeerCertificate(spiffe_id, serial, not_after - lifetime, not_after)


def levels(trust: dict[str, float], default: float = 0.5, generation: int = 1) -> TrustLevels:
    prefixes = tuple((tuple(p.split("/")), t) for p, t in trust.items())
    return TrustLevels(default, prefixes, generation)


STANDARD = levels({"env/prod": 0.95, "env/staging": 0.6, "env/lab": 0.7})


def failed(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "boom")


class Harness:
    def __init__(
        self,
        peer: PeerCertificate | None,
        config: BreakerConfig | None = None,
        table: TrustLevels | TrustTable = STANDARD,
    ) -> None:
        self.clock = Clock()
        self.peer = FakePeer(peer)
        current = table.current if isinstance(table, TrustTable) else (lambda: table)
        self.breaker = CircuitBreaker(
            "risk",
            config or BreakerConfig(),
            levels=current,
            peer=self.peer,
            monotonic=self.clock.monotonic,
            wall=self.clock.wall,
        )

    def state(self) -> BreakerState:
        # A call, not a property: mypy would narrow a property across the calls that move it.
        return self.breaker.state

    def call(self, error: BaseException | None = None) -> None:
        """One call through the breaker that ends with ``error`` (None: an answer)."""
        with self.breaker.admit():
            if error is not None:
                raise error

    def calls(self, count: int, error: BaseException | None = None) -> None:
        for _ in range(count):
            with contextlib.suppress(grpc.aio.AioRpcError):
                self.call(error)

    def refusal(self) -> BreakerOpenError:
        with pytest.raises(BreakerOpenError) as refused:
            self.call()
        return refused.value

    def closed(self) -> Harness:
        """A breaker with a verified certificate is closed from the start, its window empty."""
        assert self.state() is BreakerState.CLOSED
        return self


UNAVAILABLE = failed(grpc.StatusCode.UNAVAILABLE)


# -- score -----------------------------------------------------------------------------------


def test_prod_with_a_fresh_certificate_scores_097_and_is_called() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    assert harness.breaker.score() == pytest.approx(0.97)
    harness.calls(5)
    assert harness.state() is BreakerState.CLOSED


def test_staging_with_half_its_lifetime_left_scores_056_and_is_never_called() -> None:
    harness = Harness(certificate(STAGING, 0.5))
    refused = harness.refusal()
    assert harness.breaker.score() == pytest.approx(0.56)
    assert "score 0.56 < 0.75" in refused.reason
    assert "trust 0.6 of spiffe://ztbank.example/env/staging/" in refused.reason
    assert "50% of its certificate's lifetime left" in refused.reason
    assert harness.state() is BreakerState.OPEN


@pytest.mark.parametrize(
    ("spiffe_id", "left", "allowed"),
    [
        (PROD, 1.0, True),  # 0.97
        (PROD, 0.46, True),  # 0.754
        (PROD, 0.44, False),  # 0.746
        (STAGING, 1.0, True),  # 0.76
        (STAGING, 0.9, False),  # 0.72
        (LAB, 1.0, True),  # 0.82
        (LAB, 0.7, False),  # 0.70
    ],
)
def test_score_threshold(spiffe_id: SpiffeId, left: float, allowed: bool) -> None:
    harness = Harness(certificate(spiffe_id, left))
    if allowed:
        harness.closed()
    else:
        harness.refusal()
        assert harness.state() is BreakerState.OPEN


def test_the_breaker_opens_as_the_peer_certificate_ages() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    # prod needs 45 % of the lifetime left: 0.6 * 0.95 + 0.4 * 0.45 = 0.75.
    harness.clock.advance(0.54 * LIFETIME)
    harness.call()
    assert harness.state() is BreakerState.CLOSED
    harness.clock.advance(0.02 * LIFETIME)
    refused = harness.refusal()
    assert refused.reason.startswith("score 0.746 < 0.75")
    # The peer's next certificate brings the score back: after the cool-down, a probe.
    now = harness.clock.wall()
    harness.peer.certificate = PeerCertificate(PROD, "02", now - 10, now + LIFETIME - 10)
    assert "cool-down" not in harness.refusal().reason
    harness.clock.advance(10)
    harness.call()
    assert harness.state() is BreakerState.CLOSED


def test_before_a_first_certificate_calls_are_refused_without_opening() -> None:
    harness = Harness(None)
    refused = harness.refusal()
    assert refused.reason == "no verified handshake with risk yet"
    assert harness.peer.woken == 1  # the watcher is asked to look now
    assert harness.state() is BreakerState.CLOSED  # no evidence to open on: no cool-down
    harness.peer.certificate = certificate(PROD, 1.0)
    harness.calls(3)  # concurrent first calls all go through: no single probe
    assert harness.state() is BreakerState.CLOSED


def test_a_lost_certificate_opens_the_breaker() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    harness.peer.certificate = None
    harness.peer.problem = "risk served a certificate that failed verification: revoked"
    assert "revoked" in harness.refusal().reason


# -- failure rate ----------------------------------------------------------------------------


def test_half_the_calls_failing_opens_a_trusted_peer() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    harness.calls(5)
    harness.calls(4, UNAVAILABLE)
    assert harness.state() is BreakerState.CLOSED  # 4 of 9: below the minimum of 10 calls
    harness.calls(1, failed(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert harness.state() is BreakerState.OPEN
    assert harness.breaker.reason == "failure rate 50% of 10 calls in the last 60 s >= 50%"


def test_below_half_failing_keeps_a_trusted_peer_closed() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    harness.calls(6)
    harness.calls(4, failed(grpc.StatusCode.INTERNAL))
    harness.calls(1, failed(grpc.StatusCode.UNKNOWN))
    assert harness.state() is BreakerState.CLOSED  # 5 of 11


def test_a_low_trust_peer_opens_at_five_percent() -> None:
    lab = Harness(certificate(LAB, 1.0)).closed()  # trust 0.7 < 0.8, score 0.82
    prod = Harness(certificate(PROD, 1.0)).closed()
    for harness in (lab, prod):
        harness.calls(19)
        harness.calls(1, UNAVAILABLE)
    assert lab.state() is BreakerState.OPEN
    assert lab.breaker.reason.endswith(">= 5% (low-trust peer)")
    assert prod.state() is BreakerState.CLOSED


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
    ],
)
def test_refusals_by_the_callee_are_answers_not_failures(code: grpc.StatusCode) -> None:
    harness = Harness(certificate(LAB, 1.0)).closed()
    harness.calls(20, failed(code))
    assert harness.state() is BreakerState.CLOSED


def test_a_callee_unavailable_because_of_its_own_dependency_answered() -> None:
    harness = Harness(certificate(PROD, 1.0), BreakerConfig(min_calls=2)).closed()
    tagged = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("ztbank-dependency-unavailable", "risk")),
        "risk service unavailable",
    )
    harness.calls(5, tagged)
    assert harness.state() is BreakerState.CLOSED
    untagged = Harness(certificate(PROD, 1.0), BreakerConfig(min_calls=2)).closed()
    untagged.calls(2, UNAVAILABLE)
    assert untagged.state() is BreakerState.OPEN


@pytest.mark.parametrize(
    ("trailers", "seconds"),
    [
        ((pushback_trailer(7),), 7),
        ((("grpc-retry-pushback-ms", "1"),), 1),  # rounded up: never "retry in 0 s"
        ((("grpc-retry-pushback-ms", "soon"),), None),
        ((("grpc-retry-pushback-ms", "-1"),), None),  # gRFC A6: negative means "do not retry"
        ((), None),
    ],
)
def test_a_callees_pushback_is_read_in_whole_seconds(
    trailers: tuple[tuple[str, str], ...], seconds: int | None
) -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "out"
    )
    assert retry_pushback_seconds(error) == seconds


def test_calls_we_cancel_count_for_nothing() -> None:
    harness = Harness(certificate(LAB, 1.0)).closed()
    harness.calls(20)
    for _ in range(5):
        with pytest.raises(grpc.aio.UsageError):
            harness.call(grpc.aio.UsageError("channel closed by rotation"))
    harness.calls(5, failed(grpc.StatusCode.CANCELLED))
    assert harness.state() is BreakerState.CLOSED


def test_failures_leave_the_sixty_second_window() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    harness.calls(9, UNAVAILABLE)
    harness.clock.advance(61)
    harness.calls(10)
    harness.calls(9, UNAVAILABLE)  # 9 of 19 in the window: the first nine are gone
    assert harness.state() is BreakerState.CLOSED
    harness.calls(1, UNAVAILABLE)
    assert harness.state() is BreakerState.OPEN  # 10 of 20


def test_near_expiry_the_window_is_thirty_seconds() -> None:
    # Same calls, same times; only the peer's lifetime left differs (0.49 is near expiry, and
    # 34 s later still 0.48 of a 3000 s lifetime: 0.6 * 0.95 + 0.4 * 0.48 >= 0.75).
    outcomes = {}
    for left in (1.0, 0.49):
        harness = Harness(certificate(PROD, left, lifetime=3000)).closed()
        harness.calls(20)
        harness.clock.advance(9)
        harness.calls(10, UNAVAILABLE)
        assert harness.state() is BreakerState.CLOSED  # 10 of 30 in both windows
        harness.clock.advance(25)  # the twenty answers are 34 s old
        harness.calls(1, UNAVAILABLE)
        outcomes[left] = harness.state()
    assert outcomes == {1.0: BreakerState.CLOSED, 0.49: BreakerState.OPEN}


# -- states ----------------------------------------------------------------------------------


def tripped() -> Harness:
    harness = Harness(certificate(PROD, 1.0), BreakerConfig(min_calls=2, open_seconds=10)).closed()
    harness.calls(2, UNAVAILABLE)
    assert harness.state() is BreakerState.OPEN
    return harness


def test_open_refuses_at_once_until_the_cool_down_is_over() -> None:
    harness = tripped()
    harness.clock.advance(4)
    refused = harness.refusal()
    assert refused.retry_after == pytest.approx(6)
    assert str(refused).startswith("circuit breaker to risk is open: failure rate 100% of 2")
    assert harness.state() is BreakerState.OPEN


def test_readiness_is_false_while_open_and_true_once_a_probe_may_go() -> None:
    harness = Harness(certificate(PROD, 1.0), BreakerConfig(min_calls=2, open_seconds=10))
    assert harness.breaker.problem() is None
    harness.calls(2, UNAVAILABLE)
    assert harness.breaker.problem() == (
        "circuit breaker to risk open: failure rate 100% of 2 calls in the last 60 s >= 50%"
    )
    harness.clock.advance(10)
    assert harness.breaker.problem() is None  # the next call is the probe


def test_readiness_stays_false_while_the_peers_score_is_too_low() -> None:
    harness = tripped()
    harness.clock.advance(0.6 * LIFETIME)  # 40 % left: 0.73
    problem = harness.breaker.problem()
    assert problem is not None
    assert problem.startswith("circuit breaker to risk open:")


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    harness = tripped()
    harness.clock.advance(10)
    ticket = harness.breaker.admit()
    assert harness.state() is BreakerState.HALF_OPEN
    assert "a probe call is in flight" in harness.refusal().reason
    with ticket:
        pass
    assert harness.state() is BreakerState.CLOSED
    # The failures before the opening are forgotten: one more failure does not reopen it.
    harness.calls(1, UNAVAILABLE)
    assert harness.state() is BreakerState.CLOSED


def test_a_failed_probe_reopens_for_another_cool_down() -> None:
    harness = tripped()
    harness.clock.advance(10)
    harness.calls(1, UNAVAILABLE)
    assert harness.state() is BreakerState.OPEN
    assert harness.breaker.reason == "the half-open probe call failed (UNAVAILABLE)"
    harness.clock.advance(9)
    assert harness.refusal().retry_after == pytest.approx(1)


def test_a_cancelled_probe_leaves_it_half_open_for_the_next_call() -> None:
    harness = tripped()
    harness.clock.advance(10)
    harness.calls(1, failed(grpc.StatusCode.CANCELLED))
    assert harness.state() is BreakerState.HALF_OPEN
    harness.call()
    assert harness.state() is BreakerState.CLOSED


def test_calls_admitted_before_the_opening_do_not_close_it() -> None:
    harness = Harness(certificate(PROD, 1.0), BreakerConfig(min_calls=2)).closed()
    late = harness.breaker.admit()
    harness.calls(2, UNAVAILABLE)
    with late:
        pass  # succeeds after the breaker opened
    assert harness.state() is BreakerState.OPEN


def test_after_the_cool_down_a_low_score_keeps_it_open() -> None:
    harness = tripped()
    harness.clock.advance(0.6 * LIFETIME)  # 40 % left: 0.73
    assert harness.refusal().reason.startswith("score 0.73 < 0.75")
    assert harness.state() is BreakerState.OPEN


def test_closing_the_breaker_stops_its_peer_watch() -> None:
    harness = Harness(certificate(PROD, 1.0)).closed()
    harness.breaker.close()
    assert harness.peer.closed


def test_every_transition_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    with caplog.at_level(logging.INFO, logger="services.common.resilience.circuit"):
        harness = tripped()
        register_breaker_metrics(provider.get_meter("test"), [harness.breaker])
        harness.clock.advance(10)
        harness.calls(1, UNAVAILABLE)
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics}
    state = metrics["breaker.state"].data
    assert isinstance(state, Gauge)
    assert [(dict(p.attributes or {}), p.value) for p in state.data_points] == [
        ({"target": "risk"}, 2)
    ]
    transitions = metrics["breaker.transitions"].data
    assert isinstance(transitions, Sum)
    counted = {
        (str((p.attributes or {})["from"]), str((p.attributes or {})["to"])): p.value
        for p in transitions.data_points
    }
    assert counted == {
        ("closed", "open"): 1,
        ("open", "half_open"): 1,
        ("half_open", "open"): 1,
    }
    score = metrics["breaker.score"].data
    assert isinstance(score, Gauge)
    assert score.data_points[0].value == pytest.approx(0.957, abs=1e-3)  # 10 s later
    lines = [r.getMessage() for r in caplog.records if "transition" in r.getMessage()]
    assert len(lines) == 3
    assert lines[0] == (
        "circuit breaker transition target=risk from=closed to=open"
        f' peer={PROD} score=0.97 reason="failure rate 100% of 2 calls in the last 60 s >= 50%"'
    )
    provider.shutdown()


# -- trust table -----------------------------------------------------------------------------


def test_longest_prefix_wins_and_unmatched_ids_get_the_default() -> None:
    table = parse_trust_levels(TABLE, generation=1)
    assert table.trust(PROD) == 0.7
    assert table.trust(SpiffeId.parse("spiffe://ztbank.example/env/prod/zone/az1")) == 0.95
    assert table.trust(STAGING) == 0.6
    assert table.trust(LAB) == 0.5
    # Whole segments only: env/production is not under env/prod.
    assert table.trust(SpiffeId.parse("spiffe://ztbank.example/env/production")) == 0.5


def test_the_shipped_table_loads() -> None:
    table = TrustTable(SHIPPED, trust_without_table=0.95).current()
    assert table.trust(PROD) == 0.95
    assert table.trust(STAGING) == 0.6


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"levels": {}}', 'expected {"default"'),
        ('{"default": 0.5, "levels": {"env/prod": 1.5}}', "trust of 'env/prod' must be"),
        ('{"default": true, "levels": {}}', "default trust must be"),
        ('{"default": 0.5, "levels": {"/env/prod": 0.9}}', "is not a SPIFFE ID path prefix"),
        ('{"default": 0.5, "levels": []}', "levels must be an object"),
    ],
)
def test_a_malformed_table_is_refused_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "trust-levels.json"
    path.write_text(text)
    with pytest.raises(TrustTableError, match=message) as refused:
        TrustTable(path, trust_without_table=0.95)
    assert "\n" not in str(refused.value)
    assert str(refused.value).startswith(str(path))


class ReloadClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += RELOAD_CHECK_SECONDS


def test_the_table_is_reloaded_and_a_malformed_edit_keeps_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trust-levels.json"
    path.write_text(TABLE)
    clock = ReloadClock()
    table = TrustTable(path, trust_without_table=0.95, clock=clock)
    first = table.current()
    assert first.trust(STAGING) == 0.6

    path.write_text('{"default": 0.5, "levels": {"env/staging": 0.3}}')
    assert table.current() is first  # not re-checked yet
    clock.tick()
    second = table.current()
    assert second.trust(STAGING) == 0.3
    assert second.generation > first.generation

    with caplog.at_level(logging.ERROR, logger="services.common.resilience.trust_table"):
        path.write_text('{"default": 0.5, "levels": {"env/staging": "high"}}')
        clock.tick()
        assert table.current() is second
        clock.tick()
        assert table.current() is second
    refusals = [r.getMessage() for r in caplog.records]
    assert len(refusals) == 1  # one line per bad edit, not one per check
    assert "refused, keeping the previous one" in refusals[0]

    path.unlink()
    clock.tick()
    missing = table.current()
    assert missing.trust(STAGING) == missing.trust(LAB) == 0.95


def test_a_missing_table_gives_every_peer_the_configured_trust(tmp_path: Path) -> None:
    table = TrustTable(tmp_path / "absent.json", trust_without_table=0.95)
    assert table.current().trust(LAB) == 0.95


def test_lowering_a_trust_live_opens_the_breaker_at_the_next_call(tmp_path: Path) -> None:
    path = tmp_path / "trust-levels.json"
    path.write_text('{"default": 0.5, "levels": {"env/prod": 0.95}}')
    clock = ReloadClock()
    table = TrustTable(path, trust_without_table=0.95, clock=clock)
    harness = Harness(certificate(PROD, 1.0), table=table).closed()
    path.write_text('{"default": 0.5, "levels": {"env/prod": 0.5}}')
    clock.tick()
    assert harness.refusal().reason.startswith("score 0.7 < 0.75 (trust 0.5 of")
    path.write_text('{"default": 0.5, "levels": {"env/prod": 0.95}}')
    clock.tick()
    assert harness.refusal().retry_after > 0  # the cool-down still runs
    harness.clock.advance(10)
    harness.call()
    assert harness.state() is BreakerState.CLOSED


# -- settings --------------------------------------------------------------------------------


def test_settings_defaults_are_the_articles_numbers() -> None:
    config = BreakerSettings().breaker
    assert config == BreakerConfig(
        trust_weight=0.6,
        min_score=0.75,
        window_seconds=60,
        near_expiry_window_seconds=30,
        near_expiry_fraction=0.5,
        failure_rate=0.5,
        low_trust_below=0.8,
        low_trust_failure_rate=0.05,
        min_calls=10,
        open_seconds=10,
    )


def test_settings_refuse_a_near_expiry_window_longer_than_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZTBANK_BREAKER_WINDOW_SECONDS", "20")
    with pytest.raises(InvalidSettingsError, match="NEAR_EXPIRY_WINDOW_SECONDS must not exceed"):
        load_settings(BreakerSettings)
