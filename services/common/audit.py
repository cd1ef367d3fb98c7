"""Append-only JSON-lines audit of every authorization decision.

Each record is one ``write(2)`` on an ``O_APPEND`` descriptor, so concurrent writers never
interleave and a crash of the process loses nothing already written; ``fsync`` (on by default)
also survives a crash of the machine.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote

AUDIT_MODE = 0o640


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


class AuditLog:
    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, AUDIT_MODE)
        self._fsync = fsync
        self._lock = threading.Lock()

    def record(self, record: AuditRecord) -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds")}
        line.update({k: v for k, v in asdict(record).items()})
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, data)
            if self._fsync:
                os.fsync(self._fd)

    def close(self) -> None:
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
