"""The API contract: /openapi.json lists every status each operation really answers, and the
repository's policy hands the schema to the teller alone.

The live check (schemathesis against a running stack) is tests/e2e/test_api_contract.py; here
the same promises are pinned down without processes: the statuses documented per operation, and
for each status an operation can answer, a request that gets it from the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.authz.policy import Policy
from services.common.identity.workloads import GATEWAY, OPS, RISK, TELLER, TRANSFER_ENGINE, Workload
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.gateway.errors import EngineError, EngineUnavailableError, GatewayError
from services.gateway.transport.limits import MAX_BODY_BYTES
from tests.unit.gateway.fakes import ALICE_CURRENT, BOB_CURRENT, FakeTransferEngine

REPO_POLICY = Path(__file__).resolve().parents[3] / "infra" / "policy.json"
TD = "ztbank.example"

# Answered in front of every route by the mTLS server (policy 403, shed 503) and the body limit.
IN_FRONT = {"403", "413", "503"}
ENGINE = {"502", "503"}
HEALTH_PATHS = ("/livez", "/readyz", "/healthz")
DOCUMENTED = {
    **{("get", path): {"200", "413", "503"} for path in HEALTH_PATHS},
    ("post", "/v1/tokens"): {"201", "400", "422"} | IN_FRONT | ENGINE,
    ("get", "/v1/accounts"): {"200", "401"} | IN_FRONT | ENGINE,
    ("get", "/v1/accounts/{account_id}"): {"200", "401", "404", "422"} | IN_FRONT | ENGINE,
    ("get", "/v1/accounts/{account_id}/transactions"): {"200", "401", "404", "422"}
    | IN_FRONT
    | ENGINE,
    ("post", "/v1/transfers"): {"201", "202", "400", "401", "404", "409", "422"}
    | IN_FRONT
    | ENGINE,
    ("get", "/v1/transfers/{transfer_id}"): {"200", "401", "404", "422"} | IN_FRONT | ENGINE,
}
NOT_UTF8 = b'{"customer": "\xff\xfe"}'


def responses(openapi: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    documented: dict[str, Any] = openapi["paths"][path][method]["responses"]
    return documented


@pytest.mark.parametrize(("method", "path"), sorted(DOCUMENTED), ids=str)
def test_each_operation_lists_the_statuses_it_answers(
    openapi: dict[str, Any], method: str, path: str
) -> None:
    assert set(responses(openapi, method, path)) == DOCUMENTED[(method, path)]


def test_refusals_in_front_of_the_routes_are_described(openapi: dict[str, Any]) -> None:
    for method, path in DOCUMENTED:
        documented = responses(openapi, method, path)
        assert str(MAX_BODY_BYTES) in documented["413"]["description"]
        assert "in flight" in documented["503"]["description"]
        if path in HEALTH_PATHS:
            assert "not live" in documented["503"]["description"] or (
                "not ready" in documented["503"]["description"]
            )
        assert documented["503"]["headers"]["Retry-After"]["required"] is True
        if path not in HEALTH_PATHS:
            assert "policy" in documented["403"]["description"]
        if "401" in documented:
            assert documented["401"]["headers"]["WWW-Authenticate"]["required"] is True
        for status, response in documented.items():
            if int(status) >= 400:
                assert list(response["content"]) == [PROBLEM_MEDIA_TYPE], (method, path, status)


def test_created_transfers_document_their_location(openapi: dict[str, Any]) -> None:
    documented = responses(openapi, "post", "/v1/transfers")
    for status in ("201", "202"):
        assert documented[status]["headers"]["Location"]["required"] is True
        assert documented[status]["headers"]["Idempotent-Replayed"]["schema"]["enum"] == ["true"]


TRANSFER = {"from_account": ALICE_CURRENT, "to_account": BOB_CURRENT, "currency": "CNY"}
JSON = {"Content-Type": "application/json"}


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


# One request per (operation, status) the app itself answers: the status it gets must be one the
# schema lists for that operation.  (The mTLS server's 403 and shed 503 are not the app's.)
ANSWERS: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("POST", "/v1/tokens", "/v1/tokens", {"content": NOT_UTF8, "headers": JSON}, 400),
    ("POST", "/v1/tokens", "/v1/tokens", {"json": {"customer": "nobody"}}, 422),
    ("POST", "/v1/tokens", "/v1/tokens", {"content": b'{"customer": "alice"}'}, 422),
    ("POST", "/v1/tokens", "/v1/tokens", {"content": b" " * (MAX_BODY_BYTES + 1)}, 413),
    ("GET", f"/v1/accounts/{BOB_CURRENT}", "/v1/accounts/{account_id}", {}, 403),
    ("GET", f"/v1/accounts/{ALICE_CURRENT}%2Fx", "/v1/accounts/{account_id}", {}, 404),
    ("GET", "/v1/accounts/-x", "/v1/accounts/{account_id}", {}, 422),
    (
        "GET",
        f"/v1/accounts/{ALICE_CURRENT}/transactions?from=2024-13-01",
        "/v1/accounts/{account_id}/transactions",
        {},
        422,
    ),
    ("GET", "/v1/transfers/tr-none", "/v1/transfers/{transfer_id}", {}, 404),
    ("POST", "/v1/transfers", "/v1/transfers", {"json": {**TRANSFER, "amount": "1.00"}}, 400),
    (
        "POST",
        "/v1/transfers",
        "/v1/transfers",
        {"json": {**TRANSFER, "to_account": "acc-nobody", "amount": "1.00"}, "headers": key("a")},
        404,
    ),
    (
        "POST",
        "/v1/transfers",
        "/v1/transfers",
        {
            "json": {
                **TRANSFER,
                "from_account": BOB_CURRENT,
                "to_account": ALICE_CURRENT,
                "amount": "1",
            },
            "headers": key("b"),
        },
        403,
    ),
    (
        "POST",
        "/v1/transfers",
        "/v1/transfers",
        {"content": NOT_UTF8, "headers": {**JSON, **key("c")}},
        400,
    ),
    (
        "POST",
        "/v1/transfers",
        "/v1/transfers",
        {"json": {**TRANSFER, "amount": "x"}, "headers": key("d")},
        422,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "operation", "request_kwargs", "status"),
    ANSWERS,
    ids=[f"{m} {p} {s}" for m, p, _, _, s in ANSWERS],
)
def test_what_the_app_answers_is_documented(
    client: TestClient,
    openapi: dict[str, Any],
    alice: dict[str, str],
    method: str,
    path: str,
    operation: str,
    request_kwargs: dict[str, Any],
    status: int,
) -> None:
    kwargs = {**request_kwargs, "headers": {**alice, **request_kwargs.get("headers", {})}}

    response = client.request(method, path, **kwargs)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert str(status) in responses(openapi, method.lower(), operation)


def test_a_reused_idempotency_key_is_a_documented_409(
    client: TestClient, openapi: dict[str, Any], alice: dict[str, str]
) -> None:
    headers = {**alice, "Idempotency-Key": "same-key"}
    first = client.post("/v1/transfers", json={**TRANSFER, "amount": "1.00"}, headers=headers)
    assert first.status_code == 201

    second = client.post("/v1/transfers", json={**TRANSFER, "amount": "2.00"}, headers=headers)

    assert second.status_code == 409
    assert "409" in responses(openapi, "post", "/v1/transfers")


@pytest.mark.parametrize(
    ("failure", "status"), [(EngineUnavailableError("down"), 503), (EngineError("bad"), 502)]
)
def test_engine_failures_are_documented_on_every_customer_operation(
    client: TestClient,
    openapi: dict[str, Any],
    engine: FakeTransferEngine,
    alice: dict[str, str],
    failure: GatewayError,
    status: int,
) -> None:
    engine.failure = failure

    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == status
    for path, item in openapi["paths"].items():
        for method in item:
            if path.startswith("/v1/"):
                assert str(status) in responses(openapi, method, path), (method, path)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_there_are_no_docs_pages(client: TestClient, path: str) -> None:
    # Their pages would load Swagger UI or ReDoc from a CDN, which offline installs cannot reach.
    response = client.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


# -- who gets the schema ------------------------------------------------------------------------


def test_the_teller_may_fetch_the_schema() -> None:
    policy = Policy(REPO_POLICY, TD)

    assert policy.decide(GATEWAY.name, "GET /openapi.json", TELLER.spiffe_id(TD)).allowed


@pytest.mark.parametrize("who", [OPS, GATEWAY, TRANSFER_ENGINE, RISK], ids=lambda w: w.name)
def test_no_other_caller_may_fetch_the_schema(who: Workload) -> None:
    policy = Policy(REPO_POLICY, TD)

    decision = policy.decide(GATEWAY.name, "GET /openapi.json", who.spiffe_id(TD))

    assert not decision.allowed
    assert "no policy rule allows" in decision.reason


@pytest.mark.parametrize("method", ["POST /openapi.json", "GET /docs", "GET /redoc"])
def test_the_teller_gets_nothing_else_outside_v1(method: str) -> None:
    policy = Policy(REPO_POLICY, TD)

    assert not policy.decide(GATEWAY.name, method, TELLER.spiffe_id(TD)).allowed
