"""The console's file feeds: appended JSON lines read once each, latency per step."""

from __future__ import annotations

import json
from pathlib import Path

from services.console.feeds import (
    JsonLinesTail,
    LatencyWindow,
    Served,
    ServedFeed,
    decision,
    served,
)


def append(path: Path, *records: object, raw: str = "") -> None:
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records) + raw)


def test_a_tail_reads_each_complete_line_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    tail = JsonLinesTail(path)
    assert tail.read() == []  # no file yet
    append(path, {"n": 1}, {"n": 2})
    assert tail.read() == [{"n": 1}, {"n": 2}]
    assert tail.read() == []
    append(path, {"n": 3})
    assert tail.read() == [{"n": 3}]


def test_a_tail_finishes_a_line_written_in_two_parts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    tail = JsonLinesTail(path)
    tail.read()
    with path.open("a") as handle:
        handle.write('{"decision": "al')
    assert tail.read() == []
    with path.open("a") as handle:
        handle.write('low"}\nnot json\n')
    assert tail.read() == [{"decision": "allow"}]


def test_a_tail_of_a_long_file_starts_near_its_end(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    append(path, *({"n": n, "pad": "x" * 50} for n in range(1000)))
    records = JsonLinesTail(path, start_back_bytes=1000).read()
    assert 0 < len(records) < 20
    assert records[-1]["n"] == 999
    assert [r["n"] for r in records] == list(range(1000 - len(records), 1000))  # no fragment


def test_a_tail_starts_again_when_the_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    append(path, {"n": 1}, {"n": 2})
    tail = JsonLinesTail(path)
    assert len(tail.read()) == 2
    path.unlink()
    append(path, {"n": 3})  # `make reset`: a new, shorter file
    assert tail.read() == [{"n": 3}]


def test_a_decision_keeps_who_what_verdict_and_why() -> None:
    record = {
        "time": "2026-12-04T10:00:00.000+00:00",
        "service": "gateway",
        "decision": "deny",
        "caller_spiffe_id": "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/teller",
        "method": "GET /v1/accounts",
        "reason": "no rule",
        "cert_serial": "0a",
        "cert_sha256": "ff" * 32,
    }
    assert decision(record) == {
        "time": "2026-12-04T10:00:00.000+00:00",
        "service": "gateway",
        "event": "authz",
        "decision": "deny",
        "caller": record["caller_spiffe_id"],
        "method": "GET /v1/accounts",
        "reason": "no rule",
        "serial": "0a",
    }


def test_only_server_spans_are_served_requests() -> None:
    assert served({"kind": "SERVER", "start_ns": 1_000_000_000, "end_ns": 1_003_000_000}) == Served(
        1.003, 3.0
    )
    assert served({"kind": "CLIENT", "start_ns": 1, "end_ns": 2}) is None
    assert served({"kind": "SERVER", "start_ns": 5, "end_ns": 2}) is None
    assert served({"kind": "SERVER"}) is None


def test_latency_window_rate_and_percentiles_per_step() -> None:
    window = LatencyWindow(seconds=30, step=10)
    now = 1000.0  # steps [980, 990), [990, 1000), [1000, 1010)
    window.add(Served(981.0, ms) for ms in range(1, 101))  # 100 requests in the first step
    window.add([Served(1000.5, 7.0)])
    window.add([Served(900.0, 1.0)])  # older than the window: dropped
    series = window.series(now)
    assert series["t"] == [980.0, 990.0, 1000.0]
    assert series["rate"] == [10.0, 0.0, 0.1]
    assert series["p50"] == [50.0, None, 7.0]
    assert series["p99"] == [99.0, None, 7.0]


def test_latency_window_leaves_out_steps_before_it_began_to_count() -> None:
    # The console reads spans from the moment it starts: the steps before are not "0 requests".
    window = LatencyWindow(seconds=30, step=10, since=995.0)
    window.add([Served(996.0, 3.0)])
    series = window.series(1000.0)
    assert series["t"] == [990.0, 1000.0]
    assert series["rate"] == [0.1, 0.0]
    assert series["p50"] == [3.0, None]


def span(ended: float, milliseconds: float = 5.0, kind: str = "SERVER") -> dict[str, object]:
    end_ns = int(ended * 1e9)
    return {"kind": kind, "start_ns": end_ns - int(milliseconds * 1e6), "end_ns": end_ns}


def test_the_charts_open_with_the_spans_written_before_the_console_started(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway-spans.jsonl"
    append(path, span(975.0, 4.0), span(985.0, 6.0, kind="CLIENT"), span(995.0, 8.0))
    feed = ServedFeed(path, started=1000.0, window=LatencyWindow(seconds=30, step=10))

    series = feed.poll(1000.0)

    assert feed.window.since is None  # the whole file was read: nothing before it is missing
    assert series["t"] == [980.0, 990.0, 1000.0]
    assert series["rate"] == [0.0, 0.1, 0.0]
    assert series["p50"] == [None, 8.0, None]
    append(path, span(1001.0, 2.0))
    assert feed.poll(1002.0)["p50"][-1] == 2.0


def test_a_long_spans_file_counts_from_the_first_span_it_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway-spans.jsonl"
    append(path, *(span(900.0 + n) for n in range(100)))  # 900-999, about 90 bytes each
    feed = ServedFeed(
        path, started=1000.0, backfill_bytes=1000, window=LatencyWindow(seconds=30, step=10)
    )

    series = feed.poll(1000.0)

    since = feed.window.since
    assert since is not None
    assert 985.0 < since < 999.0  # the last ten or so spans were read
    assert series["t"][0] == 980.0  # the step holding `since`; earlier ones are not "0 requests"
    counted = round(sum(rate or 0.0 for rate in series["rate"]) * 10)  # rate x step
    assert counted == 999 - since + 1  # each span read, once


def test_a_spans_file_that_appears_later_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "gateway-spans.jsonl"
    feed = ServedFeed(path, started=1000.0, window=LatencyWindow(seconds=30, step=10))
    assert feed.poll(1000.0)["t"] == [1000.0]  # nothing known before the console started
    append(path, span(1003.0))
    assert feed.poll(1005.0)["rate"] == [0.0, 0.0, 0.1]
    assert feed.window.since is None
