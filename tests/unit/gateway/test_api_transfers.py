from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.problem import PROBLEM_MEDIA_TYPE
from services.gateway.domain.ledger import Transfer
from services.gateway.errors import (
    ConflictError,
    EngineError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
)
from tests.unit.gateway.fakes import (
    ALICE_CURRENT,
    ALICE_SAVINGS,
    BOB_CURRENT,
    MULE,
    FakeTransferEngine,
)


def order(amount: Any = "12.34", to: str = BOB_CURRENT, **changes: Any) -> dict[str, Any]:
    return {
        "from_account": ALICE_CURRENT,
        "to_account": to,
        "amount": amount,
        "currency": "CNY",
        **changes,
    }


def send(client: TestClient, headers: dict[str, str], body: Any, key: str | None = "key-1") -> Any:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return client.post("/v1/transfers", json=body, headers={**headers, **extra})


def balance(client: TestClient, headers: dict[str, str], account_id: str) -> str:
    response = client.get(f"/v1/accounts/{account_id}", headers=headers)
    return str(response.json()["balance"])


def test_posted_transfer_is_201(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    response = send(client, alice, order())

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {
        "id": body["id"],
        "status": "posted",
        "from_account": ALICE_CURRENT,
        "to_account": BOB_CURRENT,
        "amount": "12.34",
        "currency": "CNY",
        "risk": {"decision": "allow", "reasons": [], "score": 5},
        "created_at": "2026-11-28T09:30:00+00:00",
    }
    assert response.headers["location"] == f"/v1/transfers/{body['id']}"
    assert "idempotent-replayed" not in response.headers
    assert balance(client, alice, ALICE_CURRENT) == "9987.66"
    assert balance(client, bob, BOB_CURRENT) == "135.79"
    assert client.get(f"/v1/transfers/{body['id']}", headers=alice).json() == body


def test_held_for_review_is_202(client: TestClient, alice: dict[str, str]) -> None:
    response = send(client, alice, order("5000.01"))

    assert response.status_code == 202
    assert response.json()["status"] == "review"
    assert response.json()["risk"] == {
        "decision": "review",
        "reasons": ["large_amount"],
        "score": 60,
    }
    assert balance(client, alice, ALICE_CURRENT) == "10000.00"


def test_risk_denial_is_a_422_problem_with_the_transfer(
    client: TestClient, alice: dict[str, str]
) -> None:
    response = send(client, alice, order("1.00", to=MULE))

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem = response.json()
    assert problem["type"].endswith(":transfer-rejected")
    assert problem["status"] == 422
    assert problem["reasons"] == ["risk_denied", "counterparty_blocklisted"]
    assert problem["transfer_id"] == problem["transfer"]["id"]
    assert problem["instance"] == f"/v1/transfers/{problem['transfer_id']}"
    assert problem["transfer"]["status"] == "rejected"
    assert problem["transfer"]["risk"]["decision"] == "deny"
    assert balance(client, alice, ALICE_CURRENT) == "10000.00"


def test_insufficient_funds_is_a_422_problem(client: TestClient, alice: dict[str, str]) -> None:
    response = send(client, alice, order("50.01", from_account=ALICE_SAVINGS))

    assert response.status_code == 422
    problem = response.json()
    assert problem["type"].endswith(":transfer-rejected")
    assert problem["transfer"]["risk"] is None
    assert problem["reasons"] == ["insufficient_funds"]
    assert balance(client, alice, ALICE_SAVINGS) == "50.00"


@pytest.mark.parametrize(
    ("amount", "to", "status"),
    [("12.34", BOB_CURRENT, 201), ("6000", BOB_CURRENT, 202), ("1", MULE, 422)],
)
def test_a_replay_answers_the_same(
    client: TestClient,
    alice: dict[str, str],
    engine: FakeTransferEngine,
    amount: str,
    to: str,
    status: int,
) -> None:
    first = send(client, alice, order(amount, to=to))
    after_first = balance(client, alice, ALICE_CURRENT)

    again = send(client, alice, order(amount, to=to))

    assert first.status_code == again.status_code == status
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert balance(client, alice, ALICE_CURRENT) == after_first
    assert len(engine.transfers) == 1


def test_same_key_with_another_body_is_409(client: TestClient, alice: dict[str, str]) -> None:
    assert send(client, alice, order("12.34")).status_code == 201

    response = send(client, alice, order("12.35"))

    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert balance(client, alice, ALICE_CURRENT) == "9987.66"


@pytest.mark.parametrize(("replayed", "status"), [(True, 409), (False, 502)])
def test_an_engine_answer_for_another_order_is_refused(
    client: TestClient,
    alice: dict[str, str],
    engine: FakeTransferEngine,
    monkeypatch: pytest.MonkeyPatch,
    replayed: bool,
    status: int,
) -> None:
    stored = engine.transfers[send(client, alice, order("12.34")).json()["id"]]

    async def answer_stored(*_: object) -> Transfer:
        return replace(stored, replayed=replayed)

    monkeypatch.setattr(engine, "create_transfer", answer_stored)

    response = send(client, alice, order("99.99"))

    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


@pytest.mark.parametrize("key", [None, "", "k" * 129, "key with spaces", "ключ"])
def test_idempotency_key_missing_or_invalid_is_400(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine, key: str | None
) -> None:
    headers = dict(alice)
    if key is not None:
        headers["Idempotency-Key"] = key
    response = client.post(
        "/v1/transfers",
        json=order(),
        headers={name.encode(): value.encode() for name, value in headers.items()},
    )

    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert "Idempotency-Key" in response.json()["detail"]
    assert "create_transfer" not in engine.calls


def test_idempotency_key_of_128_characters_is_fine(
    client: TestClient, alice: dict[str, str]
) -> None:
    assert send(client, alice, order(), key="k" * 128).status_code == 201


@pytest.mark.parametrize("source", [ALICE_CURRENT, "acc-nobody-1"])
def test_from_someone_elses_or_a_missing_account_is_the_same_403(
    client: TestClient, bob: dict[str, str], engine: FakeTransferEngine, source: str
) -> None:
    before = dict(engine.accounts)

    response = send(client, bob, order(from_account=source))

    assert response.status_code == 403
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["detail"] == f"account {source!r} is not one of your accounts"
    assert engine.accounts == before


def test_to_an_unknown_account_is_404(client: TestClient, alice: dict[str, str]) -> None:
    response = send(client, alice, order(to="acc-nobody-1"))

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


@pytest.mark.parametrize(
    "body",
    [
        order(to=ALICE_CURRENT),  # to itself
        order(currency="USD"),  # not a currency the bank holds
    ],
)
def test_impossible_orders_are_422(client: TestClient, alice: dict[str, str], body: Any) -> None:
    response = send(client, alice, body)

    assert response.status_code == 422
    assert response.json()["type"].endswith(":invalid-request")


@pytest.mark.parametrize(
    "body",
    [
        {key: value for key, value in order().items() if key != "amount"},
        {key: value for key, value in order().items() if key != "to_account"},
        order("1e3"),
        order("-5"),
        order("0.001"),
        order("0"),
        order("abc"),
        order(""),
        order(" 5"),
        order("NaN"),
        order("Infinity"),
        order("99999999999999999999"),
        order("100000000000.01"),
        order("9" * 1000),
        order(12.34),  # a JSON number, even an exact one, is not an amount
        order(5),
        order(None),
        order(True),
        order({"value": "1"}),
        order(currency="cny"),
        order(currency=None),
        order(extra="field"),
        order(from_account=7),
        order(from_account="../acc-bob-1"),
        [order()],
        "12.34",
        None,
        {},
    ],
)
def test_malformed_bodies_are_4xx_problems(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine, body: Any
) -> None:
    response = send(client, alice, body)

    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["status"] == response.status_code
    assert "create_transfer" not in engine.calls
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b'{"amount": 1' + b"0" * 5000 + b"}",  # beyond Python's int-parsing limit
        b'{"amount": 1e999}',
        b'{"amount": NaN}',
        b"\xff\xfe",
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_bodies_that_are_not_json_are_4xx_problems(
    client: TestClient, alice: dict[str, str], raw: bytes
) -> None:
    response = client.post(
        "/v1/transfers",
        content=raw,
        headers={**alice, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )

    assert 400 <= response.status_code < 500
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_a_body_that_is_not_declared_json_is_422(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/transfers",
        content=b'{"from_account": "acc-alice-1"}',
        headers={**alice, "Idempotency-Key": "k", "Content-Type": "text/plain"},
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (EngineUnavailableError("down"), 503),
        (EngineError("internal"), 502),
        (ConflictError("already exists"), 409),
        (InvalidRequestError("currency mismatch"), 422),
        (GatewayError("unmapped"), 500),
    ],
)
def test_engine_failures_become_problems(
    client: TestClient,
    alice: dict[str, str],
    engine: FakeTransferEngine,
    failure: GatewayError,
    status: int,
) -> None:
    engine.failure = failure

    response = send(client, alice, order())

    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert ("retry-after" in response.headers) is (status == 503)


def test_get_transfer_of_someone_else_is_403_and_unknown_404(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    transfer_id = send(client, alice, order()).json()["id"]

    assert client.get(f"/v1/transfers/{transfer_id}", headers=bob).status_code == 403
    assert client.get("/v1/transfers/tr-9999", headers=alice).status_code == 404
    assert client.get("/v1/transfers/tr%209999", headers=alice).status_code == 422
