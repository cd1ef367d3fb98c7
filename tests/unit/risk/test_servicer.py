import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services._proto import risk_pb2
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, TRANSFER_ENGINE
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.risk.adapters.rules_file import RulesFile
from services.risk.adapters.velocity_sqlite import SqliteVelocityHistory
from services.risk.domain.assessment import RiskAssessor
from services.risk.errors import RulesError
from services.risk.settings import RiskSettings
from services.risk.transport.servicer import RiskService, create_risk_service
from tests.support.grpc_context import AbortedError, FakeServicerContext

TD = "bank.test"


def as_peer(spiffe_id: SpiffeId | None) -> object:
    peer = None
    if spiffe_id is not None:
        peer = PeerIdentity(
            spiffe_id=spiffe_id, serial="0a", fingerprint_sha256="ab" * 32, address="127.0.0.1:1"
        )
    return set_current_peer(peer)


@pytest.fixture
def service(tmp_path: Path) -> RiskService:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"blocked_customers": ["cust-fraud"]}))
    return create_risk_service(RiskSettings(home=tmp_path, risk_rules=rules, trust_domain=TD))


@pytest.fixture
def from_transfer_engine() -> Iterator[None]:
    token = as_peer(TRANSFER_ENGINE.spiffe_id(TD))
    yield
    reset_current_peer(token)


def assess(service: RiskService, assess_request: risk_pb2.AssessRequest) -> risk_pb2.Assessment:
    return asyncio.run(service.Assess(assess_request, FakeServicerContext()))


def request(**fields: object) -> risk_pb2.AssessRequest:
    values: dict[str, object] = {
        "transfer_id": "t-1",
        "customer": "cust-1",
        "from_account": "acct-1",
        "to_account": "acct-2",
        "amount_minor": 600_000,
        "currency": "CNY",
    }
    values.update(fields)
    return risk_pb2.AssessRequest(**values)  # type: ignore[arg-type]


@pytest.mark.usefixtures("from_transfer_engine")
def test_transfer_engine_gets_an_assessment(service: RiskService) -> None:
    answer = assess(service, request())
    assert answer == risk_pb2.Assessment(
        decision="review", reasons=["amount_above_review_threshold"], score=40
    )
    denied = assess(service, request(customer="cust-fraud", amount_minor=1))
    assert (denied.decision, list(denied.reasons), denied.score) == (
        "deny",
        ["blocklisted_customer"],
        100,
    )


@pytest.mark.usefixtures("from_transfer_engine")
def test_velocity_is_counted_across_calls(service: RiskService) -> None:
    decisions = [assess(service, request(amount_minor=1)) for _ in range(6)]
    assert [d.decision for d in decisions] == ["allow"] * 5 + ["review"]
    assert list(decisions[-1].reasons) == ["velocity_exceeded"]


@pytest.mark.parametrize(
    "caller",
    [
        GATEWAY.spiffe_id(TD),
        TRANSFER_ENGINE.spiffe_id("other.test"),
        SpiffeId(TD, "/env/dev/zone/az1/team/payments/svc/transfer-engine"),
    ],
    ids=["gateway", "other-trust-domain", "other-env"],
)
def test_only_the_transfer_engine_may_ask(service: RiskService, caller: SpiffeId) -> None:
    token = as_peer(caller)
    try:
        with pytest.raises(AbortedError) as caught:
            assess(service, request())
    finally:
        reset_current_peer(token)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert str(caller) in caught.value.details


def test_a_call_without_a_verified_peer_fails_closed(service: RiskService) -> None:
    token = as_peer(None)
    try:
        with pytest.raises(AbortedError) as caught:
            assess(service, request())
    finally:
        reset_current_peer(token)
    assert caught.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_the_caller_is_checked_before_the_input(service: RiskService) -> None:
    token = as_peer(GATEWAY.spiffe_id(TD))
    try:
        with pytest.raises(AbortedError) as caught:
            assess(service, request(amount_minor=0))
    finally:
        reset_current_peer(token)
    assert caught.value.code is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.usefixtures("from_transfer_engine")
