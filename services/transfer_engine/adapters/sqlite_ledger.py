"""The double-entry ledger in SQLite: balances and their postings change in one transaction."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path

from services.common.files import ensure_private_dir
from services.common.risk_decision import RiskDecision
from services.transfer_engine.domain.model import (
    Account,
    AccountKind,
    Assessment,
    RejectionReason,
    Transaction,
    Transfer,
    TransferStatus,
)
from services.transfer_engine.errors import LedgerBusyError, LedgerStorageError

# Writers queue behind BEGIN IMMEDIATE for at most this long before the caller sees UNAVAILABLE.
BUSY_TIMEOUT_SECONDS = 10.0
# SQLite's answers when the storage itself fails: the client is told UNAVAILABLE with the cause.
STORAGE_FAILURES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY}
)

# STRICT: a float (or text) amount is refused by the database itself, not only by the code.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id TEXT PRIMARY KEY
) STRICT;
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    customer TEXT REFERENCES customers (id),
    currency TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('customer', 'internal')),
    balance_minor INTEGER NOT NULL,
    CHECK (kind = 'internal' OR balance_minor >= 0),
    CHECK ((kind = 'customer') = (customer IS NOT NULL))
) STRICT;
CREATE INDEX IF NOT EXISTS accounts_by_customer ON accounts (customer);
CREATE TABLE IF NOT EXISTS transfers (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL REFERENCES customers (id),
    idempotency_key TEXT,
    request_fingerprint TEXT,
    from_account TEXT NOT NULL REFERENCES accounts (id),
    to_account TEXT NOT NULL REFERENCES accounts (id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('posted', 'review', 'rejected')),
    risk_decision TEXT CHECK (risk_decision IN ('allow', 'review', 'deny')),
    risk_reasons TEXT,
    risk_score INTEGER,
    rejection_reason TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (customer, idempotency_key)
) STRICT;
CREATE TABLE IF NOT EXISTS postings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    transfer_id TEXT NOT NULL REFERENCES transfers (id),
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor != 0),
    balance_after_minor INTEGER NOT NULL,
    created_at TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS postings_by_account ON postings (account_id, created_at);
CREATE INDEX IF NOT EXISTS postings_by_transfer ON postings (transfer_id);
"""

_ACCOUNT_COLUMNS = "id, customer, currency, name, kind, balance_minor"
_TRANSFER_COLUMNS = (
    "id, customer, from_account, to_account, amount_minor, currency, status, created_at,"
    " idempotency_key, request_fingerprint, risk_decision, risk_reasons, risk_score,"
    " rejection_reason"
)
_TRANSACTIONS = """
SELECT p.transfer_id, p.account_id, p.amount_minor, a.currency, other.account_id,
       p.balance_after_minor, p.created_at
FROM postings p
JOIN accounts a ON a.id = p.account_id
JOIN postings other ON other.transfer_id = p.transfer_id AND other.id != p.id
WHERE p.account_id = ? AND p.created_at >= ?
ORDER BY p.created_at DESC, p.id DESC
"""


def _timestamp(at: datetime) -> str:
    # One fixed UTC format, so that text order is time order and a date prefix filters by day.
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _account(row: sqlite3.Row) -> Account:
    return Account(
        id=row["id"],
        customer=row["customer"],
        currency=row["currency"],
        name=row["name"],
        kind=AccountKind(row["kind"]),
        balance_minor=row["balance_minor"],
    )


