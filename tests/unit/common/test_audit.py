"""The JSON-lines audit log: complete records, whole lines under concurrency, append-only."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import asdict, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.common.authz.audit import (
    AUDIT_MODE,
    AuditClosedError,
    AuditLog,
    AuditRecord,
    AuditWriteError,
    split_address,
)

RECORD = AuditRecord(
    caller_spiffe_id="spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/gateway",
    cert_serial="1a2b3c",
    cert_sha256="ab" * 32,
    source_addr="127.0.0.1",
    source_port=50123,
    dest_addr="127.0.0.1",
    dest_port=7443,
    tls_version="TLSv1.3",
    cipher="TLS_AES_256_GCM_SHA384",
    service="transfer-engine",
    method="/ztbank.ledger.v1.TransferEngine/CreateTransfer",
    decision="allow",
    reason="allowed by policy rule for transfer-engine",
    trace_id="0" * 31 + "1",
)
FIELD_NAMES = {"time", *(f.name for f in fields(AuditRecord))}


def read_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit" / "svc.jsonl", fsync=False)
    yield log
    log.close()


def test_record_is_one_json_line_with_every_field(audit: AuditLog) -> None:
    before = datetime.now(UTC)
    audit.record(RECORD)
    after = datetime.now(UTC)

    [line] = read_lines(audit.path)
    assert set(line) == FIELD_NAMES
    assert {k: v for k, v in line.items() if k != "time"} == asdict(RECORD)
    stamp = datetime.fromisoformat(line["time"])
    assert stamp.utcoffset() == timedelta(0)
    assert len(line["time"].split("T")[1].split("+")[0].split(".")[1]) == 3  # milliseconds
    assert before - timedelta(milliseconds=1) <= stamp <= after


def test_a_denial_without_peer_keeps_nulls(audit: AuditLog) -> None:
    denial = replace(
        RECORD,
        caller_spiffe_id=None,
        cert_serial=None,
        cert_sha256=None,
        source_port=None,
        tls_version=None,
        cipher=None,
        decision="deny",
        reason='no client certificate\n{"decision": "allow"}',
        trace_id=None,
    )
    audit.record(denial)
    [line] = read_lines(audit.path)
    assert line["decision"] == "deny"
    assert line["caller_spiffe_id"] is None
    assert line["reason"] == denial.reason  # a newline in a field cannot forge a line


def test_records_keep_their_order(audit: AuditLog) -> None:
    for index in range(5):
        audit.record(replace(RECORD, method=f"m{index}"))
    assert [line["method"] for line in read_lines(audit.path)] == [f"m{i}" for i in range(5)]


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    logs = [AuditLog(path, fsync=False) for _ in range(2)]  # two descriptors, like two services
    threads_count, per_thread = 8, 200
    # A long reason makes each record several kilobytes, so interleaving would show.
    padding = "x" * 4000
    start = threading.Barrier(threads_count)

    def write(thread: int) -> None:
        log = logs[thread % 2]
        start.wait()
        for index in range(per_thread):
            log.record(replace(RECORD, method=f"t{thread}-{index}", reason=padding))

    threads = [threading.Thread(target=write, args=(t,)) for t in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in logs:
        log.close()

    lines = read_lines(path)
    assert len(lines) == threads_count * per_thread
    assert {line["method"] for line in lines} == {
        f"t{t}-{i}" for t in range(threads_count) for i in range(per_thread)
    }
    assert all(line["reason"] == padding for line in lines)


def test_reopening_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    first = AuditLog(path, fsync=True)
    first.record(replace(RECORD, method="before restart"))
    first.close()
    second = AuditLog(path)
    second.record(replace(RECORD, method="after restart"))
    second.close()
    assert [line["method"] for line in read_lines(path)] == ["before restart", "after restart"]


def test_new_log_is_not_world_readable(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        log = AuditLog(tmp_path / "nested" / "dir" / "audit.jsonl")
    finally:
        os.umask(previous)
    log.close()
    assert stat.S_IMODE(log.path.stat().st_mode) == AUDIT_MODE == 0o640


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ipv4:127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("ipv6:[::1]:5000", ("::1", 5000)),
        ("ipv6:[fe80::1%eth0]:443", ("fe80::1%eth0", 443)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("localhost:8443", ("localhost", 8443)),
        ("unix:/x", ("unix:/x", None)),
        ("unix:/run/ztbank/agent.sock", ("unix:/run/ztbank/agent.sock", None)),
        ("ipv4:127.0.0.1", ("127.0.0.1", None)),
        ("", ("", None)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int | None]) -> None:
    assert split_address(address) == expected


def test_split_address_of_a_grpc_ipv6_peer() -> None:
    assert split_address("ipv6:%5B::1%5D:5000") == ("::1", 5000)


def test_a_record_is_synced_before_its_caller_goes_on_and_syncs_are_shared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit: each caller returns only after an fsync that covered its line; callers
    that arrive during a sync share the next one."""
    path = tmp_path / "svc.jsonl"
    synced_lines: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        real_fsync(fd)
        synced_lines.append(len(path.read_text().splitlines()))
        threading.Event().wait(0.02)  # a disk that takes its time

    monkeypatch.setattr(os, "fsync", slow_fsync)
    log = AuditLog(path, fsync=True)
    returned_after: list[int] = []
    lock = threading.Lock()

    def caller(number: int) -> None:
        log.record(replace(RECORD, source_port=number))
        with lock:
            returned_after.append(len(synced_lines))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    ports = sorted(line["source_port"] for line in read_lines(path))
    assert ports == list(range(40))  # each record once
    assert all(after >= 1 for after in returned_after)  # nobody went on before a sync
    assert synced_lines[-1] == 40
    assert len(synced_lines) < 40  # syncs were shared


