import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from services.common.risk_decision import RiskDecision as Decision
from services.risk.adapters.rules_file import RulesFile
from services.risk.adapters.velocity_sqlite import SqliteVelocityHistory
from services.risk.domain.assessment import Reason, RiskAssessor, TransferRequest
from services.risk.domain.rules import Rules, parse_rules
from services.risk.errors import RiskError, RulesError

REPO_RULES = Path(__file__).parents[3] / "infra" / "risk" / "rules.json"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_rules(path: Path, mtime_ns: int, **fields: Any) -> None:
    path.write_text(json.dumps(fields))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def write_raw(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.json"
    write_rules(rules, 1_000_000_000, review_threshold=100)
    return rules


def test_the_shipped_rules_file_holds_the_documented_defaults() -> None:
    assert parse_rules(REPO_RULES.read_bytes(), source=str(REPO_RULES)) == Rules()
    assert Rules().review_threshold == 500_000
    assert Rules().deny_threshold == 5_000_000


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"review_treshold": 1}', "review_treshold: Extra inputs are not permitted"),
        ('{"review_threshold": "500000"}', "review_threshold: Input should be a valid integer"),
        ('{"review_threshold": true}', "review_threshold: Input should be a valid integer"),
        ('{"deny_threshold": 500000}', "deny_threshold (500000) must be above review_threshold"),
        ('{"velocity_max_transfers": 0}', "velocity_max_transfers: Input should be greater"),
        ('{"velocity_window_seconds": 0}', "velocity_window_seconds: Input should be greater"),
        ('{"blocked_accounts": "acct-1"}', "blocked_accounts: Input should be a valid array"),
        ("[]", "rules: Input should be an object"),
        ("{", "Invalid JSON"),
    ],
)
def test_invalid_rules_are_refused_in_one_line(text: str, problem: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text.encode(), source="r.json")
    message = str(caught.value)
    assert message.startswith("invalid risk rules in r.json: ")
    assert problem in message
    assert "\n" not in message


def test_missing_file_at_startup_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(RiskError) as caught:
        RulesFile(missing)
    assert str(caught.value) == (
        f"cannot read risk rules file {missing}: No such file or directory;"
        " the risk service cannot start without valid rules (ZTBANK_RISK_RULES)"
    )


def test_invalid_file_at_startup_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "rules.json"
    write_raw(bad, '{"deny_threshold": -1}', 1)
    with pytest.raises(RulesError, match="deny_threshold: Input should be greater than 0"):
        RulesFile(bad)


def test_changed_file_is_used_after_the_check_interval(path: Path, clock: FakeClock) -> None:
    rules = RulesFile(path, clock=clock)
    assert rules.current().review_threshold == 100
    write_rules(path, 2_000_000_000, review_threshold=200)
    clock.now += 0.5
    assert rules.current().review_threshold == 100  # checked at most once a second
    clock.now += 0.5
    assert rules.current().review_threshold == 200


def test_unchanged_mtime_and_size_is_not_reread(path: Path, clock: FakeClock) -> None:
    rules = RulesFile(path, clock=clock)
    write_rules(path, 1_000_000_000, review_threshold=300)  # same size, same mtime
    clock.now += 1
    assert rules.current().review_threshold == 100


def test_invalid_file_keeps_the_last_good_rules_and_logs_once(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rules = RulesFile(path, clock=clock)
    write_raw(path, '{"review_threshold": ', 2_000_000_000)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            clock.now += 1
            assert rules.current().review_threshold == 100
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "invalid risk rules" in errors[0]
    assert "keeping the last good risk rules" in errors[0]

    write_rules(path, 3_000_000_000, review_threshold=400)
    clock.now += 1
    assert rules.current().review_threshold == 400


def test_deleted_file_keeps_the_last_good_rules(
    path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rules = RulesFile(path, clock=clock)
    path.unlink()
    with caplog.at_level(logging.ERROR):
        clock.now += 1
        assert rules.current().review_threshold == 100
        clock.now += 1
        assert rules.current().review_threshold == 100
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

    write_rules(path, 1_000_000_000, review_threshold=100, deny_threshold=900)
    clock.now += 1
    assert rules.current().deny_threshold == 900


def test_the_next_assessment_uses_the_new_rules(path: Path, clock: FakeClock) -> None:
    assessor = RiskAssessor(
        RulesFile(path, clock=clock),
        SqliteVelocityHistory(path.parent / "velocity.db", clock=clock),
    )
    transfer = TransferRequest(
        transfer_id="t-1",
        customer="cust-1",
        from_account="acct-1",
        to_account="acct-2",
        amount_minor=150,
        currency="CNY",
    )
    assert assessor.assess(transfer).decision is Decision.REVIEW
    write_rules(path, 2_000_000_000, review_threshold=100, blocked_accounts=["acct-2"])
    clock.now += 1
    assert assessor.assess(transfer).reasons == (
        Reason.BLOCKLISTED_ACCOUNT,
        Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD,
    )
