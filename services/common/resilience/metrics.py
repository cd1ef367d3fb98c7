"""What a breaker shows a metrics scrape: its state, its peer's score and its transitions per
target, read from the breakers at collection time, so a call pays nothing for them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.common.resilience.circuit import STATE_VALUES, CircuitBreaker


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
