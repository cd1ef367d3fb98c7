"""The background-worker base: rounds on an interval, woken early, closed and joined once."""

from __future__ import annotations

import threading
import time

import pytest

from services.common.runtime.worker import Worker


class Counting(Worker):
    def __init__(
        self, interval: float, *, fail_first: bool = False, wait_first: bool = False
    ) -> None:
        super().__init__("counting", join_timeout=2.0, wait_first=wait_first)
        self.rounds = 0
        self.seen = threading.Event()
        self._interval = interval
        self._fail_first = fail_first

    def run_once(self) -> None:
        self.rounds += 1
        self.seen.set()
        if self._fail_first and self.rounds == 1:
            raise RuntimeError("a surprise")

    def interval(self) -> float:
        return self._interval


def wait_for_rounds(worker: Counting, rounds: int, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.rounds < rounds:
        assert time.monotonic() < deadline, f"only {worker.rounds} round(s)"
        time.sleep(0.01)


def test_a_worker_runs_at_once_then_when_woken_not_before_its_interval() -> None:
    worker = Counting(interval=60).start()
    try:
        wait_for_rounds(worker, 1)
        time.sleep(0.1)
        assert worker.rounds == 1  # the next round is a minute away
        worker.wake()
        wait_for_rounds(worker, 2)
    finally:
        worker.close()


def test_close_joins_the_thread_and_a_closed_worker_does_not_start_again() -> None:
    worker = Counting(interval=60).start()
    wait_for_rounds(worker, 1)
    worker.close()
    assert worker.closed
    assert not any(t.name == "counting" for t in threading.enumerate())
    worker.start()
    time.sleep(0.05)
    assert worker.rounds == 1
    worker.close()  # idempotent


def test_start_twice_runs_one_thread() -> None:
    worker = Counting(interval=60)
    worker.start()
    worker.start()
    try:
        wait_for_rounds(worker, 1)
        assert sum(t.name == "counting" for t in threading.enumerate()) == 1
    finally:
        worker.close()


def test_a_failing_round_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Counting(interval=0.01, fail_first=True).start()
    try:
        wait_for_rounds(worker, 3)
    finally:
        worker.close()
    assert "counting: a round failed" in caplog.text


def test_a_worker_that_waits_first_runs_its_first_round_one_interval_after_start() -> None:
    worker = Counting(interval=0.3, wait_first=True)
    started = time.monotonic()
    worker.start()
    try:
        time.sleep(0.1)
        assert worker.rounds == 0  # its owner did the first round's work already
        wait_for_rounds(worker, 1)
        assert time.monotonic() - started >= 0.3
    finally:
        worker.close()


def test_closing_a_worker_that_waits_first_ends_it_without_a_round() -> None:
    worker = Counting(interval=60, wait_first=True).start()
    worker.close()
    assert not any(t.name == "counting" for t in threading.enumerate())
    assert worker.rounds == 0