def _transfer(row: sqlite3.Row) -> Transfer:
    decision = row["risk_decision"]
    reason = row["rejection_reason"]
    return Transfer(
        id=row["id"],
        customer=row["customer"],
        from_account=row["from_account"],
        to_account=row["to_account"],
        amount_minor=row["amount_minor"],
        currency=row["currency"],
        status=TransferStatus(row["status"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        idempotency_key=row["idempotency_key"],
        request_fingerprint=row["request_fingerprint"],
        assessment=None
        if decision is None
        else Assessment(
            decision=RiskDecision(decision),
            reasons=tuple(json.loads(row["risk_reasons"])),
            score=row["risk_score"],
        ),
        rejection_reason=None if reason is None else RejectionReason(reason),
    )


def _transfer_by_key(db: sqlite3.Connection, customer: str, key: str) -> Transfer | None:
    row = db.execute(
        f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE customer = ? AND idempotency_key = ?",  # noqa: S608 - constant column list
        (customer, key),
    ).fetchone()
    return None if row is None else _transfer(row)


def _account_by_id(db: sqlite3.Connection, account_id: str) -> Account | None:
    row = db.execute(
        f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE id = ?",  # noqa: S608 - constant column list
        (account_id,),
    ).fetchone()
    return None if row is None else _account(row)


class SqliteLedgerWrite:
    """The ``LedgerWrite`` of one open BEGIN IMMEDIATE transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def account(self, account_id: str) -> Account | None:
        return _account_by_id(self._db, account_id)

    def balance(self, account_id: str) -> int:
        (balance,) = self._db.execute(
            "SELECT balance_minor FROM accounts WHERE id = ?", (account_id,)
        ).fetchone()
        return int(balance)

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None:
        return _transfer_by_key(self._db, customer, idempotency_key)

    def open_account(
        self, account_id: str, *, customer: str | None, currency: str, name: str, kind: AccountKind
    ) -> None:
        if customer is not None:
            self._db.execute("INSERT OR IGNORE INTO customers (id) VALUES (?)", (customer,))
        self._db.execute(
            f"INSERT INTO accounts ({_ACCOUNT_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0)",  # noqa: S608 - constant column list
            (account_id, customer, currency, name, kind.value),
        )

    def add_transfer(self, transfer: Transfer) -> None:
        risk = transfer.assessment
        self._db.execute(
            f"INSERT INTO transfers ({_TRANSFER_COLUMNS})"  # noqa: S608 - constant column list
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                transfer.id,
                transfer.customer,
                transfer.from_account,
                transfer.to_account,
                transfer.amount_minor,
                transfer.currency,
                transfer.status.value,
                _timestamp(transfer.created_at),
                transfer.idempotency_key,
                transfer.request_fingerprint,
                None if risk is None else risk.decision.value,
                None if risk is None else json.dumps(list(risk.reasons)),
                None if risk is None else risk.score,
                None if transfer.rejection_reason is None else transfer.rejection_reason.value,
            ),
        )
        if transfer.status is TransferStatus.POSTED:
            self._post(transfer, transfer.from_account, -transfer.amount_minor)
            self._post(transfer, transfer.to_account, transfer.amount_minor)

    def _post(self, transfer: Transfer, account_id: str, amount_minor: int) -> None:
        # The CHECK on customer balances makes an overdraft abort the whole transaction even if
        # the caller's funds check were ever wrong.
        [(balance_after,)] = self._db.execute(
            "UPDATE accounts SET balance_minor = balance_minor + ? WHERE id = ?"
            " RETURNING balance_minor",
            (amount_minor, account_id),
        ).fetchall()
        self._db.execute(
            "INSERT INTO postings"
            " (transfer_id, account_id, amount_minor, balance_after_minor, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (transfer.id, account_id, amount_minor, balance_after, _timestamp(transfer.created_at)),
        )


class SqliteLedgerRepository:
    """Any thread may use it. Each thread keeps one connection (opening one per call cost more
    than the query); writers of this process take turns on a lock before ``BEGIN IMMEDIATE``,
    so they queue in order instead of polling SQLite's busy handler, whose sleeps grow to tens
    of milliseconds under contention. Other processes on the same file still meet that handler.
    """

    def __init__(self, path: Path) -> None:
        ensure_private_dir(path.parent)
        self._path = path
        self._local = threading.local()
        self._write_turn = threading.Lock()
        with self._connection() as db:
            # WAL belongs to the file, not the connection: set once, readers never block writers.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _thread_connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued below.
            db = sqlite3.connect(
                self._path,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=True,
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._thread_connection()
        except sqlite3.OperationalError as error:
            code = error.sqlite_errorcode & 0xFF
            if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise LedgerBusyError("the ledger is busy; retry later") from error
            if code in STORAGE_FAILURES:
                # SQLite rolled the transaction back: nothing was stored, a retry is safe.
                raise LedgerStorageError(f"the ledger's storage failed: {error}") from error
            raise

    @contextmanager
    def write(self) -> Iterator[SqliteLedgerWrite]:
        with self._write_turn, self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield SqliteLedgerWrite(db)
            except BaseException:
                # SQLite has already rolled back by itself after some errors (disk full, I/O).
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def account(self, account_id: str) -> Account | None:
        with self._connection() as db:
            return _account_by_id(db, account_id)

    def accounts_of(self, customer: str) -> list[Account]:
        with self._connection() as db:
            rows = db.execute(
                f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE customer = ? ORDER BY id",  # noqa: S608 - constant column list
                (customer,),
            ).fetchall()
        return [_account(row) for row in rows]

    def transfer(self, transfer_id: str) -> Transfer | None:
        with self._connection() as db:
            row = db.execute(
                f"SELECT {_TRANSFER_COLUMNS} FROM transfers WHERE id = ?",  # noqa: S608 - constant column list
                (transfer_id,),
            ).fetchone()
        return None if row is None else _transfer(row)

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None:
        with self._connection() as db:
            return _transfer_by_key(db, customer, idempotency_key)

    def transactions(self, account_id: str, *, since: date | None) -> list[Transaction]:
        # Every stored timestamp of the day ``since`` sorts at or after its bare date.
        lower_bound = "" if since is None else since.isoformat()
        with self._connection() as db:
            rows = db.execute(_TRANSACTIONS, (account_id, lower_bound)).fetchall()
        return [
            Transaction(
                transfer_id=row[0],
                account_id=row[1],
                amount_minor=row[2],
                currency=row[3],
                counterparty_account=row[4],
                balance_after_minor=row[5],
                created_at=datetime.fromisoformat(row[6]),
            )
            for row in rows
        ]
