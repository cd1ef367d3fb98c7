"""The console's file feeds: appended JSON lines read once each, latency per step."""

from __future__ import annotations

import json
from pathlib import Path

from services.console.feeds import JsonLinesTail, LatencyWindow, Served, decision, served


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
