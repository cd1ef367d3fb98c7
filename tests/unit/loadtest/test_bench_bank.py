"""bench_bank's pure parts: /proc parsing, CPU per request, the hold criterion, the rate search,
ratio formatting, error grouping and the printed table."""

from __future__ import annotations

import math

import pytest

from loadtest.bench_bank import (
    RateSearch,
    Row,
    cpu_ms_per_request,
    error_lines,
    format_ratio,
    grouped_errors,
    holds,
    nice_step,
    noise_lines,
    others_cores,
    parse_arguments,
    parse_host_stat,
    parse_proc_stat,
    ratios,
    render,
    spread,
    spread_lines,
    table_lines,
)
from loadtest.loadgen import LoadResult

# /proc/<pid>/stat of a process whose name holds a space and parentheses: utime 1234, stime 56
PROC_STAT = (
    "4242 (python -m (x)) S 1 4242 4242 0 -1 4194304 9115 0 0 0 1234 56 0 0 20 0 9 0 "
    "2620 123456789 9000 18446744073709551615 1 1 0 0 0 0 0 16781312 17642 0 0 0 17 1 0 0 0 0 0"
)
HOST_STAT = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n"


def result(
    *,
    mode: str = "open",
    rate: float = 100.0,
    completed: int = 1000,
    elapsed: float = 10.0,
    latencies: list[float] | None = None,
    errors: dict[str, int] | None = None,
    statuses: dict[str, int] | None = None,
) -> LoadResult:
    return LoadResult(
        mode=mode,
        rate=rate,
        seconds=10.0,
        connections=16,
        scheduled=completed,
        completed=completed,
        elapsed=elapsed,
        latencies_ms=latencies if latencies is not None else [1.0] * completed,
        errors=errors or {},
        statuses=statuses or {},
        cpu_seconds=0.1,
    )


def row(side: str, point: str, res: LoadResult, kind: str = "reads", cpu: float = 0.5) -> Row:
    return Row(
        kind=kind,
        point=point,
        side=side,
        result=res,
        cpu_ms={"gateway": cpu, "engine": cpu, "risk": math.nan, "loadgen": 0.1},
        loadgen_busy=0.2,
        host_busy=0.5,
    )


def test_proc_stat_sums_utime_and_stime_after_the_command_name() -> None:
    assert parse_proc_stat(PROC_STAT) == 1234 + 56


def test_host_stat_busy_is_everything_but_idle_and_iowait() -> None:
    busy, total = parse_host_stat(HOST_STAT)
    assert total == 100 + 5 + 50 + 800 + 20 + 3 + 2
    assert busy == total - 800 - 20


def test_cpu_ms_per_request() -> None:
    # 150 ticks at 100 Hz = 1.5 s of CPU over 1000 requests = 1.5 ms each
    assert cpu_ms_per_request(1000, 1150, 1000, 100) == pytest.approx(1.5)
    assert math.isnan(cpu_ms_per_request(0, 10, 0, 100))


def test_others_are_host_busy_ticks_not_ours() -> None:
    # 2 s wall at 100 Hz: the host was busy 300 ticks, ours 260: 40 ticks = 0.2 cores
    assert others_cores(300, 260, 2.0, 100) == pytest.approx(0.2)
    assert others_cores(250, 260, 2.0, 100) == 0.0  # counters read a moment apart
    assert math.isnan(others_cores(1, 1, 0.0, 100))


def test_noise_names_the_rows_disturbed_by_other_processes() -> None:
    quiet = row("bare", "open 100/s", result())
    noisy = row("ztbank", "open 100/s", result())
    noisy.others = 0.9
    assert noise_lines([quiet]) == []
    assert noise_lines([quiet, noisy]) == [
        "noise: other processes used more than 15% of a core during: ztbank reads open 100/s 90%"
    ]


def test_noise_names_the_points_measured_again() -> None:
    again = [row("bare", "open 300/s", result()), row("ztbank", "open 300/s", result())]
    for each in again:
        each.attempts = 2
    assert noise_lines(again) == [
        "noise: measured again after other processes were busy: reads open 300/s (2 times)"
    ]


def test_a_row_holds_without_errors_at_rate_and_with_a_bounded_p99() -> None:
    assert holds(result(latencies=[1.0] * 1000), reference_p99=1.0) == (True, "")


@pytest.mark.parametrize(
    ("res", "why"),
    [
        (result(errors={"HTTP 503": 1}), "1 errors"),
        (result(completed=900, elapsed=10.0), "90 of 100 req/s done"),
        (result(latencies=[1.0] * 980 + [50.0] * 20), "p99 50.0 ms > 10x 2.0 ms"),
    ],
)
def test_a_row_fails_to_hold_and_says_why(res: LoadResult, why: str) -> None:
    assert holds(res, reference_p99=2.0) == (False, why)


@pytest.mark.parametrize(
    ("value", "step"), [(0.3, 1.0), (7.5, 5.0), (15.0, 10.0), (45.0, 20.0), (99.0, 50.0)]
)
def test_nice_step(value: float, step: float) -> None:
    assert nice_step(value) == step


def test_search_bisects_between_held_and_failed_to_the_step() -> None:
    search = RateSearch(ceiling=160.0, step=10.0, max_tries=5)
    search.record(100.0, True, measured=False)
    search.record(300.0, False, measured=False)
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, rate <= 137)  # the truth: both hold up to 137/s
    assert tried == [130.0, 140.0]
    assert search.held == 130.0


def test_search_goes_down_when_nothing_held() -> None:
    search = RateSearch(ceiling=500.0, step=50.0, max_tries=3)
    search.record(100.0, False, measured=False)
    assert search.next_rate() == 50.0
    search.record(50.0, True)
    assert search.next_rate() is None  # 50 held, 100 failed: one step apart
    assert search.held == 50.0


