import pytest
from fastapi.testclient import TestClient

from services.common.problem import PROBLEM_MEDIA_TYPE
from services.gateway.domain.ledger import Account
from services.gateway.errors import EngineUnavailableError
from tests.unit.gateway.conftest import bearer
from tests.unit.gateway.fakes import (
    ALICE_CURRENT,
    ALICE_SAVINGS,
    BOB_CURRENT,
    FakeClock,
    FakeTransferEngine,
)


def test_lists_only_the_customers_own_accounts(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "accounts": [
            {"id": ALICE_CURRENT, "name": "Current", "currency": "CNY", "balance": "10000.00"},
            {"id": ALICE_SAVINGS, "name": "Savings", "currency": "CNY", "balance": "50.00"},
        ]
    }
    assert [a["id"] for a in client.get("/v1/accounts", headers=bob).json()["accounts"]] == [
        BOB_CURRENT
    ]


def test_one_own_account(client: TestClient, bob: dict[str, str]) -> None:
    response = client.get(f"/v1/accounts/{BOB_CURRENT}", headers=bob)

    assert response.status_code == 200
    assert response.json() == {
        "id": BOB_CURRENT,
        "name": "Current",
        "currency": "CNY",
        "balance": "123.45",
    }


@pytest.mark.parametrize("account_id", [BOB_CURRENT, "acc-nobody-9"])
def test_someone_elses_or_no_account_is_the_same_403_after_one_engine_call(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine, account_id: str
) -> None:
    """The engine tells "not found" from "not the owner"; the customer gets one answer for
    both, from one engine call per request (no listing of the customer's accounts first)."""
    engine.calls.clear()

    for path in (f"/v1/accounts/{account_id}", f"/v1/accounts/{account_id}/transactions"):
        response = client.get(path, headers=alice)
        assert response.status_code == 403
        assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
        assert response.json()["detail"] == f"account {account_id!r} is not one of your accounts"
        assert "balance" not in response.text
    assert engine.calls == ["get_account", "list_transactions"]


@pytest.mark.parametrize("account_id", ["..", "a" * 65, "acc alice", "-acc", "acc%2F1"])
def test_malformed_account_ids_never_reach_the_engine(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine, account_id: str
) -> None:
    engine.calls.clear()

    response = client.get(f"/v1/accounts/{account_id}", headers=alice)

    assert response.status_code in (404, 422)
    assert engine.calls == []
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_transactions_with_signed_decimal_amounts(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    transfer = {
        "from_account": ALICE_CURRENT,
        "to_account": BOB_CURRENT,
        "amount": "12.3",
        "currency": "CNY",
    }
    posted = client.post("/v1/transfers", json=transfer, headers={**alice, "Idempotency-Key": "t1"})
    assert posted.status_code == 201

    mine = client.get(f"/v1/accounts/{ALICE_CURRENT}/transactions", headers=alice).json()
    theirs = client.get(f"/v1/accounts/{BOB_CURRENT}/transactions", headers=bob).json()

    assert mine["transactions"] == [
        {
            "transfer_id": posted.json()["id"],
            "account_id": ALICE_CURRENT,
            "amount": "-12.30",
            "currency": "CNY",
            "counterparty_account": BOB_CURRENT,
            "balance_after": "9987.70",
            "created_at": posted.json()["created_at"],
        }
    ]
    assert theirs["transactions"][0]["amount"] == "12.30"
    assert theirs["transactions"][0]["balance_after"] == "135.75"
    balance = client.get(f"/v1/accounts/{BOB_CURRENT}", headers=bob).json()["balance"]
    assert balance == "135.75"


def test_transactions_from_a_day(client: TestClient, clock: FakeClock) -> None:
    transfer = {
        "from_account": ALICE_CURRENT,
        "to_account": ALICE_SAVINGS,
        "amount": "1",
        "currency": "CNY",
    }
    for key in ("day-1", "day-2"):
        headers = {**bearer(client, "alice"), "Idempotency-Key": key}
        assert client.post("/v1/transfers", json=transfer, headers=headers).status_code == 201
        clock.advance(86400)
    alice = bearer(client, "alice")
    path = f"/v1/accounts/{ALICE_CURRENT}/transactions"

    everything = client.get(path, headers=alice).json()["transactions"]
    since_day_2 = client.get(path, params={"from": "2026-11-29"}, headers=alice).json()
    future = client.get(path, params={"from": "2030-01-01"}, headers=alice).json()

    assert len(everything) == 2
    assert [t["transfer_id"] for t in since_day_2["transactions"]] == [everything[1]["transfer_id"]]
    assert future == {"transactions": []}


@pytest.mark.parametrize(
    "day",
    [
        "2026-02-30",
        "20260101",
        "2026-1-1",
        "yesterday",
        "",
        "2026-01-01T00:00",
        "1767225600",
        "2026-W01-1",
        "\uff12\uff10\uff12\uff16-01-01",  # fullwidth digits
    ],
)
def test_invalid_from_day_is_422(client: TestClient, alice: dict[str, str], day: str) -> None:
    response = client.get(
        f"/v1/accounts/{ALICE_CURRENT}/transactions", params={"from": day}, headers=alice
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["errors"][0]["location"] == ["query", "from"]


def test_engine_outage_is_503_with_retry_after(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine
) -> None:
    engine.failure = EngineUnavailableError("the transfer-engine is unavailable")

    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert int(response.headers["retry-after"]) > 0


def test_an_open_breaker_says_when_to_retry(
    client: TestClient, alice: dict[str, str], engine: FakeTransferEngine
) -> None:
    engine.failure = EngineUnavailableError("breaker open; retry in 7 s", retry_after_seconds=7)

    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"  # the cool-down left, not a fixed guess


def test_an_engine_that_leaks_another_customers_account_is_502(
    client: TestClient,
    alice: dict[str, str],
    engine: FakeTransferEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def leaky(customer: str) -> list[Account]:
        return list(engine.accounts.values())

    monkeypatch.setattr(engine, "list_accounts", leaky)

    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == 502
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert "acc-bob" not in response.text