def test_a_record_that_cannot_be_written_fails_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AuditLog(tmp_path / "svc.jsonl", fsync=True)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(AuditWriteError, match="no space left on device"):
        log.record(RECORD)
    monkeypatch.undo()
    log.close()
    # Its caller was told it failed: the record its request was refused for is not kept.
    assert (tmp_path / "svc.jsonl").read_bytes() == b""


def test_a_closed_log_refuses_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "svc.jsonl", fsync=False)
    log.record(RECORD)
    log.close()
    with pytest.raises(AuditClosedError):
        log.record(RECORD)
    assert len(read_lines(tmp_path / "svc.jsonl")) == 1


def test_a_waiter_that_gives_up_cancels_nobody_elses_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request cancelled while it awaits its record (client gone, deadline) passes the
    cancellation on to the audit future (asyncio.wrap_future does): the record is still
    written, the other waiters of that sync still hear of it, and the writer goes on."""
    syncing = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def held_fsync(fd: int) -> None:
        syncing.set()
        release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    path = tmp_path / "svc.jsonl"
    log = AuditLog(path, fsync=True)
    log.submit(replace(RECORD, source_port=1))
    assert syncing.wait(5)  # the writer now holds the first sync

    async def give_up_on_one() -> None:
        impatient = asyncio.wrap_future(log.submit(replace(RECORD, source_port=2)))
        patient = asyncio.wrap_future(log.submit(replace(RECORD, source_port=3)))
        impatient.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the concurrent future
        release.set()
        await asyncio.wait_for(patient, 5)

    asyncio.run(give_up_on_one())
    log.record(replace(RECORD, source_port=4))  # the writer is still alive
    log.close()
    assert [line["source_port"] for line in read_lines(path)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "reason",
    [
        'quote " backslash \\ newline \n tab \t',
        "nul \x00 and del \x7f",
        "non-ASCII é 中 \U0001f512",
    ],
)
def test_awkward_text_is_escaped_as_json_dumps_would(audit: AuditLog, reason: str) -> None:
    record = replace(RECORD, reason=reason, source_port=None)
    audit.record(record)
    raw = audit.path.read_bytes()
    assert raw.count(b"\n") == 1  # still one line
    [line] = read_lines(audit.path)
    assert (line["reason"], line["source_port"]) == (reason, None)
    expected = json.dumps({k: v for k, v in line.items()}, separators=(",", ":"))
    assert raw.decode("ascii") == expected + "\n"


class DiskFillsUp:
    """``os.write`` as a full disk answers it: the first call of a batch writes ``room`` bytes,
    the next raises ENOSPC; until ``free()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, room: int) -> None:
        self.room = room
        self.full = True
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if not self.full:
            return self._write(fd, data)
        if self.room:
            written, self.room = self._write(fd, bytes(data)[: self.room]), 0
            return written
        raise OSError(28, "No space left on device")

    def free(self) -> None:
        self.full = False


def test_a_full_disk_refuses_the_record_and_leaves_only_whole_lines(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    audit.record(RECORD)
    disk = DiskFillsUp(monkeypatch, room=40)  # a torn record: 40 bytes of the next line

    with pytest.raises(AuditWriteError, match=r"^audit log not writable: no space left on device$"):
        audit.record(replace(RECORD, reason="the torn one"))

    assert [r["reason"] for r in read_lines(audit.path)] == [RECORD.reason]
    disk.free()  # space is back: no restart, the next record lands on a line of its own
    audit.record(replace(RECORD, reason="after recovery"))
    assert [r["reason"] for r in read_lines(audit.path)] == [RECORD.reason, "after recovery"]


def test_readiness_is_false_from_a_failed_write_until_space_returns(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert audit.problem() is None
    disk = DiskFillsUp(monkeypatch, room=0)
    with pytest.raises(AuditWriteError):
        audit.record(RECORD)

    # No request comes to a service that is not ready: its probe writes beside the log.
    assert audit.problem() == "audit log not writable: no space left on device"
    assert audit.problem() == "audit log not writable: no space left on device"
    disk.free()
    assert audit.problem() is None
    assert sorted(p.name for p in audit.path.parent.iterdir()) == [audit.path.name]
    audit.record(RECORD)
    assert [r["reason"] for r in read_lines(audit.path)] == [RECORD.reason]