def test_search_looks_above_the_ceiling_when_a_rate_above_it_held() -> None:
    search = RateSearch(ceiling=84.0, step=10.0, max_tries=3)
    search.record(100.0, True, measured=False)
    search.record(300.0, False, measured=False)
    assert search.next_rate() == 200.0
    search.record(200.0, False)
    assert search.next_rate() == 150.0


def test_search_doubles_without_an_upper_bound() -> None:
    search = RateSearch(ceiling=50.0, step=10.0, max_tries=3)
    search.record(100.0, True, measured=False)
    assert search.next_rate() == 200.0


def test_search_stops_after_its_budget_and_seeds_do_not_count() -> None:
    search = RateSearch(ceiling=10_000.0, step=10.0, max_tries=2)
    search.record(100.0, True, measured=False)
    assert search.next_rate() == 5050.0
    search.record(5050.0, False)
    assert search.next_rate() == 2570.0
    search.record(2570.0, True)
    assert search.next_rate() is None
    assert search.held == 2570.0


def test_format_ratio() -> None:
    assert format_ratio(36.0, 10.0) == "3.6x"
    assert format_ratio(150.0, 900.0) == "0.17x"
    assert format_ratio(250.0, 10.0) == "25x"
    assert format_ratio(math.nan, 1.0) == "-"
    assert format_ratio(1.0, 0.0) == "-"


def test_spread_ignores_missing_values() -> None:
    assert spread([3.0, math.nan, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert all(math.isnan(v) for v in spread([math.nan]))


def test_render_pads_columns() -> None:
    assert render([["a", "bb"], ["ccc", "d"]], right=frozenset({1})) == ["a    bb", "ccc   d"]


def test_errors_are_grouped_by_side_and_reason_with_where_they_happened() -> None:
    rows = [
        row("ztbank", "open 300/s", result(errors={"HTTP 503: busy": 5, "TimeoutError": 1})),
        row("ztbank", "closed, 16 conns", result(mode="closed", errors={"HTTP 503: busy": 2})),
        row("bare", "open 300/s", result()),
        row(
            "ztbank",
            "open 100/s",
            result(statuses={"201": 90, "202": 10}),
            kind="transfers",
        ),
    ]
    assert grouped_errors(rows) == {"ztbank": {"HTTP 503: busy": 7, "TimeoutError": 1}}
    lines = error_lines(rows)
    assert lines[0] == (
        "  ztbank 10x answered 202 (counted as done), not 201  [transfers open 100/s: 10]"
    )
    assert lines[1] == (
        "  ztbank 7x HTTP 503: busy  [reads open 300/s: 5; reads closed, 16 conns: 2]"
    )
    assert lines[2] == "  ztbank 1x TimeoutError  [reads open 300/s: 1]"


def test_ratios_per_point_and_throughput_at_the_closed_loop() -> None:
    rows = [
        row("bare", "open 100/s", result(latencies=[2.0] * 100)),
        row("ztbank", "open 100/s", result(latencies=[8.0] * 100)),
        row("bare", "searched 150/s", result()),
        row("ztbank", "searched 150/s", result()),
        row("bare", "highest held 200/s", result(latencies=[4.0] * 100)),
        row("ztbank", "highest held 200/s", result(latencies=[6.0] * 100)),
        row("bare", "closed", result(mode="closed", completed=9000, latencies=[10.0] * 9)),
        row("ztbank", "closed", result(mode="closed", completed=1500, latencies=[40.0] * 9)),
    ]
    assert ratios(rows) == {
        "reads open 100/s p99": pytest.approx(4.0),
        "reads highest held p99": pytest.approx(1.5),
        "reads closed p99": pytest.approx(4.0),
        "reads closed req/s": pytest.approx(1500 / 9000),
    }


def test_spread_lines_show_each_run_and_min_median_max() -> None:
    lines = spread_lines([{"reads closed req/s": 0.2}, {"reads closed req/s": 0.1}])
    assert lines[0].split() == ["ztbank/bare", "run", "1", "run", "2", "min", "median", "max"]
    ratio_cells = ["0.20x", "0.10x", "0.10x", "0.15x", "0.20x"]
    assert lines[1].split() == ["reads", "closed", "req/s", *ratio_cells]


def test_table_pairs_bare_and_ztbank_with_ratios_on_the_ztbank_line() -> None:
    rows = [
        row("bare", "closed, 16 conns", result(mode="closed", completed=9000, latencies=[1.0])),
        row(
            "ztbank",
            "closed, 16 conns",
            result(mode="closed", completed=1500, latencies=[4.0]),
            cpu=3.0,
        ),
    ]
    lines = table_lines(rows)
    assert "CPU ms per request" in lines[0]
    assert lines[2] == "reads: GET /v1/accounts/{id}"
    bare, ztbank = lines[3].split(), lines[4].split()
    assert bare[:4] == ["closed,", "16", "conns", "bare"]
    assert ztbank[0] == "ztbank"
    assert ztbank[1] == "150.0"  # req/s: 1500 over 10 s
    assert "3.00" in ztbank
    assert ztbank[-2:] == ["4.0x", "0.17x"]


def test_command_line_defaults_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_arguments([])
    assert args.rates == [20.0, 100.0, 300.0]
    assert (args.seconds, args.connections, args.repeat) == (10.0, 16, 1)
    assert parse_arguments(["--rates", "50,150", "--kinds", "reads"]).rates == [50.0, 150.0]
    with pytest.raises(SystemExit) as exit_info:
        parse_arguments(["--help"])
    assert exit_info.value.code == 0
    assert "--noise-retries" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_arguments(["--kinds", "writes"])
