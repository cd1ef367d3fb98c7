import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from services.risk.adapters.velocity_sqlite import SqliteVelocityHistory
from services.risk.domain.rules import MAX_VELOCITY_TRANSFERS, MAX_VELOCITY_WINDOW_SECONDS
from services.risk.errors import RiskError, VelocityStorageError, VelocityStoreError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "risk" / "velocity.db"


@pytest.fixture
def history(path: Path, clock: FakeClock) -> SqliteVelocityHistory:
    return SqliteVelocityHistory(path, clock=clock)


def test_counts_transfers_per_account_within_the_window(
    history: SqliteVelocityHistory, clock: FakeClock
) -> None:
    assert [history.record("a", 60) for _ in range(3)] == [1, 2, 3]
    assert history.record("b", 60) == 1
    clock.now += 30
    assert history.record("a", 60) == 4


def test_a_transfer_exactly_one_window_old_has_left_the_window(
    history: SqliteVelocityHistory, clock: FakeClock
) -> None:
    history.record("a", 60)
    clock.now += 59.5
    assert history.record("a", 60) == 2
    clock.now += 0.5
    assert history.record("a", 60) == 2  # the first one is exactly 60 s old now
    clock.now += 60
    assert history.record("a", 60) == 1


def test_counts_survive_a_restart(path: Path, clock: FakeClock) -> None:
    before = SqliteVelocityHistory(path, clock=clock)
    for _ in range(4):
        before.record("a", 60)
    before.close()
    clock.now += 10
    after = SqliteVelocityHistory(path, clock=clock)
    assert after.record("a", 60) == 5


def test_a_wider_window_after_a_rules_reload_sees_older_transfers(
    history: SqliteVelocityHistory, clock: FakeClock
) -> None:
    history.record("a", 60)
    clock.now += 120
    assert history.record("a", 60) == 1
    assert history.record("a", 600) == 3  # nothing was dropped at the 60 s window


def test_storage_is_bounded_per_account_and_in_time(path: Path, clock: FakeClock) -> None:
    history = SqliteVelocityHistory(path, clock=clock, sweep_every=10)
    counts = [history.record("a", 60) for _ in range(MAX_VELOCITY_TRANSFERS + 50)]
    assert counts[-1] == MAX_VELOCITY_TRANSFERS + 1  # still "more than any allowed maximum"
    for account in ("b", "c"):
        history.record(account, 60)
    assert history.tracked_accounts() == 3
    clock.now += MAX_VELOCITY_WINDOW_SECONDS + 1
    for _ in range(10):  # the next sweep forgets whatever is older than the longest window
        history.record("d", 60)
    assert history.tracked_accounts() == 1
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM velocity_events").fetchone() == (10,)


def test_concurrent_records_are_all_counted(history: SqliteVelocityHistory) -> None:
    threads = [
        threading.Thread(target=lambda: [history.record("a", 60) for _ in range(100)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert history.record("a", 60) == 801


def test_the_file_is_private(history: SqliteVelocityHistory, path: Path) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_unusable_file_is_a_clear_error(tmp_path: Path) -> None:
    not_a_database = tmp_path / "velocity.db"
    not_a_database.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(VelocityStoreError, match=r"velocity history at .*velocity\.db"):
        SqliteVelocityHistory(not_a_database)


def record_until_refused(history: SqliteVelocityHistory) -> tuple[int, VelocityStorageError]:
    """Transfers from new accounts (each a new row) until the store refuses one."""
    for made in range(5000):
        try:
            history.record(f"acct-{made}", 60)
        except VelocityStorageError as error:
            return made, error
    pytest.fail("the velocity history never ran out of room")


def test_a_full_disk_is_a_storage_error_with_its_cause_and_counts_stay_exact(
    history: SqliteVelocityHistory,
) -> None:
    """SQLite's own limit on the file's size stands for a full disk: SQLITE_FULL, what a full
    filesystem answers too (tests/e2e/test_disk_full.py fills a real one)."""
    assert [history.record("a", 60) for _ in range(2)] == [1, 2]
    (pages,) = history._db.execute("PRAGMA page_count").fetchone()
    history._db.execute(f"PRAGMA max_page_count = {pages}")

    made, error = record_until_refused(history)

    assert str(error) == "risk store not writable: database or disk is full"
    assert isinstance(error, VelocityStoreError)
    assert isinstance(error, RiskError)
    assert not history._db.in_transaction  # the next assessment starts afresh
    with pytest.raises(VelocityStorageError, match="database or disk is full"):
        history.record(f"acct-{made}", 60)  # a retry while the disk is full is refused too
    history._db.execute("PRAGMA max_page_count = 1000000")  # space is back, no restart
    # Neither refused transfer was counted: each counts once when it is assessed again.
    assert history.record(f"acct-{made}", 60) == 1
    assert history.record("a", 60) == 3
    assert history.tracked_accounts() == made + 2


def test_a_store_that_cannot_be_opened_is_a_storage_error_naming_the_file(
    tmp_path: Path,
) -> None:
    in_the_way = tmp_path / "velocity.db"
    in_the_way.mkdir()  # SQLITE_CANTOPEN, as for a file on a filesystem gone read-only
    with pytest.raises(VelocityStorageError) as caught:
        SqliteVelocityHistory(in_the_way)
    assert (
        str(caught.value) == f"risk store not writable: unable to open database file ({in_the_way})"
    )
