"""SQLite persistence: registration entries, the register of issued certificates, revocations
(of certificates and of SPIFFE IDs) and the CRL number counter."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from services.common.identity.spiffe_id import SpiffeId
from services.issuer.domain.entries import Entry, IssuedRecord, Selector
from services.issuer.domain.revocation import RevokedCertificate, RevokedId
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
CREATE TABLE IF NOT EXISTS revoked_certificates (
    serial TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    revoked_at TEXT NOT NULL,
    not_after TEXT NOT NULL,
    ca_serial TEXT
);
CREATE TABLE IF NOT EXISTS revoked_ids (
    spiffe_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    revoked_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""
# Columns added after the first release; existing databases get them on open.
_MIGRATIONS = {("issued", "ca_serial"): "ALTER TABLE issued ADD COLUMN ca_serial TEXT"}
_SELECT_ISSUED = (
    "SELECT serial, spiffe_id, not_after, issued_at, source, entry_id, ca_serial FROM issued"
)
_SELECT_REVOKED = (
    "SELECT serial, spiffe_id, reason, revoked_at, not_after, ca_serial FROM revoked_certificates"
)
_CRL_NUMBER = "crl_number"


def _issued(row: Sequence[str | None]) -> IssuedRecord:
    serial, spiffe_id, not_after, issued_at, source = (str(value) for value in row[:5])
    return IssuedRecord(
        serial=serial,
        spiffe_id=spiffe_id,
        not_after=datetime.fromisoformat(not_after),
        issued_at=datetime.fromisoformat(issued_at),
        source=source,
        entry_id=row[5],
        ca_serial=row[6],
    )


def _revoked(row: Sequence[str | None]) -> RevokedCertificate:
    serial, spiffe_id, reason, revoked_at, not_after = (str(value) for value in row[:5])
    return RevokedCertificate(
        serial=serial,
        spiffe_id=spiffe_id,
        reason=reason,
        revoked_at=datetime.fromisoformat(revoked_at),
        not_after=datetime.fromisoformat(not_after),
        ca_serial=row[5],
    )


class SqliteStore:
    """One connection per call: the issuer writes rarely and must survive crashes mid-write."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            for (table, column), statement in _MIGRATIONS.items():
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in columns:
                    db.execute(statement)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    # -- entries -------------------------------------------------------------------------------

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

    # -- issued certificates -------------------------------------------------------------------

    def record_issued(self, record: IssuedRecord) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO issued"
                " (serial, spiffe_id, not_after, issued_at, source, entry_id, ca_serial)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.serial,
                    record.spiffe_id,
                    record.not_after.isoformat(),
                    record.issued_at.isoformat(),
                    record.source,
                    record.entry_id,
                    record.ca_serial,
                ),
            )

    def issued(self, spiffe_id: str | None = None) -> list[IssuedRecord]:
        with self._connect() as db:
            if spiffe_id is None:
                rows = db.execute(_SELECT_ISSUED + " ORDER BY issued_at").fetchall()
            else:
                rows = db.execute(
                    _SELECT_ISSUED + " WHERE spiffe_id = ? ORDER BY issued_at", (spiffe_id,)
                ).fetchall()
        return [_issued(row) for row in rows]

    def issued_record(self, serial: str) -> IssuedRecord | None:
        with self._connect() as db:
            row = db.execute(_SELECT_ISSUED + " WHERE serial = ?", (serial,)).fetchone()
        return _issued(row) if row else None

    # -- revocation ----------------------------------------------------------------------------

    def add_revocations(
        self, certificates: Sequence[RevokedCertificate], identity: RevokedId | None = None
    ) -> None:
        """Record revoked certificates (and the revoked ID) in one transaction; a serial or ID
        revoked before keeps its first revocation."""
        with self._connect() as db:
            db.executemany(
                "INSERT OR IGNORE INTO revoked_certificates"
                " (serial, spiffe_id, reason, revoked_at, not_after, ca_serial)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        c.serial,
                        c.spiffe_id,
                        c.reason,
                        c.revoked_at.isoformat(),
                        c.not_after.isoformat(),
                        c.ca_serial,
                    )
                    for c in certificates
                ],
            )
            if identity is not None:
                db.execute(
                    "INSERT OR IGNORE INTO revoked_ids VALUES (?, ?, ?)",
                    (identity.spiffe_id, identity.reason, identity.revoked_at.isoformat()),
                )

    def revoked_certificate(self, serial: str) -> RevokedCertificate | None:
        with self._connect() as db:
            row = db.execute(_SELECT_REVOKED + " WHERE serial = ?", (serial,)).fetchone()
        return _revoked(row) if row else None

    def revoked_certificates(
        self, *, ca_serial: str | None = None, unexpired_at: datetime | None = None
    ) -> list[RevokedCertificate]:
        """Revoked certificates, oldest revocation first; with ``ca_serial`` only those that CA
        issued (and those of unknown CA); with ``unexpired_at`` only those still valid then."""
        with self._connect() as db:
            rows = db.execute(_SELECT_REVOKED + " ORDER BY revoked_at, serial").fetchall()
        # Times are compared as datetimes, not as stored text; the table stays small (a few
        # revocations per SVID TTL at most).
        return [
            c
            for c in map(_revoked, rows)
            if (ca_serial is None or c.ca_serial in (None, ca_serial))
            and (unexpired_at is None or c.not_after > unexpired_at)
        ]

    def revoked_ids(self) -> list[RevokedId]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT spiffe_id, reason, revoked_at FROM revoked_ids ORDER BY revoked_at"
            ).fetchall()
        return [RevokedId(row[0], row[1], datetime.fromisoformat(row[2])) for row in rows]

    def remove_revoked_id(self, spiffe_id: str) -> bool:
        with self._connect() as db:
            deleted = db.execute("DELETE FROM revoked_ids WHERE spiffe_id = ?", (spiffe_id,))
            return deleted.rowcount == 1

    def prune_expired(self, expired_before: datetime) -> tuple[int, int]:
        """Forget issued and revoked certificates that expired before ``expired_before``: no
        CRL lists them any more and no peer accepts them.  Returns (issued, revoked) removed."""
        removed = []
        with self._connect() as db:
            for table in ("issued", "revoked_certificates"):
                rows = db.execute(f"SELECT serial, not_after FROM {table}").fetchall()  # noqa: S608
                stale = [
                    (serial,)
                    for serial, not_after in rows
                    if datetime.fromisoformat(not_after) < expired_before
                ]
                db.executemany(f"DELETE FROM {table} WHERE serial = ?", stale)  # noqa: S608
                removed.append(len(stale))
        return removed[0], removed[1]

    def next_crl_number(self) -> int:
        """The next CRL number: strictly greater than every number handed out before, across
        restarts (RFC 5280 5.2.3)."""
        with self._connect() as db:
            db.execute(
                "INSERT INTO counters VALUES (?, 1)"
                " ON CONFLICT (name) DO UPDATE SET value = value + 1",
                (_CRL_NUMBER,),
            )
            row = db.execute("SELECT value FROM counters WHERE name = ?", (_CRL_NUMBER,)).fetchone()
        return int(row[0])
