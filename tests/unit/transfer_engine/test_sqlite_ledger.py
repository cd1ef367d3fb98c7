import asyncio
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from services.transfer_engine.adapters import sqlite_ledger
from services.transfer_engine.adapters.sqlite_ledger import SqliteLedgerRepository
from services.transfer_engine.domain.ledger import Ledger
from services.transfer_engine.domain.model import Transfer, TransferStatus
from services.transfer_engine.errors import LedgerBusyError, LedgerStorageError
from tests.unit.transfer_engine.fakes import FakeClock, FakeRisk
from tests.unit.transfer_engine.support import SEEDED, balances, transfer_request


@pytest.fixture
def repository(ledger_path: Path) -> SqliteLedgerRepository:
    return SqliteLedgerRepository(ledger_path)


@pytest.fixture
def raw(ledger_path: Path, ledger: Ledger) -> Iterator[sqlite3.Connection]:
    """A second connection to the seeded file, as an operator (or a crash) would see it."""
    with closing(sqlite3.connect(ledger_path, isolation_level=None)) as db:
        yield db


def create(ledger: Ledger) -> Transfer:
    return asyncio.run(ledger.create_transfer(transfer_request()))


def count(db: sqlite3.Connection, table: str) -> int:
    (rows,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(rows)


def test_file_is_private_and_in_wal_mode(ledger_path: Path, raw: sqlite3.Connection) -> None:
    assert stat.S_IMODE(ledger_path.parent.stat().st_mode) == 0o700
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_seed_survives_a_restart_unchanged(
    ledger_path: Path, raw: sqlite3.Connection, risk: FakeRisk, clock: FakeClock
) -> None:
    restarted = SqliteLedgerRepository(ledger_path)
    Ledger(repository=restarted, risk=risk, clock=clock).ensure_seeded()
    assert balances(restarted) == SEEDED
    assert count(raw, "postings") == 6
    assert count(raw, "customers") == 2


def test_database_refuses_overdrafts_floats_and_unbalanced_kinds(raw: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("UPDATE accounts SET balance_minor = -1 WHERE id = 'acc-bob-cny'")
    with pytest.raises(sqlite3.IntegrityError, match="cannot store REAL"):
        raw.execute("UPDATE accounts SET balance_minor = 1.5 WHERE id = 'acc-bob-cny'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("INSERT INTO accounts VALUES ('acc-x', NULL, 'CNY', 'x', 'customer', 0)")
    # The bank's equity account is the one that may go (and is) negative.
    raw.execute(
        "UPDATE accounts SET balance_minor = balance_minor - 1 WHERE id = 'acc-bank-equity'"
    )


def test_crash_between_the_two_postings_leaves_nothing(
    ledger: Ledger, repository: SqliteLedgerRepository, raw: sqlite3.Connection
) -> None:
    raw.execute(
        "CREATE TRIGGER crash_on_second_posting BEFORE INSERT ON postings"
        " WHEN (SELECT count(*) FROM postings WHERE transfer_id = NEW.transfer_id) = 1"
        " BEGIN SELECT RAISE(ABORT, 'injected crash'); END"
    )
    with pytest.raises(sqlite3.IntegrityError, match="injected crash"):
        create(ledger)

    assert balances(repository) == SEEDED
    assert count(raw, "postings") == 6
    assert repository.transfer_by_key("alice", "key-1") is None
    raw.execute("DROP TRIGGER crash_on_second_posting")
    assert create(ledger).status is TransferStatus.POSTED


def test_a_writer_that_stays_locked_out_gets_busy(
    ledger: Ledger, raw: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_ledger, "BUSY_TIMEOUT_SECONDS", 0.05)
    raw.execute("BEGIN IMMEDIATE")
    with pytest.raises(LedgerBusyError, match="the ledger is busy"):
        create(ledger)
    assert ledger.account("alice", "acc-alice-cny").balance_minor == 1_000_000  # WAL: reads go on
    raw.execute("ROLLBACK")
    assert create(ledger).status is TransferStatus.POSTED


def post_until_refused(ledger: Ledger) -> tuple[int, LedgerStorageError]:
    """Transfers k0, k1, ... until the ledger refuses one: how many posted, and the refusal."""
    for posted in range(500):  # the free room of the seeded pages runs out on the way
        try:
            asyncio.run(ledger.create_transfer(transfer_request(idempotency_key=f"k{posted}")))
        except LedgerStorageError as error:
            return posted, error
    pytest.fail("the ledger never ran out of room")


def test_a_full_disk_is_unavailable_with_its_cause_and_money_is_not_lost_or_doubled(
    ledger: Ledger,
    repository: SqliteLedgerRepository,
    raw: sqlite3.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SQLite's own limit on the file's size stands for a full disk (SQLITE_FULL, what a full
    filesystem answers too); every connection of the ledger gets it."""
    (pages,) = raw.execute("PRAGMA page_count").fetchone()
    limit = [int(pages)]
    connect = SqliteLedgerRepository._thread_connection

    def limited(self: SqliteLedgerRepository) -> sqlite3.Connection:
        db = connect(self)
        db.execute(f"PRAGMA max_page_count = {limit[0]}")
        return db

    monkeypatch.setattr(SqliteLedgerRepository, "_thread_connection", limited)
    posted, error = post_until_refused(ledger)
    assert str(error) == "the ledger's storage failed: database or disk is full"
    refused = transfer_request(idempotency_key=f"k{posted}")
    assert repository.transfer_by_key("alice", refused.idempotency_key) is None
    moved = posted * refused.amount_minor
    assert balances(repository)["acc-alice-cny"] == SEEDED["acc-alice-cny"] - moved

    limit[0] = 1_000_000  # space is back: the same request posts, once
    again = asyncio.run(ledger.create_transfer(refused))
    assert again.status is TransferStatus.POSTED
    assert asyncio.run(ledger.create_transfer(refused)).id == again.id
    assert (
        balances(repository)["acc-alice-cny"]
        == SEEDED["acc-alice-cny"] - moved - refused.amount_minor
    )
