from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, TELLER
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.common.runtime.health import ServiceHealth
from services.gateway.app import create_app
from services.gateway.errors import EngineUnavailableError
from services.gateway.settings import GatewaySettings
from tests.unit.gateway.conftest import OPS_PEER, TRUST_DOMAIN, Caller, peer, with_peer
from tests.unit.gateway.fakes import FakeClock, FakeTransferEngine


def test_the_teller_gets_a_token_for_a_customer(client: TestClient) -> None:
    response = client.post("/v1/tokens", json={"customer": "alice"})

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert response.headers["cache-control"] == "no-store"


def test_token_claims(client: TestClient, clock: FakeClock) -> None:
    token = client.post("/v1/tokens", json={"customer": "bob"}).json()["access_token"]

    header = jwt.get_unverified_header(token)
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "ES256"
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == "bob"
    assert claims["aud"] == "ztbank-gateway"
    assert claims["iss"] == str(GATEWAY.spiffe_id(TRUST_DOMAIN))
    assert claims["iat"] == int(clock().timestamp())
    assert claims["exp"] - claims["iat"] == 600
    assert len(claims["jti"]) >= 16


def test_every_token_has_its_own_id(client: TestClient) -> None:
    tokens = [client.post("/v1/tokens", json={"customer": "alice"}).json() for _ in range(2)]
    ids = {
        jwt.decode(t["access_token"], options={"verify_signature": False})["jti"] for t in tokens
    }
    assert len(ids) == 2


def test_lifetime_follows_the_setting(
    settings: GatewaySettings,
    engine: FakeTransferEngine,
    signing_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
) -> None:
    short = settings.model_copy(update={"token_ttl": settings.token_ttl / 2})
    app = with_peer(
        create_app(short, engine, signing_key, health=ServiceHealth("gateway"), clock=clock),
        Caller(),
    )
    with TestClient(app) as client:
        assert client.post("/v1/tokens", json={"customer": "alice"}).json()["expires_in"] == 300


@pytest.mark.parametrize(
    "identity",
    [
        OPS_PEER,
        peer(GATEWAY.spiffe_id(TRUST_DOMAIN)),
        # The teller's path in another trust domain is not the teller.
        peer(TELLER.spiffe_id("evil.example")),
        peer(SpiffeId.parse(f"{TELLER.spiffe_id(TRUST_DOMAIN)}-2")),
    ],
)
def test_only_the_teller_gets_tokens(client: TestClient, caller: Caller, identity: Any) -> None:
    caller.identity = identity

    response = client.post("/v1/tokens", json={"customer": "alice"})

    assert response.status_code == 403
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert "access_token" not in response.text


def test_no_verified_peer_fails_closed(client: TestClient, caller: Caller) -> None:
    caller.identity = None

    response = client.post("/v1/tokens", json={"customer": "alice"})

    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "instance": "/v1/tokens",
    }


@pytest.mark.parametrize("customer", ["carol", "mallory-2", "nobody"])
def test_customers_without_accounts_get_no_token(client: TestClient, customer: str) -> None:
    response = client.post("/v1/tokens", json={"customer": customer})

    assert response.status_code == 422
    assert response.json()["type"].endswith(":unknown-customer")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"customer": ""},
        {"customer": "Alice"},
        {"customer": "alice bob"},
        {"customer": "alice\n"},
        {"customer": "a" * 65},
        {"customer": 7},
        {"customer": ["alice"]},
        {"customer": "alice", "role": "admin"},
        ["alice"],
    ],
)
def test_malformed_token_requests_are_422(client: TestClient, body: Any) -> None:
    response = client.post("/v1/tokens", json=body)

    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["errors"]


def test_engine_outage_while_issuing_is_503(client: TestClient, engine: FakeTransferEngine) -> None:
    engine.failure = EngineUnavailableError("down")

    response = client.post("/v1/tokens", json={"customer": "alice"})

    assert response.status_code == 503
    assert response.headers["retry-after"].isdigit()
