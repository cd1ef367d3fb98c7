"""Identity-aware circuit breaking of a service's outbound gRPC calls.

Each caller (gateway -> transfer-engine, transfer-engine -> risk) keeps one ``CircuitBreaker``
per target.  Before a call it asks ``admit()``; an open breaker raises ``BreakerOpenError`` at
once, and the adapter answers UNAVAILABLE / 503 without touching the network.

The decision combines three things (docs/breaker.md is the reference):

* the **score** of the peer: ``w * trust + (1 - w) * lifetime_left``, where ``trust`` comes from
  ``infra/trust-levels.json`` (longest SPIFFE ID path prefix, hot-reloaded like the policy) and
  ``lifetime_left`` is the remaining fraction of the lifetime of the certificate the peer served
  at its last verified handshake.  A score under ``min_score`` keeps the breaker open.
* the **failure rate** over a sliding window of one-second buckets: 60 s, or 30 s while the
  peer's certificate is near expiry; the threshold is 50 %, or 5 % for a low-trust peer.
  UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and UNKNOWN count as failures; any other status is
  the callee's answer and counts as a success.
* the **state**: closed -> open (score or failure rate) -> after the cool-down half-open, where
  one probe call goes through: its success closes the breaker, its failure reopens it.

A grpcio client cannot see the certificate the server presented on the channel's own
handshake, so ``PeerWatch`` makes its own short TLS handshake to the target (as ``ztbank
status`` does), verifies the served X509-SVID like a server verifies its callers (chain, rules,
revocation, expected SPIFFE ID), and keeps what it saw.  It handshakes again once the seen
certificate is past the point where the peer should have rotated it.

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
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

import grpc
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from pydantic import Field, model_validator

from services.common.authz.policy import (
    FilePolicySource,
    PolicySource,
    ReloadThrottle,
)
from services.common.errors import CommonError
from services.common.identity.pem import load_der_certificates, serial_hex
from services.common.identity.source import SvidMaterial
from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.contexts import PeerVerifier, client_context
from services.common.settings import ZtbankSettings

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
# Set by a callee on an UNAVAILABLE about one of its own dependencies (the engine when risk is
# unavailable, value "risk"): the callee itself answered, so its callers' breakers count an
# answer, and a risk outage does not also cut the gateway's reads from the engine.
DEPENDENCY_UNAVAILABLE_KEY = "ztbank-dependency-unavailable"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
BUCKET_SECONDS = 1.0
# While no certificate of the peer has been seen, the watcher retries this often.
FIRST_PROBE_RETRY_SECONDS = 0.25
# Between handshakes while waiting for the peer's next certificate: a fiftieth of its lifetime
# (0.4 s for 20 s SVIDs), within these bounds.
PROBE_INTERVAL_BOUNDS = (0.1, 2.0)
PROBE_TIMEOUT_SECONDS = 2.0
# The watcher handshakes again once the seen certificate has less than this fraction of its
# lifetime left: ztbank workloads rotate between 40 % and 50 % of it (issuer ROTATE_FROM/TO).
REFRESH_FRACTION = 0.6


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# The value of the ``breaker.state`` gauge.
STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class TrustTableError(CommonError):
    """The trust-level table is malformed."""


class BreakerOpenError(CommonError):
    """The breaker to ``target`` refuses calls; ``retry_after`` seconds is a fair wait."""

    def __init__(self, target: str, reason: str, retry_after: float) -> None:
        super().__init__(f"circuit breaker to {target} is open: {reason}")
        self.target = target
        self.reason = reason
        self.retry_after = retry_after


# -- trust levels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustLevels:
    """One loaded table.  ``generation`` changes with every table applied."""

    default: float
    # (path prefix segments, trust), longest prefix first.
    prefixes: tuple[tuple[tuple[str, ...], float], ...]
    generation: int

    def trust(self, spiffe_id: SpiffeId) -> float:
        segments = tuple(spiffe_id.path.strip("/").split("/"))
        for prefix, trust in self.prefixes:
            if segments[: len(prefix)] == prefix:
                return trust
        return self.default


def _level(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise TrustTableError(
            f"invalid trust table: {where} must be a number from 0 to 1, got {value!r}"
        )
    return float(value)


def parse_trust_levels(text: str, *, generation: int) -> TrustLevels:
    """``{"default": 0.5, "levels": {"env/prod": 0.95, ...}}``: path prefixes of SPIFFE IDs
    (whole segments, without the trust domain) to a trust from 0 to 1."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise TrustTableError(f"invalid trust table: not JSON: {error}") from None
    if not isinstance(document, dict) or set(document) != {"default", "levels"}:
        raise TrustTableError('invalid trust table: expected {"default": ..., "levels": {...}}')
    levels = document["levels"]
    if not isinstance(levels, dict):
        raise TrustTableError("invalid trust table: levels must be an object")
    prefixes = []
    for prefix, value in levels.items():
        segments = tuple(prefix.split("/"))
        if not prefix or not all(segments) or prefix.startswith("spiffe:"):
            raise TrustTableError(
                f"invalid trust table: {prefix!r} is not a SPIFFE ID path prefix like env/prod"
            )
        prefixes.append((segments, _level(value, f"trust of {prefix!r}")))
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    return TrustLevels(_level(document["default"], "default trust"), tuple(prefixes), generation)


