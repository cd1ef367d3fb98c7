"""The shared percentile (nearest rank) and the shared polling loop."""

from __future__ import annotations

import itertools
import time

import pytest

from services.common.polling import poll_until
from services.common.stats import percentile


@pytest.mark.parametrize(
    ("samples", "fraction", "expected"),
    [
        ([1.0], 0.99, 1.0),
        ([3.0, 1.0, 2.0], 0.5, 2.0),
        (list(range(1, 101)), 0.99, 99),
        (list(range(1, 101)), 0.50, 50),
        ([10.0, 20.0], 0.99, 20.0),  # a value that was measured, never one in between
    ],
)
def test_the_percentile_is_the_nearest_rank(
    samples: list[float], fraction: float, expected: float
) -> None:
    assert percentile(samples, fraction) == expected


def test_no_samples_or_a_fraction_outside_zero_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="not in"):
        percentile([1.0], 0)


def test_poll_until_returns_the_first_truthy_answer() -> None:
    answers = itertools.chain([None, 0, ""], itertools.repeat("ready"))
    assert poll_until(lambda: next(answers), timeout=2, interval=0.001) == "ready"


def test_poll_until_gives_none_after_the_timeout_and_calls_at_least_once() -> None:
    calls = []
    started = time.monotonic()
    assert poll_until(lambda: calls.append(1), timeout=0.05, interval=0.01) is None
    assert time.monotonic() - started >= 0.05
    assert calls
