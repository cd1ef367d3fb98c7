"""Identity-aware circuit breaking of a service's outbound gRPC calls.

Each caller (gateway -> transfer-engine, transfer-engine -> risk) keeps one ``CircuitBreaker``
per target.  Before a call it asks ``admit()``; an open breaker raises ``BreakerOpenError`` at
once, and the adapter answers UNAVAILABLE / 503 without touching the network.

The decision combines three things (docs/breaker.md is the reference):

* the **score** of the peer: ``w * trust + (1 - w) * lifetime_left``, where ``trust`` comes from
  the trust table (``trust_table``) and ``lifetime_left`` is the remaining fraction of the
  lifetime of the certificate the peer served at its last verified handshake (``peer_watch``).
  A score under ``min_score`` keeps the breaker open.
* the **failure rate** over a sliding window of one-second buckets (``window``): 60 s, or 30 s
  while the peer's certificate is near expiry; the threshold is 50 %, or 5 % for a low-trust
  peer.  UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and UNKNOWN count as failures; any other
  status is the callee's answer and counts as a success.
* the **state**: closed -> open (score or failure rate) -> after the cool-down half-open, where
  one probe call goes through: its success closes the breaker, its failure reopens it.

Cost per call: a clock read, a table freshness check and a few comparisons; the score is worked
out once per (peer certificate, trust-table generation) as the monotonic time at which it
drops under ``min_score``.  Every call of a breaker runs on one event loop and nothing here
awaits, so the state needs no lock; the watcher thread only swaps an immutable snapshot.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import grpc

from services.common.errors import CommonError
from services.common.resilience.peer_watch import PeerCertificate, PeerView
from services.common.resilience.settings import BreakerConfig
from services.common.resilience.trailers import unavailable_dependency
from services.common.resilience.trust_table import TrustLevels
from services.common.resilience.window import SlidingWindow

logger = logging.getLogger(__name__)

# Statuses that say the callee (or the way to it) failed.  PERMISSION_DENIED, INVALID_ARGUMENT,
# NOT_FOUND and the rest are answers: the callee worked and said no.
FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# The start of every transition's log line: the e2e tests find the transitions by it.
TRANSITION_PREFIX = "circuit breaker transition "


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# The value of the ``breaker.state`` gauge.
STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class BreakerOpenError(CommonError):
    """The breaker to ``target`` refuses calls; ``retry_after`` seconds is a fair wait."""

    def __init__(self, target: str, reason: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker to {target} is open: {reason}")
        self.target = target
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Scored:
    """The score of one certificate under one table, as monotonic deadlines."""

    certificate: PeerCertificate
    generation: int
    trust: float
    ok_until: float  # the score is >= min_score until then
    near_expiry_from: float
    low_trust: bool


class _Ticket:
    """One admitted call; ``with`` settles it from the exception it ended with."""

    __slots__ = ("_breaker", "_epoch")

    def __init__(self, breaker: CircuitBreaker, epoch: int) -> None:
        self._breaker = breaker
        self._epoch = epoch

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._breaker.settle(self._epoch, error)


def is_failure(error: BaseException | None) -> bool | None:
    """True: the callee failed; False: it answered; None: the call says nothing about it
    (cancelled by us, a channel closed by our rotation or shutdown)."""
    if error is None:
        return False
    if isinstance(error, grpc.aio.AioRpcError):
        code = error.code()
        if code == grpc.StatusCode.CANCELLED:
            return None
        if unavailable_dependency(error) is not None:
            return False
        return code in FAILURE_CODES
    return None


class CircuitBreaker:
    """The breaker of one caller to one target (see the module docstring and
    docs/breaker.md).  ``monotonic`` and ``wall`` are injectable for tests."""

    def __init__(
        self,
        target: str,
        config: BreakerConfig,
        *,
        levels: Callable[[], TrustLevels],
        peer: PeerView,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.target = target
        self._config = config
        self._levels = levels
        self._peer = peer
        self._monotonic = monotonic
        self._wall = wall
        self._window = SlidingWindow(config.window_seconds, config.near_expiry_window_seconds)
        self._scored: _Scored | None = None
        # Closed from the start: the service checks its callee once before it serves (see
        # ``watched_breaker``), and concurrent first calls must not queue behind one probe.
        # Until a first certificate is seen, calls are refused without opening.
        self.state = BreakerState.CLOSED
        self.reason = peer.problem
        self._seen = False
        self._open_until = monotonic()
        self._probing = False
        self._epoch = 0
        self.transitions: dict[tuple[str, str], int] = {}
        self._transitions_lock = threading.Lock()

    # -- per call --------------------------------------------------------------------------

    def admit(self) -> _Ticket:
        """A ticket for one call (use it as ``with``), or ``BreakerOpenError`` at once."""
        now = self._monotonic()
        scored = self._score(now)
        if self.state is BreakerState.CLOSED:
            if scored is None or now > scored.ok_until:
                if scored is None and not self._seen:
                    # Nothing to judge yet: refused, but no evidence to open on.
                    self._peer.wake()
                    raise BreakerOpenError(self.target, self._peer.problem, 1.0)
                self._open(now, self._score_reason(scored))
                raise self._refusal(now)
            return _Ticket(self, self._epoch)
        if self.state is BreakerState.OPEN:
            if scored is None:
                self._peer.wake()
                raise BreakerOpenError(self.target, self._peer.problem, 1.0)
            if now < self._open_until:
                raise self._refusal(now)
            if now > scored.ok_until:
                raise BreakerOpenError(self.target, self._score_reason(scored), 1.0)
            self._move(BreakerState.HALF_OPEN, "cool-down over: one probe call goes through")
        # Half-open: one probe at a time.
        if self._probing:
            raise BreakerOpenError(self.target, "half-open: a probe call is in flight", 1.0)
        if scored is None or now > scored.ok_until:
            self._open(now, self._score_reason(scored))
            raise self._refusal(now)
        self._probing = True
        return _Ticket(self, self._epoch)

    def problem(self) -> str | None:
        """Why calls to the target are refused untried now (readiness): the breaker is open,
        and its cool-down is not over or the peer's score is still too low.  Otherwise the next
        call goes through as a probe."""
        if self.state is not BreakerState.OPEN:
            return None
        score = self.score()
        cooling = self._monotonic() < self._open_until
        if cooling or score is None or score < self._config.min_score:
            return f"circuit breaker to {self.target} open: {self.reason}"
        return None

    def settle(self, epoch: int, error: BaseException | None) -> None:
        """Counts a finished call; calls admitted before the last transition count for nothing."""
        if epoch != self._epoch:
            return
        if error is None and self.state is BreakerState.CLOSED:
            self._window.add(self._monotonic(), False)  # the common case, kept short
            return
        failed = is_failure(error)
        now = self._monotonic()
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False
            if failed is True:
                self._open(now, f"the half-open probe call failed ({_code(error)})")
            elif failed is False:
                self._window.clear()
                self._move(BreakerState.CLOSED, "the half-open probe call succeeded")
            return
        if failed is None or self.state is not BreakerState.CLOSED:
            return
        self._window.add(now, failed)
        if failed:
            self._check_failure_rate(now)

    def _check_failure_rate(self, now: float) -> None:
        scored = self._scored
        near = scored is not None and now >= scored.near_expiry_from
        low_trust = scored is None or scored.low_trust
        calls, failures = self._window.counts(now, short=near)
        config = self._config
        if calls < config.min_calls:
            return
        threshold = config.low_trust_failure_rate if low_trust else config.failure_rate
        if failures / calls >= threshold:
            window = config.near_expiry_window_seconds if near else config.window_seconds
            trust = " (low-trust peer)" if low_trust else ""
            self._open(
                now,
                f"failure rate {failures / calls:.0%} of {calls} calls in the last"
                f" {window:g} s >= {threshold:.0%}{trust}",
            )

    # -- score -----------------------------------------------------------------------------

    def _score(self, now: float) -> _Scored | None:
        certificate = self._peer.certificate
        if certificate is None:
            return None
        levels = self._levels()
        scored = self._scored
        if (
            scored is not None
            and scored.certificate is certificate
            and scored.generation == levels.generation
        ):
            return scored
        scored = self._scored = self._work_out(certificate, levels, now)
        self._seen = True
        return scored

    def _work_out(self, certificate: PeerCertificate, levels: TrustLevels, now: float) -> _Scored:
        config = self._config
        trust = levels.trust(certificate.spiffe_id)
        lifetime = certificate.not_after - certificate.not_before
        # score >= min  <=>  lifetime_left >= needed  <=>  wall time <= not_after - needed * L
        lifetime_weight = 1 - config.trust_weight
        if lifetime_weight > 0:
            needed = (config.min_score - config.trust_weight * trust) / lifetime_weight
        else:
            needed = -math.inf if config.trust_weight * trust >= config.min_score else math.inf
        if needed > 1:
            ok_until_wall = -math.inf
        elif needed <= 0:
            ok_until_wall = math.inf
        else:
            ok_until_wall = certificate.not_after - needed * lifetime
        # Certificates carry wall-clock times; the breaker runs on the monotonic clock.
        offset = now - self._wall()
        return _Scored(
            certificate=certificate,
            generation=levels.generation,
            trust=trust,
            ok_until=ok_until_wall + offset,
            near_expiry_from=certificate.not_after
            - config.near_expiry_fraction * lifetime
            + offset,
            low_trust=trust < config.low_trust_below,
        )

    def score(self) -> float | None:
        """The peer's score now (None: no verified certificate): for metrics and messages."""
        certificate = self._peer.certificate
        if certificate is None:
            return None
        trust = self._levels().trust(certificate.spiffe_id)
        return self._score_of(trust, certificate.lifetime_left(self._wall()))

    def _score_of(self, trust: float, lifetime_left: float) -> float:
        weight = self._config.trust_weight
        return weight * trust + (1 - weight) * lifetime_left

    def _score_reason(self, scored: _Scored | None) -> str:
        if scored is None:
            return self._peer.problem
        left = scored.certificate.lifetime_left(self._wall())
        return (
            f"score {self._score_of(scored.trust, left):.3g} < {self._config.min_score:g}"
            f" (trust {scored.trust:g} of {scored.certificate.spiffe_id},"
            f" {left:.0%} of its certificate's lifetime left)"
        )

    # -- transitions -----------------------------------------------------------------------

    def _refusal(self, now: float) -> BreakerOpenError:
        return BreakerOpenError(self.target, self.reason, max(self._open_until - now, 1.0))

    def _open(self, now: float, reason: str) -> None:
        self._open_until = now + self._config.open_seconds
        self._probing = False
        self._move(BreakerState.OPEN, reason)
        # A peer that fails may have been restarted with another certificate: look again.
        self._peer.wake()

    def _move(self, state: BreakerState, reason: str) -> None:
        before, self.state, self.reason = self.state, state, reason
        self._epoch += 1
        with self._transitions_lock:
            key = (before.value, state.value)
            self.transitions[key] = self.transitions.get(key, 0) + 1
        score = self.score()
        certificate = self._peer.certificate
        # One line per transition, fields as key=value: a lab or an operator greps for them.
        logger.log(
            logging.WARNING if state is BreakerState.OPEN else logging.INFO,
            TRANSITION_PREFIX + "target=%s from=%s to=%s peer=%s score=%s reason=%s",
            self.target,
            before.value,
            state.value,
            certificate.spiffe_id if certificate else "unknown",
            f"{score:.3g}" if score is not None else "none",
            json.dumps(reason),
        )

    def transition_counts(self) -> list[tuple[tuple[str, str], int]]:
        with self._transitions_lock:
            return list(self.transitions.items())

    def close(self) -> None:
        """Stop watching the peer (the service is shutting down); a call after it is judged on
        the last certificate seen."""
        self._peer.close()


def _code(error: BaseException | None) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else "no status"
