"""What the console reads from the stack's files as they grow: the services' audit records
(the decision feed) and their server spans (latency and request rate)."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.stats import percentile

# Where a tail of a long file starts: the last records are enough to fill the page.
DEFAULT_START_BACK_BYTES = 64 * 1024
# How much of a spans file written before the console started fills its charts: a few minutes
# at a demo's rates, a few seconds under `make bench-bank` (the charts then say from when).
SPANS_BACKFILL_BYTES = 4 * 1024 * 1024
SERVER_SPAN = "SERVER"


class JsonLinesTail:
    """The new complete JSON lines of a file that another process appends to.

    Starts ``start_back_bytes`` before the end (then skips the partial first line); a file that
    shrank or was replaced (``make reset``) is read again from its start.
    """

    def __init__(self, path: Path, *, start_back_bytes: int = DEFAULT_START_BACK_BYTES) -> None:
        self.path = path
        self._start_back = start_back_bytes
        self._offset: int | None = None
        self._inode: int | None = None
        self._partial = b""
        # Where the first read began: 0 is the whole file; None until the file was seen.
        self.first_offset: int | None = None

    def _open_at(self, size: int, inode: int) -> bool:
        """Where to read from; True if the first line read may be a fragment."""
        first = self._offset is None
        if first or inode != self._inode or size < (self._offset or 0):
            self._offset = max(0, size - self._start_back) if first else 0
            self._partial = b""
            if first:
                self.first_offset = self._offset
        self._inode = inode
        return first and (self._offset or 0) > 0

    def read(self) -> list[dict[str, Any]]:
        try:
            stat = os.stat(self.path)
            skip_fragment = self._open_at(stat.st_size, stat.st_ino)
            with self.path.open("rb") as handle:
                handle.seek(self._offset or 0)
                data = handle.read()
        except OSError:
            return []
        self._offset = (self._offset or 0) + len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # what follows the last newline: not yet a whole line
        if skip_fragment and lines:
            lines.pop(0)
        records = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # not a record (a line written by something else)
            if isinstance(record, dict):
                records.append(record)
        return records


def decision(record: dict[str, Any]) -> dict[str, Any]:
    """The feed's view of an audit record: who, what, the verdict and why (no key material is
    ever in a record; this keeps the page's share small)."""
    return {
        "time": record.get("time"),
        "service": record.get("service"),
        "event": record.get("event", "authz"),
        "decision": record.get("decision"),
        "caller": record.get("caller_spiffe_id"),
        "method": record.get("method"),
        "reason": record.get("reason"),
        "serial": record.get("cert_serial"),
    }


@dataclass(frozen=True)
class Served:
    ended: float  # epoch seconds
    milliseconds: float


def served(span: dict[str, Any]) -> Served | None:
    """A server span as one served request or call, None for any other span."""
    if span.get("kind") != SERVER_SPAN:
        return None
    start, end = span.get("start_ns"), span.get("end_ns")
    if not isinstance(start, int) or not isinstance(end, int) or end < start:
        return None
    return Served(end / 1e9, (end - start) / 1e6)


class LatencyWindow:
    """The served requests of one service over the last ``seconds``, summed up per ``step``.

    Steps that ended before ``since`` (when the console began to read the spans) are left out:
    nobody counted their requests, and a rate of 0 would say there were none.
    """

    def __init__(
        self, *, seconds: float = 300.0, step: float = 10.0, since: float | None = None
    ) -> None:
        self.seconds = seconds
        self.step = step
        self.since = since
        self._served: deque[Served] = deque()

    def add(self, requests: Iterable[Served]) -> None:
        self._served.extend(requests)

    def series(self, now: float) -> dict[str, list[float | None]]:
        """Per step, oldest first (the last one is still filling and holds ``now``): its start
        time, requests per second, p50 and p99 in ms (None for a step without requests); from
        the step holding ``since`` on."""
        while self._served and self._served[0].ended < now - self.seconds:
            self._served.popleft()
        steps = round(self.seconds / self.step)
        first = (math.floor(now / self.step) - steps + 1) * self.step
        buckets: list[list[float]] = [[] for _ in range(steps)]
        for item in self._served:
            index = math.floor((item.ended - first) / self.step)
            if 0 <= index < steps:
                buckets[index].append(item.milliseconds)
        series: dict[str, list[float | None]] = {"t": [], "rate": [], "p50": [], "p99": []}
        for index, bucket in enumerate(buckets):
            start = first + index * self.step
            if self.since is not None and start + self.step <= self.since:
                continue
            series["t"].append(start)
            series["rate"].append(len(bucket) / self.step)
            series["p50"].append(percentile(bucket, 0.50) if bucket else None)
            series["p99"].append(percentile(bucket, 0.99) if bucket else None)
        return series


class ServedFeed:
    """One service's served requests, from its spans file into a ``LatencyWindow``.

    The first read takes up to ``backfill_bytes`` written before, so the charts open with the
    last minutes rather than empty; the window then counts from the first span read (or from
    the file's start, when all of it was read).
    """

    def __init__(
        self,
        path: Path,
        *,
        started: float,
        backfill_bytes: int = SPANS_BACKFILL_BYTES,
        window: LatencyWindow | None = None,
    ) -> None:
        self.tail = JsonLinesTail(path, start_back_bytes=backfill_bytes)
        self.window = window or LatencyWindow()
        self.window.since = started  # until the file is seen: nothing before is known
        self._placed = False

    def poll(self, now: float) -> dict[str, list[float | None]]:
        records = self.tail.read()
        if not self._placed and self.tail.first_offset is not None:
            self._placed = True
            ends = [r["end_ns"] / 1e9 for r in records if isinstance(r.get("end_ns"), int)]
            if self.tail.first_offset == 0:
                self.window.since = None
            elif ends:
                self.window.since = min(ends)
        self.window.add(s for record in records if (s := served(record)) is not None)
        return self.window.series(now)