class TrustTable:
    """The trust levels from a ``PolicySource`` (the policy's stamp-and-read file source),
    re-checked at most every ``RELOAD_CHECK_SECONDS`` like the policy.

    Unlike the policy, a bad edit does not deny anything: a malformed table is refused with
    one log line and the previous one stays.  A missing table gives every peer
    ``trust_without_table``.  At start a malformed table raises ``TrustTableError``.
    """

    def __init__(
        self,
        source: Path | PolicySource,
        *,
        trust_without_table: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = FilePolicySource(source) if isinstance(source, Path) else source
        self._without = trust_without_table
        self._throttle = ReloadThrottle(clock, checked=clock())
        self._stamp: object = None
        self._refused: str | None = None
        self._levels = self._missing(0)
        error = self._reload()
        if error is not None:
            raise TrustTableError(f"{self._source.describe()}: {error}")

    def _missing(self, generation: int) -> TrustLevels:
        return TrustLevels(self._without, (), generation)

    def _reload(self) -> str | None:
        """Applies a changed table; returns why a changed one was refused."""
        try:
            stamp = self._source.stamp()
        except FileNotFoundError:
            if self._stamp is not None or self._levels.generation == 0:
                logger.warning(
                    "trust table %s missing: every peer has trust %.2f",
                    self._source.describe(),
                    self._without,
                )
                self._levels = self._missing(self._levels.generation + 1)
                self._stamp = None
            return None
        except OSError as error:
            return f"unreadable: {error}"
        if stamp == self._stamp:
            return None
        # Refused or not, this version is judged once: the next edit changes the stamp.
        self._stamp = stamp
        try:
            levels = parse_trust_levels(self._source.read(), generation=self._levels.generation + 1)
        except (OSError, TrustTableError) as error:
            return str(error)
        self._levels = levels
        logger.info(
            "trust table loaded from %s: %d prefixes, default %.2f",
            self._source.describe(),
            len(levels.prefixes),
            levels.default,
        )
        return None

    def current(self) -> TrustLevels:
        self._throttle.run_if_due(self._look)
        return self._levels

    def _look(self) -> None:
        error = self._reload()
        if error is not None and error != self._refused:
            logger.error(
                "trust table %s refused, keeping the previous one: %s",
                self._source.describe(),
                error,
            )
        self._refused = error


# -- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BreakerConfig:
    trust_weight: float = 0.6  # the lifetime weighs the rest
    min_score: float = 0.75
    window_seconds: float = 60.0
    near_expiry_window_seconds: float = 30.0
    near_expiry_fraction: float = 0.5
    failure_rate: float = 0.5
    low_trust_below: float = 0.8
    low_trust_failure_rate: float = 0.05
    min_calls: int = 10
    open_seconds: float = 10.0


class BreakerSettings(ZtbankSettings):
    """The breaker knobs of a calling service (``ZTBANK_BREAKER_*``, ``ZTBANK_TRUST_LEVELS``)."""

    trust_levels: Path = Path("infra/trust-levels.json")
    # Every peer's trust while the table file does not exist: prod's trust in the shipped table.
    breaker_trust_without_table: float = Field(default=0.95, ge=0, le=1)
    breaker_trust_weight: float = Field(default=0.6, ge=0, le=1)
    breaker_min_score: float = Field(default=0.75, ge=0, le=1)
    breaker_window_seconds: float = Field(default=60.0, ge=BUCKET_SECONDS, le=3600)
    breaker_near_expiry_window_seconds: float = Field(default=30.0, ge=BUCKET_SECONDS)
    breaker_near_expiry_fraction: float = Field(default=0.5, ge=0, le=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_low_trust_below: float = Field(default=0.8, ge=0, le=1)
    breaker_low_trust_failure_rate: float = Field(default=0.05, gt=0, le=1)
    breaker_min_calls: int = Field(default=10, ge=1)
    breaker_open_seconds: float = Field(default=10.0, gt=0, le=600)

    @model_validator(mode="after")
    def _breaker(self) -> BreakerSettings:
        self.trust_levels = self.trust_levels.absolute()
        if self.breaker_near_expiry_window_seconds > self.breaker_window_seconds:
            raise ValueError(
                "ZTBANK_BREAKER_NEAR_EXPIRY_WINDOW_SECONDS must not exceed"
                " ZTBANK_BREAKER_WINDOW_SECONDS"
            )
        return self

    def breaker_config(self) -> BreakerConfig:
        return BreakerConfig(
            trust_weight=self.breaker_trust_weight,
            min_score=self.breaker_min_score,
            window_seconds=self.breaker_window_seconds,
            near_expiry_window_seconds=self.breaker_near_expiry_window_seconds,
            near_expiry_fraction=self.breaker_near_expiry_fraction,
            failure_rate=self.breaker_failure_rate,
            low_trust_below=self.breaker_low_trust_below,
            low_trust_failure_rate=self.breaker_low_trust_failure_rate,
            min_calls=self.breaker_min_calls,
            open_seconds=self.breaker_open_seconds,
        )

    def trust_table(self) -> TrustTable:
        return TrustTable(self.trust_levels, trust_without_table=self.breaker_trust_without_table)


# -- the peer's certificate ------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCertificate:
    """What the peer served at its last verified handshake (times in seconds since the epoch)."""

    spiffe_id: SpiffeId
    serial: str
    not_before: float
    not_after: float

    def lifetime_left(self, now: float) -> float:
        lifetime = self.not_after - self.not_before
        if lifetime <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.not_after - now) / lifetime))


