"""SQLite persistence for registration entries and the register of issued certificates."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from services.common.identity.spiffe_id import SpiffeId
from services.issuer.domain.entries import Entry, IssuedRecord, Selector
from services.issuer.errors import EntryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    ttl_seconds REAL,
    dns_names TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (spiffe_id, selectors)
);
CREATE TABLE IF NOT EXISTS issued (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    source TEXT NOT NULL,
    entry_id TEXT
);
CREATE INDEX IF NOT EXISTS issued_by_id ON issued (spiffe_id);
"""


class SqliteStore:
    """One connection per call: the issuer writes rarely and must survive crashes mid-write."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    def add_entry(self, entry: Entry) -> None:
        selectors = json.dumps(sorted(str(s) for s in entry.selectors))
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        entry.id,
                        str(entry.spiffe_id),
                        selectors,
                        entry.ttl.total_seconds() if entry.ttl else None,
                        json.dumps(list(entry.dns_names)),
                        entry.created_at.isoformat(),
                    ),
                )
        except sqlite3.IntegrityError:
            raise EntryError(
                f"an entry for {entry.spiffe_id} with the same selectors already exists"
            ) from None

    def delete_entry(self, entry_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount == 1

    def entries(self) -> list[Entry]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id, spiffe_id, selectors, ttl_seconds, dns_names, created_at FROM entries"
                " ORDER BY created_at, id"
            ).fetchall()
        return [
            Entry(
                id=row[0],
                spiffe_id=SpiffeId.parse(row[1]),
                selectors=frozenset(Selector.parse(s) for s in json.loads(row[2])),
                ttl=timedelta(seconds=row[3]) if row[3] is not None else None,
                dns_names=tuple(json.loads(row[4])),
                created_at=datetime.fromisoformat(row[5]),
            )
            for row in rows
        ]

    def record_issued(self, record: IssuedRecord) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO issued VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.serial,
                    record.spiffe_id,
                    record.not_after.isoformat(),
                    record.issued_at.isoformat(),
                    record.source,
                    record.entry_id,
                ),
            )

    def issued(self, spiffe_id: str | None = None) -> list[IssuedRecord]:
        query = "SELECT serial, spiffe_id, not_after, issued_at, source, entry_id FROM issued"
        params: tuple[str, ...] = ()
        if spiffe_id is not None:
            query += " WHERE spiffe_id = ?"
            params = (spiffe_id,)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY issued_at", params).fetchall()
        return [
            IssuedRecord(
                serial=row[0],
                spiffe_id=row[1],
                not_after=datetime.fromisoformat(row[2]),
                issued_at=datetime.fromisoformat(row[3]),
                source=row[4],
                entry_id=row[5],
            )
            for row in rows
        ]
