"""A service's liveness and readiness: its checks, the reasons it gives, the log of its flaps,
and the local health socket a probe reads without an identity."""

from __future__ import annotations

import asyncio
import logging
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from services.common.identity.source import SvidMaterial
from services.common.runtime import health_check
from services.common.runtime.health import (
    HealthAnswer,
    HealthSocket,
    HealthUnavailableError,
    ServiceHealth,
    health_socket,
    keep_watch,
    read_health,
    svid_problem,
)

FULL = "audit log not writable: no space left on device"


class Toggle:
    """A check whose answer the test sets."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self) -> str | None:
        return self.reason


@pytest.fixture
def health() -> ServiceHealth:
    return ServiceHealth("risk")


@pytest.fixture
def served(tmp_path: Path, health: ServiceHealth) -> Iterator[Path]:
    path = health_socket(tmp_path, "risk")
    socket = HealthSocket(path, health)
    try:
        yield path
    finally:
        socket.close()


def test_ready_with_no_reason_and_every_reason_when_not(health: ServiceHealth) -> None:
    audit, breaker = Toggle(), Toggle()
    health.require("audit", audit)
    health.require("breaker", breaker)
    assert health.readiness() == HealthAnswer(True)

    audit.reason, breaker.reason = FULL, "circuit breaker to risk open: x"

    assert health.readiness() == HealthAnswer(False, (FULL, "circuit breaker to risk open: x"))


def test_a_check_that_cannot_tell_is_a_reason_not_to_serve(health: ServiceHealth) -> None:
    def broken() -> str | None:
        raise OSError("stat failed")

    health.require("policy", broken)

    assert health.readiness() == HealthAnswer(False, ("policy: cannot be checked: stat failed",))


def test_each_flap_is_logged_once_with_its_cause(
    health: ServiceHealth, caplog: pytest.LogCaptureFixture
) -> None:
    audit = Toggle()
    health.require("audit", audit)
    caplog.set_level(logging.INFO, logger="services.common.runtime.health")
    health.readiness()
    audit.reason = FULL
    health.readiness()
    health.readiness()
    audit.reason = None
    health.readiness()

    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "risk: ready"),
        ("WARNING", f"risk: not ready: {FULL}"),
        ("INFO", "risk: ready"),
    ]


def test_liveness_is_false_only_when_the_loop_stops_beating() -> None:
    now = [0.0]
    health = ServiceHealth("risk", clock=lambda: now[0], stall_seconds=10)
    health.require("audit", lambda: FULL)  # not ready is still live
    now[0] = 10
    assert health.liveness() == HealthAnswer(True)
    now[0] = 12.4
    assert health.liveness() == HealthAnswer(False, ("its event loop has not run for 12s",))
    health.beat()
    assert health.liveness() == HealthAnswer(True)


def test_an_expired_svid_is_named_with_its_serial_and_expiry() -> None:
    expired = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    material = cast(SvidMaterial, SimpleNamespace(serial="0abc", not_after=expired))
    assert svid_problem(material, now=expired - timedelta(seconds=1)) is None
    assert svid_problem(material, now=expired) == (
        "SVID 0abc expired at 2026-01-02T03:04:05+00:00 and was not renewed:"
        " the Workload API has sent no new one"
    )


def test_the_socket_answers_both_probes_with_the_reasons(
    served: Path, health: ServiceHealth
) -> None:
    audit = Toggle()
    health.require("audit", audit)
    assert read_health(served, "readyz") == HealthAnswer(True)
    assert read_health(served, "livez") == HealthAnswer(True)

    audit.reason = FULL

    assert read_health(served, "readyz") == HealthAnswer(False, (FULL,))
    assert read_health(served, "livez") == HealthAnswer(True)


def test_the_socket_is_open_to_any_local_user_and_replaces_a_stale_one(
    tmp_path: Path, health: ServiceHealth
) -> None:
    path = health_socket(tmp_path, "risk")
    path.parent.mkdir(parents=True)
    path.write_text("left by a killed process")
    socket = HealthSocket(path, health)
    try:
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o666
        assert read_health(path).ok
    finally:
        socket.close()
    assert not path.exists()


def test_no_answer_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "run" / "risk" / "health.sock"
    with pytest.raises(HealthUnavailableError, match=r"^no answer on .*health\.sock: "):
        read_health(missing)


def test_the_watch_tells_each_turn_of_readiness(health: ServiceHealth) -> None:
    audit = Toggle()
    health.require("audit", audit)
    turns: asyncio.Queue[bool] = asyncio.Queue()

    async def scenario() -> list[bool]:
        async def changed(ready: bool) -> None:
            await turns.put(ready)

        watch = asyncio.create_task(keep_watch(health, changed, interval=0.01))
        seen = [await turns.get()]
        audit.reason = FULL
        seen.append(await turns.get())
        audit.reason = None
        seen.append(await turns.get())
        watch.cancel()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [True, False, True]


def test_the_container_check_exits_0_only_when_the_answer_is_positive(
    served: Path, health: ServiceHealth, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = Toggle()
    health.require("audit", audit)
    assert health_check.main([str(served)]) == 0
    assert capsys.readouterr().out == "ready\n"

    audit.reason = FULL

    assert health_check.main([str(served), "readyz"]) == 1
    assert capsys.readouterr().out == f"not ready\n  {FULL}\n"
    assert health_check.main([str(served), "livez"]) == 0
    assert capsys.readouterr().out == "live\n"


def test_the_container_check_says_what_went_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert health_check.main([str(tmp_path / "none.sock")]) == 1
    assert capsys.readouterr().err.startswith(f"no answer on {tmp_path / 'none.sock'}: ")
    assert health_check.main([str(tmp_path / "none.sock"), "status"]) == 2
    assert capsys.readouterr().err == "usage: health_check SOCKET [livez|readyz]\n"