class PeerView(Protocol):
    """The latest verified certificate of the peer, or None with the reason."""

    @property
    def certificate(self) -> PeerCertificate | None: ...

    @property
    def problem(self) -> str: ...

    def wake(self) -> None:
        """Look at the peer again soon (a call found no certificate)."""


class PeerWatch:
    """Handshakes with the target in a thread of its own and keeps the verified certificate.

    A target that cannot be reached keeps its last certificate (which ages: its lifetime left
    falls and the score with it); one that serves a certificate failing verification (revoked,
    another SPIFFE ID, not an X509-SVID of our domain) loses it at once.
    """

    def __init__(
        self,
        *,
        target: Callable[[], str],
        material: Callable[[], SvidMaterial],
        verifier: PeerVerifier,
        expected: SpiffeId,
    ) -> None:
        self._target = target
        self._material = material
        self._verifier = verifier
        self._expected = expected
        self.certificate: PeerCertificate | None = None
        self.problem = f"no verified handshake with {expected} yet"
        self._context: tuple[str, ssl.SSLContext] | None = None
        self._wake = threading.Event()

    def start(self) -> PeerWatch:
        # A daemon: it watches as long as the process lives, and no call waits for it.
        name = f"peer-watch-{self._expected}"
        threading.Thread(target=self._run, name=name, daemon=True).start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self.look()
            self._wake.wait(self._next_look())
            self._wake.clear()

    def _next_look(self) -> float:
        seen = self.certificate
        if seen is None:
            return FIRST_PROBE_RETRY_SECONDS
        lifetime = seen.not_after - seen.not_before
        refresh_at = seen.not_after - REFRESH_FRACTION * lifetime
        low, high = PROBE_INTERVAL_BOUNDS
        return max(refresh_at - time.time(), min(high, max(low, lifetime / 50)))

    def look(self) -> None:
        """One handshake; updates ``certificate`` and ``problem``."""
        target = self._target()
        try:
            der = self._handshake(target)
            peer = self._verifier.verify([der], target)
            if peer.spiffe_id != self._expected:
                raise CommonError(f"it is {peer.spiffe_id}, expected {self._expected}")
        except (ssl.SSLCertVerificationError, CommonError) as error:
            self._lose(f"{target} served a certificate that failed verification: {error}")
            return
        except OSError as error:
            # Unreachable: the last certificate stays and ages (see the class docstring).
            if self.certificate is None:
                self.problem = f"no verified handshake with {self._expected} yet: {error}"
            return
        seen = self.certificate
        if seen is None or seen.serial != peer.serial:
            leaf = load_der_certificates(der)[0]
            self.certificate = PeerCertificate(
                spiffe_id=peer.spiffe_id,
                serial=serial_hex(leaf),
                not_before=leaf.not_valid_before_utc.timestamp(),
                not_after=leaf.not_valid_after_utc.timestamp(),
            )

    def _lose(self, problem: str) -> None:
        if self.certificate is not None or problem != self.problem:
            logger.warning("peer %s: %s", self._expected, problem)
        self.certificate = None
        self.problem = problem

    def _handshake(self, target: str) -> bytes:
        material = self._material()
        if self._context is None or self._context[0] != material.serial:
            self._context = (material.serial, client_context(material, ["h2"]))
        host, _, port = target.rpartition(":")
        with (
            socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_SECONDS) as raw,
            self._context[1].wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        if der is None:
            raise ssl.SSLError("the server sent no certificate")
        return der


