"""The failure-rate window of a circuit breaker: calls and failures in one-second buckets over a
long window and a shorter one (used while the peer's certificate is near expiry).

Apart from the breaker because it is the one piece of it that is pure arithmetic on a clock
reading, with its own invariants (each bucket added once and subtracted once).
"""

from __future__ import annotations

import math

BUCKET_SECONDS = 1.0


class SlidingWindow:
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
