import threading

from services.risk.adapters.velocity_memory import InMemoryVelocityHistory
from services.risk.domain.rules import MAX_VELOCITY_TRANSFERS


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_transfers_per_account_within_the_window() -> None:
    clock = FakeClock()
    history = InMemoryVelocityHistory(clock=clock)
    assert [history.record("a", 60) for _ in range(3)] == [1, 2, 3]
    assert history.record("b", 60) == 1
    clock.now += 30
    assert history.record("a", 60) == 4


def test_a_transfer_exactly_one_window_old_has_left_the_window() -> None:
    clock = FakeClock()
    history = InMemoryVelocityHistory(clock=clock)
    history.record("a", 60)
    clock.now += 59.999
    assert history.record("a", 60) == 2
    clock.now += 0.001
    assert history.record("a", 60) == 2  # the first one is exactly 60 s old now
    clock.now += 60
    assert history.record("a", 60) == 1


def test_idle_accounts_are_forgotten() -> None:
    clock = FakeClock()
    history = InMemoryVelocityHistory(clock=clock)
    for account in ("a", "b", "c"):
        history.record(account, 60)
    clock.now += 61
    history.record("d", 60)
    assert history.tracked_accounts() == 1


def test_memory_is_bounded_per_account_and_in_accounts() -> None:
    clock = FakeClock()
    history = InMemoryVelocityHistory(clock=clock, max_accounts=2)
    counts = [history.record("a", 60) for _ in range(MAX_VELOCITY_TRANSFERS + 50)]
    assert counts[-1] == MAX_VELOCITY_TRANSFERS + 1  # still "more than any allowed maximum"
    history.record("b", 60)
    history.record("c", 60)
    assert history.tracked_accounts() == 2
    assert history.record("a", 60) == 1  # the least recently active account was forgotten


def test_concurrent_records_are_all_counted() -> None:
    history = InMemoryVelocityHistory()
    threads = [
        threading.Thread(target=lambda: [history.record("a", 60) for _ in range(100)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert history.record("a", 60) == 801