# -- the breaker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scored:
    """The score of one certificate under one table, as monotonic deadlines."""

    certificate: PeerCertificate
    generation: int
    trust: float
    ok_until: float  # the score is >= min_score until then
    near_expiry_from: float
    low_trust: bool


class _Window:
    """Calls and failures in one-second buckets, summed over the long and the short window;
    each bucket is added once and subtracted once (O(1) per call, amortized)."""

    def __init__(self, long_seconds: float, short_seconds: float) -> None:
        self._size = math.ceil(long_seconds / BUCKET_SECONDS)
        self._short = math.ceil(short_seconds / BUCKET_SECONDS)
        self._calls = [0] * self._size
        self._failures = [0] * self._size
        self._head: int | None = None
        self.calls = self.failures = self.short_calls = self.short_failures = 0

    def clear(self) -> None:
        self._calls = [0] * self._size
        self._failures = [0] * self._size
        self._head = None
        self.calls = self.failures = self.short_calls = self.short_failures = 0

    def _advance(self, bucket: int) -> None:
        head = self._head
        if head is None or bucket - head >= self._size:
            self.clear()
            self._head = bucket
            return
        calls, failures, size = self._calls, self._failures, self._size
        while head < bucket:
            head += 1
            leaving_short = (head - self._short) % size
            self.short_calls -= calls[leaving_short]
            self.short_failures -= failures[leaving_short]
            slot = head % size
            self.calls -= calls[slot]
            self.failures -= failures[slot]
            calls[slot] = failures[slot] = 0
        self._head = head

    def add(self, now: float, failed: bool) -> None:
        bucket = int(now // BUCKET_SECONDS)
        head = self._head
        if head is None or bucket > head:
            self._advance(bucket)
            head = bucket
        slot = head % self._size
        self._calls[slot] += 1
        self.calls += 1
        self.short_calls += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1
            self.short_failures += 1

    def counts(self, now: float, short: bool) -> tuple[int, int]:
        bucket = int(now // BUCKET_SECONDS)
        if self._head is not None and bucket > self._head:
            self._advance(bucket)
        return (self.short_calls, self.short_failures) if short else (self.calls, self.failures)


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


def pushback_trailer(seconds: int) -> tuple[str, str]:
    """The trailer that tells a caller how long to wait before it retries: gRPC's own server
    pushback (gRFC A6), which a grpc retry policy would also honour."""
    return (RETRY_PUSHBACK_KEY, str(seconds * 1000))


def retry_pushback_seconds(error: grpc.aio.AioRpcError) -> int | None:
    """The callee's pushback in whole seconds (rounded up), if it sent a valid one."""
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                milliseconds = int(str(value))
            except ValueError:
                return None
            return -(-milliseconds // 1000) if milliseconds >= 0 else None
    return None


def unavailable_dependency(error: grpc.aio.AioRpcError) -> str | None:
    """The callee's dependency that an UNAVAILABLE is about, if the callee said so."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == DEPENDENCY_UNAVAILABLE_KEY:
            return str(value)
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
        self._window = _Window(config.window_seconds, config.near_expiry_window_seconds)
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


TRANSITION_PREFIX = "circuit breaker transition "


def parse_transitions(log_text: str) -> list[dict[str, str]]:
    """The transition lines of a service's JSON log (as ``CircuitBreaker._move`` writes them), each
    as its key=value fields with the reason decoded."""
    found = []
    for line in log_text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            message = str(json.loads(line).get("message", ""))
        except ValueError:
            continue  # a line still being written
        if message.startswith(TRANSITION_PREFIX):
            head, _, reason = message.partition(" reason=")
            fields = dict(
                part.split("=", 1) for part in head.removeprefix(TRANSITION_PREFIX).split()
            )
            found.append({**fields, "reason": json.loads(reason)})
    return found


def _code(error: BaseException | None) -> str:
    return error.code().name if isinstance(error, grpc.aio.AioRpcError) else "no status"


# -- metrics ---------------------------------------------------------------------------------


def register_breaker_metrics(meter: Meter, breakers: Sequence[CircuitBreaker]) -> None:
    """``breaker.state`` (0 closed, 1 half-open, 2 open), ``breaker.score`` and
    ``breaker.transitions`` per target, read at collection time like ``authz.decisions``."""

    def observe_state(_: CallbackOptions) -> Iterable[Observation]:
        for breaker in breakers:
            yield Observation(STATE_VALUES[breaker.state], {"target": breaker.target})

    def observe_score(_: CallbackOptions) -> Iterable[Observation]:
        for breaker in breakers:
            score = breaker.score()
            if score is not None:
                yield Observation(score, {"target": breaker.target})

    def observe_transitions(_: CallbackOptions) -> Iterable[Observation]:
        for breaker in breakers:
            for (before, after), count in breaker.transition_counts():
                yield Observation(count, {"target": breaker.target, "from": before, "to": after})

    meter.create_observable_gauge(
        "breaker.state",
        [observe_state],
        description="circuit breaker state per target: 0 closed, 1 half-open, 2 open",
    )
    meter.create_observable_gauge(
        "breaker.score",
        [observe_score],
        description="the target's score: trust weight x trust + the rest x lifetime left",
    )
    meter.create_observable_counter(
        "breaker.transitions",
        [observe_transitions],
        description="circuit breaker state transitions per target",
    )


def watched_breaker(
    target: str,
    expected: SpiffeId,
    *,
    address: Callable[[], str],
    material: Callable[[], SvidMaterial],
    verifier: PeerVerifier,
    table: TrustTable,
    config: BreakerConfig,
    meter: Meter,
) -> CircuitBreaker:
    """The breaker of calls to ``target`` (expected to be ``expected``, found at ``address()``)
    with its metrics and its peer watch, started."""
    watch = PeerWatch(target=address, material=material, verifier=verifier, expected=expected)
    # One look before the service serves: callees start first (risk, the engine, then the
    # gateway), so the first calls have a score.  An unreachable callee is looked at again by
    # the thread.
    watch.look()
    watch.start()
    breaker = CircuitBreaker(target, config, levels=table.current, peer=watch)
    register_breaker_metrics(meter, [breaker])
    return breaker
