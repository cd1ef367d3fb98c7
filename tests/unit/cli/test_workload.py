"""``ztbank workload`` and ``ztbank env`` without a stack: what is refused before anything
changes, the policy edits, and the printed environment (the e2e suite runs them on a stack)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import cast

import pytest
from fastapi.routing import APIRoute

from services.cli import main as cli
from services.cli.commands.env import compose_environment, format_environment
from services.cli.commands.workload import (
    Target,
    grant,
    parse_target,
    scheme_name,
    withdraw,
    workload_id,
)
from services.cli.errors import CliError, UsageError
from services.common.authz.policy import parse_policy
from services.common.identity.spiffe_id import DEFAULT_TRUST_DOMAIN
from services.common.identity.workloads import TELLER
from services.common.runtime.health import ServiceHealth
from services.gateway.domain.banking import Banking
from services.gateway.domain.tokens import CustomerTokens
from services.gateway.route_table import GATEWAY_ROUTES
from services.gateway.transport.routes import create_router
from tests.support.fake_docker import HEALTHY, FakeDocker, inspected, stack_with
from tests.support.helpers import scrub_environment

REPO_POLICY = Path(__file__).resolve().parents[3] / "infra" / "policy.json"
MY_APP = workload_id(DEFAULT_TRUST_DOMAIN, "my-app", "payments", "prod")


@pytest.fixture(autouse=True)
def no_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty ZTBANK_HOME: no issuer, no gateway."""
    scrub_environment(monkeypatch)
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZTBANK_CERTS_DIR", str(tmp_path / "certs"))
    # `env` falls back to a running compose project: none of this name has containers.
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", f"ztbank-unit-{tmp_path.name}")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "My_App", "--team", "payments"], "name 'My_App' must be 1-63 lowercase"),
        (["add", "my-app", "--team", "Pay/ments"], "--team 'Pay/ments' must be"),
        (["add", "my-app", "--team", "payments", "--env", "prod-"], "--env 'prod-' must be"),
        (["add", "gateway", "--team", "channels"], "'gateway' is one of the stack's own names"),
        (["add", "a" * 64, "--team", "payments"], "must be 1-63"),
        (
            ["add", "my-app", "--team", "payments", "--may-call", "vault:/v1/*"],
            "unknown target; use SERVICE:PATTERN with SERVICE one of gateway, transfer-engine",
        ),
        (
            ["add", "my-app", "--team", "payments", "--may-call", "gateway:/v2/*"],
            "gateway serves nothing that matches '* /v2/*'",
        ),
        (["add", "my-app", "--team", "p", "--may-call", "gateway"], "unknown target"),
        (["add", "my-app", "--team", "payments", "--uid", "-1"], "--uid -1: must be a uid"),
        (["remove", "teller"], "'teller' is one of the stack's own workloads"),
        (["remove", "../x"], "name '../x' must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_the_issuer_is_asked(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "workload", *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("ztbank: ")
    assert message in err
    assert "Traceback" not in err


def test_a_name_whose_socket_path_would_not_fit_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ZTBANK_HOME", str(tmp_path / ("h" * 60)))
    code, _, err = run(capsys, "workload", "add", "a" * 50, "--team", "payments")
    assert code == 2
    assert "would be longer than 107 bytes" in err


def test_without_a_stack_add_list_and_env_fail_with_the_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (
        ["workload", "add", "my-app", "--team", "payments"],
        ["workload", "list"],
        ["env", "--workload", "my-app"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 1, argv
        assert out == ""
        assert err.count("\n") == 1
        assert "is the stack up?" in err


def test_may_call_maps_to_the_policy_method_patterns() -> None:
    assert parse_target("gateway:/v1/*") == Target("gateway", "* /v1/*")
    assert parse_target("gateway:GET /v1/accounts*") == Target("gateway", "GET /v1/accounts*")
    assert parse_target("transfer-engine:/ztbank.ledger.v1.TransferEngine/*") == Target(
        "transfer-engine", "/ztbank.ledger.v1.TransferEngine/*"
    )
    assert parse_target("risk:/ztbank.risk.v1.Risk/Assess").service == "risk"


def test_gateway_routes_are_the_routes_the_gateway_serves() -> None:
    # Built with no engine or keys: only the route table is read.
    router = create_router(
        banking=cast(Banking, None),
        tokens=cast(CustomerTokens, None),
        teller_id=TELLER.spiffe_id(DEFAULT_TRUST_DOMAIN),
        health=ServiceHealth("gateway"),
    )
    served = {
        f"{method} {route.path}"
        for route in router.routes
        if isinstance(route, APIRoute) and route.path not in ("/livez", "/readyz", "/healthz")
        for method in route.methods or ()
    }
    # /openapi.json is FastAPI's own route, on the app rather than the router.
    assert served | {"GET /openapi.json"} == set(GATEWAY_ROUTES)


def test_grant_then_withdraw_gives_back_the_policy_byte_for_byte() -> None:
    original = REPO_POLICY.read_text()
    granted, added = grant(original, DEFAULT_TRUST_DOMAIN, MY_APP, [Target("gateway", "* /v1/*")])
    assert added == [Target("gateway", "* /v1/*")]
    rules = parse_policy(granted, DEFAULT_TRUST_DOMAIN)
    assert any(r.service == "gateway" and str(MY_APP) in r.callers for r in rules)
    # the new rule is the only change: one rule's lines appended
    assert granted.startswith(original.rstrip().removesuffix("]\n}").rstrip()[:-1])
    again, added_again = grant(
        granted, DEFAULT_TRUST_DOMAIN, MY_APP, [Target("gateway", "* /v1/*")]
    )
    assert (again, added_again) == (granted, [])
    restored, removed = withdraw(granted, DEFAULT_TRUST_DOMAIN, MY_APP)
    assert removed == [Target("gateway", "* /v1/*")]
    assert restored == original


def test_withdraw_keeps_the_other_callers_of_a_shared_rule() -> None:
    teller = TELLER.spiffe_id(DEFAULT_TRUST_DOMAIN)
    text, removed = withdraw(REPO_POLICY.read_text(), DEFAULT_TRUST_DOMAIN, teller)
    assert {t.service for t in removed} == {"gateway"}
    remaining = parse_policy(text, DEFAULT_TRUST_DOMAIN)
    assert len(remaining) == 2
    assert all(str(teller) not in r.callers for r in remaining)


def test_scheme_names() -> None:
    assert scheme_name(str(MY_APP)) == "my-app"
    assert scheme_name("spiffe://ztbank.example/ns/x/sa/y") is None
    assert scheme_name("spiffe://ztbank.example/env/prod/zone/az1/team/t/svc/a/extra") is None


VALUES = {
    "ZTBANK_GATEWAY_URL": "https://127.0.0.1:8443",
    "ZTBANK_TRUST_BUNDLE": "/tmp/a dir/root-ca.pem",  # a space: quoting matters
    "SPIFFE_ENDPOINT_SOCKET": "unix:///tmp/a dir/run/my-app/agent.sock",
}


def test_the_shell_format_evaluates_to_the_values() -> None:
    script = format_environment(VALUES, "shell")
    shown = subprocess.run(
        ["bash", "-c", 'eval "$1"; env -0', "bash", script],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    seen = dict(line.partition("=")[::2] for line in shown.split("\0") if line)
    assert {name: seen[name] for name in VALUES} == VALUES


def test_dotenv_is_verbatim_and_json_is_an_object() -> None:
    assert format_environment(VALUES, "dotenv").splitlines() == [
        f"{name}={value}" for name, value in VALUES.items()
    ]
    assert json.loads(format_environment(VALUES, "json")) == VALUES


def test_a_bad_format_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["env", "--format", "yaml"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


# -- env on the compose stack (make test-compose runs it against a real one) -----------------

COMPOSE_TEAM_APP = "spiffe://ztbank.example/env/prod/zone/az1/team/qa/svc/ci-app"


def listed(*rows: tuple[str, list[str]]) -> str:
    return json.dumps(
        [
            {"name": name, "spiffe_id": COMPOSE_TEAM_APP, "selectors": selectors, "stack": False}
            for name, selectors in rows
        ]
    )


def test_compose_env_names_what_a_client_container_sees(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)
    fake.on("exec", "issuer", "list", out=listed(("ci-app", ["unix:uid:10043"])))

    values = compose_environment(stack, "ci-app")

    assert values == {
        "ZTBANK_TRUST_DOMAIN": "ztbank.example",
        "ZTBANK_GATEWAY_URL": "https://gateway:8443",
        "ZTBANK_GATEWAY_SPIFFE_ID": "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/gateway",
        "ZTBANK_CRL_URL": "http://issuer:8180/crls",
        "ZTBANK_OCSP_URL": "http://issuer:8180/ocsp",
        "ZTBANK_COMPOSE_NETWORK": "ztbank-test_default",
        "ZTBANK_WORKLOAD_API_VOLUME": "ztbank-test_workload-api",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///spiffe-workload-api/workload.sock",
        "ZTBANK_WORKLOAD_SPIFFE_ID": COMPOSE_TEAM_APP,
        "ZTBANK_WORKLOAD_UID": "10043",
    }
    (exec_call,) = [fake.calls[i] for i in fake.called("exec")]
    assert exec_call[-6:] == ["-T", "issuer", "ztbank", "workload", "list", "--json"]


def test_compose_env_without_a_workload_asks_the_issuer_nothing(tmp_path: Path) -> None:
    fake = FakeDocker()
    values = compose_environment(stack_with(fake, tmp_path, HEALTHY), None)
    assert "SPIFFE_ENDPOINT_SOCKET" not in values
    assert values["ZTBANK_GATEWAY_URL"] == "https://gateway:8443"
    assert fake.called("exec") == []


def test_compose_env_refuses_a_stack_whose_gateway_is_not_ready(tmp_path: Path) -> None:
    starting = [*HEALTHY[:3], inspected("gateway", "running", "starting")]
    with pytest.raises(CliError, match=r"^compose project ztbank-test: gateway not ready"):
        compose_environment(stack_with(FakeDocker(), tmp_path, starting), None)


def test_compose_env_for_an_unknown_workload_says_how_to_onboard_it(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)
    fake.on("exec", "issuer", "list", out=listed(("other", ["unix:uid:10050"])))
    with pytest.raises(UsageError, match="ztbank workload add ci-app --team TEAM --uid UID"):
        compose_environment(stack, "ci-app")


@pytest.mark.parametrize(("rc", "out"), [(1, ""), (0, "Traceback (most recent call last):")])
def test_compose_env_when_the_issuer_cannot_list_is_one_line(
    tmp_path: Path, rc: int, out: str
) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)
    fake.on("exec", "issuer", "list", rc=rc, out=out)
    with pytest.raises(CliError, match="`ztbank workload list` failed in ztbank-test's issuer"):
        compose_environment(stack, "ci-app")