@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"amount_minor": 0}, "invalid transfer: amount_minor must be positive (got 0)"),
        ({"amount_minor": -100}, "invalid transfer: amount_minor must be positive (got -100)"),
        ({"currency": ""}, "invalid transfer: currency is required"),
        ({"from_account": ""}, "invalid transfer: from_account is required"),
        ({"to_account": ""}, "invalid transfer: to_account is required"),
    ],
)
def test_malformed_requests_are_invalid_arguments(
    service: RiskService, fields: dict[str, object], details: str
) -> None:
    with pytest.raises(AbortedError) as caught:
        assess(service, request(**fields))
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details == details


@pytest.mark.usefixtures("from_transfer_engine")
def test_refused_requests_do_not_count_towards_velocity(service: RiskService) -> None:
    for _ in range(10):
        with pytest.raises(AbortedError):
            assess(service, request(to_account=""))
    assert assess(service, request(amount_minor=1)).decision == "allow"


def test_the_service_does_not_start_without_rules(tmp_path: Path) -> None:
    settings = RiskSettings(home=tmp_path, risk_rules=tmp_path / "missing.json", trust_domain=TD)
    with pytest.raises(RulesError, match=r"missing\.json"):
        create_risk_service(settings)


@pytest.mark.usefixtures("from_transfer_engine")
def test_without_its_velocity_history_risk_answers_unavailable(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text("{}")
    history = SqliteVelocityHistory(tmp_path / "velocity.db")
    service = RiskService(
        RiskAssessor(RulesFile(rules), history), allowed_caller=TRANSFER_ENGINE.spiffe_id(TD)
    )
    history.close()  # as if the file went away under the service
    with pytest.raises(AbortedError) as caught:
        assess(service, request())
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details.startswith("risk cannot assess now: velocity history:")


@pytest.mark.usefixtures("from_transfer_engine")
def test_a_full_risk_store_is_unavailable_with_its_cause_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's limit on the file's size stands for a full disk (SQLITE_FULL), as in
    test_velocity_sqlite.py; tests/e2e/test_disk_full.py fills a real one."""
    rules = tmp_path / "rules.json"
    rules.write_text("{}")
    history = SqliteVelocityHistory(tmp_path / "velocity.db")
    service = RiskService(
        RiskAssessor(RulesFile(rules), history), allowed_caller=TRANSFER_ENGINE.spiffe_id(TD)
    )
    (pages,) = history._db.execute("PRAGMA page_count").fetchone()
    history._db.execute(f"PRAGMA max_page_count = {pages}")

    with caplog.at_level(logging.INFO, logger="services.risk"):
        for made in range(5000):  # new accounts, new rows, until the file is full
            try:
                assess(service, request(transfer_id=f"t-{made}", from_account=f"acct-{made}"))
            except AbortedError as error:
                refused = error
                break
        else:
            pytest.fail("the velocity history never ran out of room")

    assert refused.code is grpc.StatusCode.UNAVAILABLE
    assert refused.details == "risk store not writable: database or disk is full"
    # Risk answered (its store is out): the transfer-engine passes the cause on, and its
    # breaker to risk counts an answer.
    assert refused.trailing_metadata == (("ztbank-dependency-unavailable", "risk-store"),)
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"transfer t-{made} not assessed: risk store not writable: database or disk is full"
    )
    assert warning.exc_info is None
    history._db.execute("PRAGMA max_page_count = 1000000")  # space is back, no restart
    again = assess(service, request(transfer_id=f"t-{made}", from_account=f"acct-{made}"))
    assert again.decision == "review"  # 600.00 CNY: above the review threshold, as before


def test_velocity_history_is_kept_in_the_state_directory(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text("{}")
    create_risk_service(RiskSettings(home=tmp_path / "var", risk_rules=rules, trust_domain=TD))
    assert (tmp_path / "var" / "risk" / "velocity.db").is_file()
