"""Append-only JSON-lines audit of every authorization decision.

One writer thread per log appends whole lines on an ``O_APPEND`` descriptor and, with ``fsync``
(on by default), syncs them before anyone is told they are written: ``record`` returns, and the
future of ``submit`` completes, only once the record is on disk. Records that arrive while a
sync runs are written and synced together by the next one (group commit), so the cost of a sync
is shared by every request waiting for it, and no allowed request's record can be lost in a crash
after its caller went on.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from urllib.parse import unquote

from services.common.errors import CommonError

AUDIT_MODE = 0o640
# A readiness probe after a failed write needs room for a few records, not just one byte.
_PROBE_BYTES = 4096


@dataclass(frozen=True)
class AuditRecord:
    caller_spiffe_id: str | None
    cert_serial: str | None
    cert_sha256: str | None
    source_addr: str
    source_port: int | None
    dest_addr: str
    dest_port: int | None
    tls_version: str | None
    cipher: str | None
    service: str
    method: str
    decision: str  # allow | deny
    reason: str
    trace_id: str | None
    # The encrypted-traffic audit fields of JR/T 0194-2020 (README: "Audit records").
    event: str = "authz"  # tls_handshake | authz
    cipher_code: str | None = None  # IANA code of ``cipher``, e.g. 0x1301
    sni: str | None = None  # server name the client asked for
    alpn: str | None = None  # application protocol agreed in the handshake
    session_id: str | None = None  # the TLS connection's ID, the same in all its records
    cert_subject: str | None = None  # client certificate subject DN (RFC 4514)
    handshake: str | None = None  # success | fail; None off TLS


_FIELD_NAMES = tuple(field.name for field in fields(AuditRecord))


class AuditClosedError(RuntimeError):
    """A record was submitted to a closed audit log: it is not written."""


class AuditWriteError(CommonError):
    """The audit log could not take a record (a full disk, say): the request it was for is
    refused, and the file holds only whole records (the partial write was taken back)."""


_FIELD_PREFIXES = tuple((f',"{name}":', name) for name in _FIELD_NAMES)


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is str:
        return encode_basestring_ascii(value)
    if type(value) is int:
        return str(value)
    return json.dumps(value)


def _line(at: float, record: AuditRecord) -> bytes:
    """The record as one JSON line, what ``json.dumps`` would write (same escaping), built by
    hand: the writer formats every record, and a dict through ``json.dumps`` cost 2.5 times as
    much."""
    parts = ['{"time":"', datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"), '"']
    for prefix, name in _FIELD_PREFIXES:
        parts.append(prefix)
        parts.append(_json_value(getattr(record, name)))
    parts.append("}\n")
    return "".join(parts).encode()


def _cause(error: OSError) -> str:
    """``No space left on device`` -> ``no space left on device``."""
    text = error.strerror or str(error)
    return text[:1].lower() + text[1:]


def _uncancellable() -> Future[None]:
    # Running futures refuse cancel(): a waiter that gives up (asyncio.wrap_future passes its
    # cancellation on) must not cancel what other waiters of the same sync wait for.
    done: Future[None] = Future()
    done.set_running_or_notify_cancel()
    return done


class AuditLog:
    """One audit file and its writer thread.

    The writer is deliberately not a ``runtime.worker.Worker``: it is driven by its queue, not
    an interval, and its ``close`` promises more than a Worker's.  A Worker stops after its
    current round, leaving what was queued meanwhile unwritten, and gives up joining after
    ``join_timeout``; here ``close`` refuses new records under the lock the writer takes its
    batches under, lets the writer drain and sync everything accepted, and joins it without a
    timeout before closing the descriptor.  Closing it under a writer still in ``write`` or
    ``fsync`` would fail records already accepted, or send them to whatever file reuses the
    descriptor's number.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, AUDIT_MODE)
        self._fsync = fsync
        self._wake = threading.Condition()
        # The records of the next group commit, and the one future they all complete with.
        self._pending: list[tuple[float, AuditRecord]] = []
        self._pending_written = _uncancellable()
        self._closed = False
        # The cause of the last failed write, until a write (or a probe) succeeds again.
        self._failure: str | None = None
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def submit(self, record: AuditRecord) -> Future[None]:
        """Queue ``record``; the future completes once it is written (and synced).  Records of
        one group commit share their future: one completion per sync, not one per record."""
        # Stamped now, formatted by the writer: the caller's share of a decision stays small.
        with self._wake:
            if self._closed:
                raise AuditClosedError(f"audit log {self.path} is closed")
            self._pending.append((time.time(), record))
            self._wake.notify()
            return self._pending_written

    def record(self, record: AuditRecord) -> None:
        """Write ``record``; returns once it is on disk, raises if it could not be written."""
        self.submit(record).result()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                batch, written = self._pending, self._pending_written
                if not batch:
                    return
                self._pending, self._pending_written = [], _uncancellable()
            try:
                self._append(b"".join(_line(at, record) for at, record in batch))
            except AuditWriteError as error:
                self._failure = str(error)
                written.set_exception(error)
            else:
                self._failure = None
                written.set_result(None)

    def _append(self, data: bytes) -> None:
        """Append whole lines, or nothing: a write that fails half-way (no space left) is cut
        back to the last complete record, so every line of the file always parses and the
        next record does not land on the end of a torn one."""
        end = os.fstat(self._fd).st_size
        try:
            left = memoryview(data)
            while left:
                left = left[os.write(self._fd, left) :]
            if self._fsync:
                os.fsync(self._fd)
        except OSError as error:
            cause = f"audit log not writable: {_cause(error)}"
            try:
                os.ftruncate(self._fd, end)
            except OSError as undo_error:
                # Stays torn until the next write manages; said, not hidden.
                cause += f"; its partial last record stays: {_cause(undo_error)}"
            raise AuditWriteError(cause) from error

    def problem(self) -> str | None:
        """Why records cannot be written now (readiness), None when they can.

        After a failed write, a readiness probe writes a scratch block beside the log: a service
        that is not ready gets no requests, so without it no record would ever show that the
        space came back."""
        failure = self._failure
        if failure is None:
            return None
        scratch = self.path.with_name(f".{self.path.name}.probe")
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, AUDIT_MODE)
            try:
                os.write(fd, bytes(_PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
                scratch.unlink(missing_ok=True)
        except OSError:
            return failure
        self._failure = None
        return None

    def close(self) -> None:
        """Write what was submitted, then close; later submissions are refused."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._writer.join()
        os.close(self._fd)


def split_address(address: str) -> tuple[str, int | None]:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' / '127.0.0.1:5000' -> (host, port)."""
    for prefix in ("ipv4:", "ipv6:"):
        address = address.removeprefix(prefix)
    # grpcio percent-encodes the brackets of IPv6 peers.
    address = unquote(address)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return address, None
    return host.strip("[]"), int(port)
