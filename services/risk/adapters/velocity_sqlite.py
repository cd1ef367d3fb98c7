"""Velocity history in SQLite under the risk service's state directory: counts survive a restart.

One row per assessed transfer (account, wall-clock time).  ``record`` inserts the transfer,
trims the account to its newest MAX_VELOCITY_TRANSFERS + 1 rows (enough to tell "more than the
maximum" apart) and counts the rows inside the window, in one transaction.  Rows are kept for
MAX_VELOCITY_WINDOW_SECONDS, not for the current window, so that a rules reload that widens the
window sees the transfers already made.  Idle accounts are swept every SWEEP_EVERY records.

Wall-clock time, because a monotonic clock starts again with the process.  A clock stepped back
makes the window look fuller (stricter); one stepped forward ages the history early.

When the storage fails (a full disk, an I/O error, a read-only or vanished file) SQLite rolls the
transaction back and ``record`` raises ``VelocityStorageError`` naming the cause: the transfer is
not counted, so assessing it again once the storage is fixed counts it once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.common.files import ensure_private_dir
from services.risk.domain.rules import MAX_VELOCITY_TRANSFERS, MAX_VELOCITY_WINDOW_SECONDS
from services.risk.errors import VelocityStorageError, VelocityStoreError

SWEEP_EVERY = 1000
BUSY_TIMEOUT_SECONDS = 5.0
# SQLite's answers when the storage itself fails, as the transfer-engine's ledger tells them
# apart: the caller is told UNAVAILABLE with the cause.
STORAGE_FAILURES = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY}
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS velocity_events (
    account TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS velocity_events_by_account ON velocity_events (account, at);
"""


def store_error(error: sqlite3.Error, path: Path | None = None) -> VelocityStoreError:
    """The risk error for a SQLite error: ``VelocityStorageError`` ("risk store not writable:
    database or disk is full") when the storage failed, else ``VelocityStoreError``.  Errors of
    a running service go to its caller, so only those at startup name the file."""
    # Extended codes (SQLITE_IOERR_WRITE, SQLITE_READONLY_DBMOVED) keep the primary code in the
    # low byte; errors of the sqlite3 module itself (a closed connection) carry no code.
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in STORAGE_FAILURES:
        where = f" ({path})" if path else ""
        return VelocityStorageError(f"risk store not writable: {error}{where}")
    return VelocityStoreError(f"velocity history{f' at {path}' if path else ''}: {error}")


class SqliteVelocityHistory:
    """Thread-safe: one connection, used under a lock (assessments take well under 1 ms)."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        sweep_every: int = SWEEP_EVERY,
    ) -> None:
        ensure_private_dir(path.parent)
        self._clock = clock
        self._sweep_every = sweep_every
        self._lock = threading.Lock()
        self._since_sweep = 0
        try:
            self._db = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # A power cut may lose the last few counts (never the ledger): NORMAL skips the
            # fsync per transaction that FULL would add to every assessment.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise store_error(error, path) from None
        path.chmod(0o600)

    def record(self, account: str, window_seconds: float) -> int:
        """Raises VelocityStorageError when the storage fails (nothing is recorded then), and
        VelocityStoreError on any other SQLite error."""
        with self._lock:
            now = self._clock()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    count = self._record(account, now, now - window_seconds)
                    # In WAL mode the pages reach the disk here: a full disk fails the COMMIT.
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite has already rolled back by itself after some errors (disk full,
                    # I/O); a ROLLBACK that fails too must not hide the first error.
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as error:
                raise store_error(error) from None
            return count

    def _record(self, account: str, now: float, horizon: float) -> int:
        db = self._db
        db.execute("INSERT INTO velocity_events (account, at) VALUES (?, ?)", (account, now))
        db.execute(
            "DELETE FROM velocity_events WHERE account = ? AND rowid NOT IN"
            " (SELECT rowid FROM velocity_events WHERE account = ? ORDER BY at DESC LIMIT ?)",
            (account, account, MAX_VELOCITY_TRANSFERS + 1),
        )
        self._since_sweep += 1
        if self._since_sweep >= self._sweep_every:
            self._since_sweep = 0
            db.execute(
                "DELETE FROM velocity_events WHERE at <= ?", (now - MAX_VELOCITY_WINDOW_SECONDS,)
            )
        (count,) = db.execute(
            "SELECT COUNT(*) FROM velocity_events WHERE account = ? AND at > ?", (account, horizon)
        ).fetchone()
        return int(count)

    def tracked_accounts(self) -> int:
        with self._lock:
            try:
                (count,) = self._db.execute(
                    "SELECT COUNT(DISTINCT account) FROM velocity_events"
                ).fetchone()
            except sqlite3.Error as error:
                raise store_error(error) from None
            return int(count)

    def close(self) -> None:
        with self._lock:
            self._db.close()
