"""The load generator's pure parts: percentiles, the open-loop schedule, response heads, the
request bytes and error grouping."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loadtest.loadgen import (
    Load,
    LoadResult,
    ProtocolError,
    Requests,
    Target,
    Workload,
    arguments,
    due_count,
    exception_reason,
    http_reason,
    parse_arguments,
    parse_head,
    scheduled_count,
)


def _answered(latencies_ms: list[float]) -> LoadResult:
    return LoadResult(
        mode="closed",
        rate=0.0,
        seconds=1.0,
        connections=1,
        scheduled=len(latencies_ms),
        completed=len(latencies_ms),
        elapsed=1.0,
        latencies_ms=latencies_ms,
        errors={},
        statuses={},
        cpu_seconds=0.0,
    )


def test_latency_percentiles_are_nearest_rank() -> None:
    answered = _answered([float(v) for v in range(100, 0, -1)])  # 1..100, in any order
    assert answered.latency_ms(0.50) == 50.0
    assert answered.latency_ms(0.99) == 99.0
    assert answered.latency_ms(1.0) == 100.0


def test_latency_of_one_answer_and_of_none() -> None:
    assert _answered([7.0]).latency_ms(0.99) == 7.0
    assert math.isnan(_answered([]).latency_ms(0.50))


def test_open_loop_schedules_rate_times_seconds_requests() -> None:
    assert scheduled_count(300, 10) == 3000
    assert scheduled_count(0.5, 1) == 1  # at least one


def test_due_count_releases_request_i_at_i_over_rate() -> None:
    # 100/s: request 0 at 0 s, request 1 at 10 ms, ...
    assert due_count(-0.001, 100, 1000) == 0
    assert due_count(0.0, 100, 1000) == 1
    assert due_count(0.0099, 100, 1000) == 1
    assert due_count(0.01, 100, 1000) == 2
    assert due_count(0.5, 100, 1000) == 51


def test_due_count_releases_everything_late_at_once_but_never_more_than_total() -> None:
    # a scheduler that woke up 100 ms late sends the 10 requests due meanwhile in one batch
    assert due_count(0.1, 100, 1000) - due_count(0.0, 100, 1000) == 10
    assert due_count(60.0, 100, 1000) == 1000


def test_parse_head_reads_status_length_and_keep_alive() -> None:
    head = b"HTTP/1.1 201 Created\r\ndate: x\r\ncontent-length: 251\r\n\r\n"
    assert parse_head(head) == (201, 251, True)


def test_parse_head_is_case_insensitive_and_sees_connection_close() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"
    assert parse_head(head) == (503, 7, False)


def test_parse_head_without_content_length_has_no_body() -> None:
    assert parse_head(b"HTTP/1.1 204 No Content\r\nserver: x\r\n\r\n") == (204, 0, True)


@pytest.mark.parametrize(
    "head",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
    ],
)
def test_parse_head_refuses_what_it_does_not_handle(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(head)


def test_error_reasons_group_by_status_and_body_or_exception_type() -> None:
    assert http_reason(503, b'{"title":"unavailable"}') == 'HTTP 503: {"title":"unavailable"}'
    assert http_reason(502, b"") == "HTTP 502"
    assert len(http_reason(500, b"x" * 10_000)) < 200
    assert exception_reason(ConnectionResetError("reset by peer")) == (
        "ConnectionResetError: reset by peer"
    )
    assert exception_reason(TimeoutError()) == "TimeoutError"


def _split(request: bytes) -> tuple[list[str], dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines, headers, body


def test_reads_alternate_accounts_and_carry_the_token() -> None:
    requests = Requests(Workload("read", token="t0k", accounts=("a1", "a2")), "127.0.0.1:8443")
    first, second, third = (_split(requests.next()) for _ in range(3))
    assert first[0][0] == "GET /v1/accounts/a1 HTTP/1.1"
    assert second[0][0] == "GET /v1/accounts/a2 HTTP/1.1"
    assert third[0][0] == first[0][0]
    assert first[1]["Host"] == "127.0.0.1:8443"
    assert first[1]["Authorization"] == "Bearer t0k"
    assert first[2] == b""


def test_transfers_alternate_direction_with_unique_keys_and_exact_length() -> None:
    requests = Requests(Workload("transfer", accounts=("a1", "a2")), "h")
    sent = [_split(requests.next()) for _ in range(4)]
    bodies = [json.loads(body) for _, _, body in sent]
    assert [(b["from_account"], b["to_account"]) for b in bodies] == [
        ("a1", "a2"),
        ("a2", "a1"),
        ("a1", "a2"),
        ("a2", "a1"),
    ]
    assert bodies[0]["amount"] == "0.01"
    assert bodies[0]["currency"] == "CNY"
    keys = {headers["Idempotency-Key"] for _, headers, _ in sent}
    assert len(keys) == 4
    for lines, headers, body in sent:
        assert lines[0] == "POST /v1/transfers HTTP/1.1"
        assert int(headers["Content-Length"]) == len(body)
        assert "Authorization" not in headers  # no token given


def test_keys_differ_between_generators() -> None:
    one, two = (Requests(Workload("transfer"), "h") for _ in range(2))
    assert _split(one.next())[1]["Idempotency-Key"] != _split(two.next())[1]["Idempotency-Key"]


def test_command_line_round_trips() -> None:
    target = Target("127.0.0.1", 9, Path("/ca"), Path("/c"), Path("/k"), check_hostname=False)
    workload = Workload("transfer", accounts=("x", "y"), amount="0.02")
    load = Load("open", 3.0, 8, rate=250.0, timeout=4.0, drain=2.0)
    parsed = parse_arguments(arguments(target, workload, load))
    assert parsed == (target, workload, load, False)


def test_result_rates_and_error_count() -> None:
    result = LoadResult(
        mode="open",
        rate=100,
        seconds=10,
        connections=4,
        scheduled=1000,
        completed=990,
        elapsed=11.0,
        latencies_ms=[1.0] * 990,
        errors={"HTTP 503": 6, "TimeoutError": 4},
        statuses={"200": 990, "503": 6},
        cpu_seconds=0.5,
    )
    assert result.achieved == pytest.approx(90.0)
    assert result.error_count == 10
    assert LoadResult.from_json(json.loads(json.dumps(result.__dict__))) == result


def test_help_prints(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    assert "--wait-for-go" in capsys.readouterr().out
