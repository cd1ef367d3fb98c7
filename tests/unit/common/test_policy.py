"""Deny-by-default authorization: rules, wildcards, trust domains, hot reload, fail closed."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from services._proto import ledger_pb2, risk_pb2
from services.common.authz import policy as policy_module
from services.common.authz.policy import Decision, Policy, PolicyError
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import (
    CONSOLE,
    GATEWAY,
    OPS,
    RISK,
    TELLER,
    TRANSFER_ENGINE,
    Workload,
)

TD = "ztbank.example"
REPO_POLICY = Path(__file__).resolve().parents[3] / "infra" / "policy.json"

TE_ID = f"spiffe://{TD}/env/prod/zone/az1/team/payments/svc/transfer-engine"
GW_ID = f"spiffe://{TD}/env/prod/zone/az1/team/channels/svc/gateway"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
LEDGER = "/ztbank.ledger.v1.TransferEngine"


def caller(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


def rule(service: str, methods: list[str], callers: list[str]) -> dict[str, Any]:
    return {"service": service, "methods": methods, "callers": callers}


def write_rules(path: Path, *rules: dict[str, Any]) -> None:
    path.write_text(json.dumps({"rules": list(rules)}))


@pytest.fixture(autouse=True)
def reload_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_module, "RELOAD_CHECK_SECONDS", 0.0)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    write_rules(
        path,
        rule(
            "risk",
            [ASSESS],
            ["spiffe://{trust_domain}/env/prod/zone/az1/team/payments/svc/transfer-engine"],
        ),
        rule("transfer-engine", [f"{LEDGER}/*"], [GW_ID]),
        rule("gateway", ["GET /v1/accounts", "POST /v1/*"], ["spiffe://{trust_domain}/teller"]),
    )
    return path


@pytest.fixture
def policy(policy_file: Path) -> Policy:
    return Policy(policy_file, TD)


# -- decisions -------------------------------------------------------------------------------


def test_listed_caller_may_call_the_listed_method(policy: Policy) -> None:
    decision = policy.decide("risk", ASSESS, caller(TE_ID))
    assert decision.allowed
    assert "risk" in decision.reason


def test_other_method_of_the_same_service_is_denied(policy: Policy) -> None:
    decision = policy.decide("risk", "/ztbank.risk.v1.Risk/Override", caller(TE_ID))
    assert not decision.allowed
    assert TE_ID in decision.reason
    assert "/ztbank.risk.v1.Risk/Override" in decision.reason


def test_same_method_on_another_service_is_denied(policy: Policy) -> None:
    assert not policy.decide("transfer-engine", ASSESS, caller(TE_ID)).allowed


def test_unlisted_caller_is_denied(policy: Policy) -> None:
    assert not policy.decide("risk", ASSESS, caller(GW_ID)).allowed


def test_method_wildcard_covers_every_method_of_that_grpc_service_only(policy: Policy) -> None:
    gateway = caller(GW_ID)
    for method in ("CreateTransfer", "GetAccount", "AnythingNew"):
        assert policy.decide("transfer-engine", f"{LEDGER}/{method}", gateway).allowed
    assert not policy.decide(
        "transfer-engine", "/ztbank.ledger.v2.TransferEngine/X", gateway
    ).allowed
    assert not policy.decide("transfer-engine", "/ztbank.admin.v1.Admin/Drop", gateway).allowed


def test_http_method_patterns(policy: Policy) -> None:
    teller = caller(f"spiffe://{TD}/teller")
    assert policy.decide("gateway", "GET /v1/accounts", teller).allowed
    assert policy.decide("gateway", "POST /v1/transfers", teller).allowed
    assert not policy.decide("gateway", "DELETE /v1/accounts", teller).allowed
    assert not policy.decide("gateway", "GET /v1/accounts/123", teller).allowed
    assert not policy.decide("gateway", "POST /v2/transfers", teller).allowed


def test_method_patterns_are_case_sensitive(policy: Policy) -> None:
    assert not policy.decide("risk", ASSESS.lower(), caller(TE_ID)).allowed


def test_same_path_in_another_trust_domain_is_denied(policy: Policy) -> None:
    foreign = caller(TE_ID.replace(TD, "evil.example"))
    decision = policy.decide("risk", ASSESS, foreign)
    assert not decision.allowed
    assert "evil.example" in decision.reason


def test_trust_domain_placeholder_takes_the_running_trust_domain(policy_file: Path) -> None:
    policy = Policy(policy_file, "bank.test")
    assert policy.decide("risk", ASSESS, caller(TE_ID.replace(TD, "bank.test"))).allowed
    assert not policy.decide("risk", ASSESS, caller(TE_ID)).allowed
    # A literal trust domain in the file stays literal.
    assert policy.decide("transfer-engine", f"{LEDGER}/GetAccount", caller(GW_ID)).allowed
    gw_here = caller(GW_ID.replace(TD, "bank.test"))
    assert not policy.decide("transfer-engine", f"{LEDGER}/GetAccount", gw_here).allowed


def test_empty_policy_denies_everything_but_health(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    write_rules(path)
    policy = Policy(path, TD)
    assert not policy.decide("risk", ASSESS, caller(TE_ID)).allowed
    assert policy.decide("risk", "/grpc.health.v1.Health/Check", caller(TE_ID)).allowed


@pytest.mark.parametrize(
    ("service", "method"),
    [
        ("risk", "/grpc.health.v1.Health/Check"),
        ("transfer-engine", "/grpc.health.v1.Health/Watch"),
        ("gateway", "GET /healthz"),
    ],
)
def test_health_is_open_to_any_caller(policy: Policy, service: str, method: str) -> None:
    decision = policy.decide(service, method, caller(f"spiffe://{TD}/nobody/in/particular"))
    assert decision.allowed
    assert decision.reason == "health check"


def test_health_lookalikes_are_not_open(policy: Policy) -> None:
    nobody = caller(f"spiffe://{TD}/nobody")
    assert not policy.decide("gateway", "POST /healthz", nobody).allowed
    assert not policy.decide("gateway", "GET /healthz/../v1/accounts", nobody).allowed
    assert not policy.decide("risk", "/grpc.health.v2.Health/Check", nobody).allowed


# -- hot reload and failing closed --------------------------------------------------------


def test_edit_takes_effect_without_restart(policy_file: Path, policy: Policy) -> None:
    gateway = caller(GW_ID)
    assert not policy.decide("risk", ASSESS, gateway).allowed

    write_rules(policy_file, rule("risk", [ASSESS], [GW_ID, TE_ID]))
    assert policy.decide("risk", ASSESS, gateway).allowed
    # Rules dropped by the edit no longer apply.
    assert not policy.decide("transfer-engine", f"{LEDGER}/GetAccount", gateway).allowed

    write_rules(policy_file)
    assert not policy.decide("risk", ASSESS, gateway).allowed


def test_atomically_replaced_file_is_picked_up(policy_file: Path, policy: Policy) -> None:
    staged = policy_file.with_name("staged.json")
    write_rules(staged, rule("risk", [f"{ASSESS}*"], [GW_ID]))
    staged.replace(policy_file)
    assert policy.decide("risk", ASSESS, caller(GW_ID)).allowed


def test_same_size_edit_with_the_old_mtime_is_picked_up(policy_file: Path) -> None:
    write_rules(policy_file, rule("risk", [ASSESS], [TE_ID]))
    policy = Policy(policy_file, TD)
    old = policy_file.stat()
    revoked = TE_ID.replace("/zone/az1/", "/zone/az2/")  # same length: same file size
    staged = policy_file.with_name("staged.json")
    write_rules(staged, rule("risk", [ASSESS], [revoked]))
    os.utime(staged, ns=(old.st_atime_ns, old.st_mtime_ns))
    staged.replace(policy_file)
    assert policy_file.stat().st_size == old.st_size
    assert not policy.decide("risk", ASSESS, caller(TE_ID)).allowed


def test_broken_file_denies_everything_until_fixed(policy_file: Path, policy: Policy) -> None:
    te = caller(TE_ID)
    assert policy.decide("risk", ASSESS, te).allowed

    policy_file.write_text('{"rules": [')
    decision = policy.decide("risk", ASSESS, te)
    assert not decision.allowed
    assert decision.reason.startswith("policy unavailable: invalid policy")
    assert not policy.decide("transfer-engine", f"{LEDGER}/GetAccount", caller(GW_ID)).allowed
    # Health keeps answering: the service is up, only authorization is closed, and readiness
    # says why.
    assert policy.decide("risk", "/grpc.health.v1.Health/Check", te).allowed
    assert policy.problem() == decision.reason

    write_rules(policy_file, rule("risk", [ASSESS], [TE_ID]))
    assert policy.decide("risk", ASSESS, te).allowed
    assert policy.problem() is None


def test_file_deleted_after_start_denies_with_the_path(policy_file: Path, policy: Policy) -> None:
    policy_file.unlink()
    decision = policy.decide("risk", ASSESS, caller(TE_ID))
    assert not decision.allowed
    assert str(policy_file) in decision.reason

    write_rules(policy_file, rule("risk", [ASSESS], [TE_ID]))
    assert policy.decide("risk", ASSESS, caller(TE_ID)).allowed


def test_invalid_spiffe_id_after_start_denies_everything(policy_file: Path, policy: Policy) -> None:
    write_rules(
        policy_file,
        rule("risk", [ASSESS], [TE_ID]),
        rule("gateway", ["*"], ["https://not-spiffe/teller"]),
    )
    decision = policy.decide("risk", ASSESS, caller(TE_ID))
    assert not decision.allowed
    assert "not-spiffe" in decision.reason


# -- construction --------------------------------------------------------------------------


def test_missing_file_at_start_raises(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy\.json"):
        Policy(tmp_path / "policy.json", TD)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "invalid policy"),
        ("[]", "invalid policy"),
        ('{"policies": []}', "rules"),
        ('{"rules": [{"service": "risk", "methods": ["*"]}]}', "callers"),
        ('{"rules": [{"service": "risk", "methods": [], "callers": []}]}', "at least one method"),
        ('{"rules": [{"service": 7, "methods": ["*"], "callers": []}]}', "service"),
        (
            '{"rules": [{"service": "risk", "methods": ["*"], "callers": ["spiffe://Bad.Domain/x"]}]}',
            "Bad.Domain",
        ),
        (
            '{"rules": [{"service": "risk", "methods": ["*"], "callers": ["spiffe://{trust_domain}/a/../b"]}]}',
            "not a valid SPIFFE ID",
        ),
        ('{"rules": [{"service": "risk", "methods": ["*"], "callers": ["teller"]}]}', "teller"),
    ],
)
def test_invalid_file_at_start_raises(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        Policy(path, TD)


def test_methods_given_as_a_string_are_rejected_not_split_into_characters(tmp_path: Path) -> None:
    # Split into characters, "/...Assess*" would contain the pattern "*": every method allowed.
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [rule("risk", f"{ASSESS}*", [TE_ID])]}))  # type: ignore[arg-type]
    with pytest.raises(PolicyError):
        Policy(path, TD)


def test_methods_edited_into_a_string_deny_everything(policy_file: Path, policy: Policy) -> None:
    policy_file.write_text(json.dumps({"rules": [rule("risk", "*", [TE_ID])]}))  # type: ignore[arg-type]
    decision = policy.decide("risk", "/ztbank.admin.v1.Admin/DropLedger", caller(TE_ID))
    assert not decision.allowed
    assert decision.reason.startswith("policy unavailable")
    assert not policy.decide("risk", ASSESS, caller(TE_ID)).allowed


def test_non_string_caller_at_start_raises_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"rules": [rule("risk", [ASSESS], [5])]}))  # type: ignore[list-item]
    with pytest.raises(PolicyError):
        Policy(path, TD)


def test_non_string_caller_after_start_denies_everything(
    policy_file: Path, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy_file.write_text(json.dumps({"rules": [rule("risk", [ASSESS], [TE_ID, 5])]}))  # type: ignore[list-item]
    decisions: list[Decision | None] = []
    for _ in range(2):
        try:
            decisions.append(policy.decide("risk", ASSESS, caller(TE_ID)))
        except AttributeError:
            decisions.append(None)
        # The next call must not dodge the check by falling inside the reload interval.
        monkeypatch.setattr(policy_module, "RELOAD_CHECK_SECONDS", 3600.0)
    for decision in decisions:
        assert decision is not None
        assert not decision.allowed
        assert decision.reason.startswith("policy unavailable")


# -- the repository's policy ------------------------------------------------------------------


def _methods(service: Any) -> list[str]:
    return [f"/{service.full_name}/{method.name}" for method in service.methods]


ENGINE_METHODS = _methods(ledger_pb2.DESCRIPTOR.services_by_name["TransferEngine"])
RISK_METHODS = _methods(risk_pb2.DESCRIPTOR.services_by_name["Risk"])
GATEWAY_METHODS = [
    "GET /v1/accounts",
    "GET /v1/accounts/acc-1/transactions",
    "POST /v1/transfers",
    "GET /v1/transfers/t-1",
    "POST /v1/tokens",
]
METHODS_BY_SERVICE = {
    "gateway": [*GATEWAY_METHODS, "GET /admin", "GET /v2/accounts"],
    "transfer-engine": [*ENGINE_METHODS, "/ztbank.ledger.v1.Admin/Reset"],
    "risk": [*RISK_METHODS, "/ztbank.risk.v1.Risk/Override"],
}
ALLOWED = (
    {(TELLER.name, "gateway", method) for method in GATEWAY_METHODS}
    | {(GATEWAY.name, "transfer-engine", method) for method in ENGINE_METHODS}
    | {(TRANSFER_ENGINE.name, "risk", ASSESS)}
)
CALLERS = (TELLER, GATEWAY, TRANSFER_ENGINE, RISK, OPS, CONSOLE)
MATRIX = [
    (who, service, method)
    for who, (service, methods) in itertools.product(CALLERS, METHODS_BY_SERVICE.items())
    for method in methods
]


def test_repository_policy_covers_real_rpc_names() -> None:
    assert "/ztbank.ledger.v1.TransferEngine/CreateTransfer" in ENGINE_METHODS
    assert RISK_METHODS == [ASSESS]


@pytest.mark.parametrize(
    ("who", "service", "method"),
    MATRIX,
    ids=[f"{w.name}->{s}:{m}" for w, s, m in MATRIX],
)
def test_repository_policy(who: Workload, service: str, method: str) -> None:
    policy = Policy(REPO_POLICY, TD)
    expected = (who.name, service, method) in ALLOWED
    assert policy.decide(service, method, who.spiffe_id(TD)).allowed is expected


def test_repository_policy_follows_the_trust_domain() -> None:
    policy = Policy(REPO_POLICY, "bank.test")
    assert policy.decide("risk", ASSESS, TRANSFER_ENGINE.spiffe_id("bank.test")).allowed
    assert not policy.decide("risk", ASSESS, TRANSFER_ENGINE.spiffe_id(TD)).allowed


@pytest.mark.parametrize("who", CALLERS, ids=[w.name for w in CALLERS])
def test_repository_policy_lets_every_workload_probe_health(who: Workload) -> None:
    policy = Policy(REPO_POLICY, TD)
    for service in ("transfer-engine", "risk"):
        assert policy.decide(service, "/grpc.health.v1.Health/Check", who.spiffe_id(TD)).allowed
    assert policy.decide("gateway", "GET /healthz", who.spiffe_id(TD)).allowed
