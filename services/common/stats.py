"""The one percentile of ztbank's reports: nearest rank, so that every p50 and p99 anywhere (the
console, the benchmarks, the load reports) is a value that was really measured, and two reports
of the same samples agree."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(samples: Iterable[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest sample with at least ``fraction`` of all the
    samples at or below it (``fraction`` in (0, 1]; 0.99 is p99).  Raises ValueError without
    samples."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in (0, 1]")
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]
