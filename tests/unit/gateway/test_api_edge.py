from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from services.common.problem import PROBLEM_MEDIA_TYPE
from services.common.runtime.health import ServiceHealth
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.gateway.transport.limits import MAX_BODY_BYTES
from services.gateway.transport.problems import problem_type
from tests.unit.gateway.conftest import Caller, with_peer
from tests.unit.gateway.fakes import FakeTransferEngine


@pytest.mark.parametrize(
    ("path", "status"), [("/livez", "live"), ("/readyz", "ready"), ("/healthz", "ready")]
)
def test_health_needs_no_token(client: TestClient, caller: Caller, path: str, status: str) -> None:
    caller.identity = None  # not even a verified peer: the routes read state only

    response = client.get(path)

    assert response.status_code == 200
    assert response.json() == {"status": status}


@pytest.mark.parametrize("path", ["/readyz", "/healthz"])
def test_not_ready_names_every_reason(client: TestClient, health: ServiceHealth, path: str) -> None:
    full = "audit log not writable: no space left on device"
    breaker = "circuit breaker to transfer-engine open: 5 failures of 10"
    health.require("audit", lambda: full)
    health.require("breaker", lambda: breaker)
    health.require("policy", lambda: None)

    response = client.get(path)

    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json() == {
        "type": problem_type("not-ready"),
        "title": "Not ready",
        "status": 503,
        "detail": f"{full}; {breaker}",
        "reasons": [full, breaker],
    }
    assert client.get("/livez").json() == {"status": "live"}  # a restart would not help


def test_a_stalled_loop_is_not_live(
    settings: GatewaySettings,
    engine: FakeTransferEngine,
    signing_key: ec.EllipticCurvePrivateKey,
) -> None:
    now = [100.0]
    health = ServiceHealth("gateway", clock=lambda: now[0], stall_seconds=10)
    app = create_app(settings, engine, signing_key, health=health)
    with TestClient(with_peer(app, Caller())) as client:
        now[0] += 11
        response = client.get("/livez")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["its event loop has not run for 11s"]
        health.beat()
        assert client.get("/livez").status_code == 200


@pytest.mark.parametrize("path", ["/", "/nope", "/v1", "/v1/accounts/x/y/z", "/v2/accounts"])
def test_unknown_routes_are_404_problems(client: TestClient, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "instance": path,
    }


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/accounts", "GET"),
        ("PUT", "/v1/transfers", "POST"),
        ("GET", "/v1/tokens", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_wrong_methods_are_405_problems(
    client: TestClient, method: str, path: str, allowed: str
) -> None:
    response = client.request(method, path)

    assert response.status_code == 405
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.headers["allow"] == allowed
    assert response.json()["status"] == 405


def test_oversized_declared_body_is_413_problem(client: TestClient, alice: dict[str, str]) -> None:
    response = client.post(
        "/v1/transfers",
        content=b"{" + b" " * MAX_BODY_BYTES + b"}",
        headers={**alice, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_oversized_chunked_body_is_413_problem(client: TestClient, alice: dict[str, str]) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b" " * 1024
        yield b"}"

    response = client.post(
        "/v1/transfers",
        content=chunks(),
        headers={**alice, "Idempotency-Key": "k", "Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE


def test_unexpected_errors_are_500_problems_without_details(
    client: TestClient,
    alice: dict[str, str],
    engine: FakeTransferEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(customer: str) -> Any:
        raise RuntimeError("secret internal state")

    monkeypatch.setattr(engine, "list_accounts", broken)

    response = client.get("/v1/accounts", headers=alice)

    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert "secret" not in response.text
    assert "Traceback" not in response.text


# -- OpenAPI -------------------------------------------------------------------------------


def test_openapi_lists_every_endpoint(openapi: dict[str, Any]) -> None:
    operations = {
        (method.upper(), path) for path, item in openapi["paths"].items() for method in item
    }
    assert operations == {
        ("GET", "/livez"),
        ("GET", "/readyz"),
        ("GET", "/healthz"),
        ("POST", "/v1/tokens"),
        ("GET", "/v1/accounts"),
        ("GET", "/v1/accounts/{account_id}"),
        ("GET", "/v1/accounts/{account_id}/transactions"),
        ("POST", "/v1/transfers"),
        ("GET", "/v1/transfers/{transfer_id}"),
    }


def test_openapi_errors_are_problem_json(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert {"Problem", "ValidationProblem", "RejectedTransferProblem"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == [PROBLEM_MEDIA_TYPE], (method, path)
                    refs = str(response["content"][PROBLEM_MEDIA_TYPE]["schema"])
                    assert "#/components/schemas/" in refs


def test_openapi_documents_transfers(openapi: dict[str, Any]) -> None:
    operation = openapi["paths"]["/v1/transfers"]["post"]
    assert {"201", "202", "400", "401", "403", "409", "422", "502", "503"} <= set(
        operation["responses"]
    )
    (key,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert key["in"] == "header"
    assert key["required"] is True
    assert key["schema"]["maxLength"] == 128
    assert operation["security"] == [{"HTTPBearer": []}]
    accepted = operation["responses"]["202"]["content"]["application/json"]["schema"]
    assert accepted == {"$ref": "#/components/schemas/TransferOut"}
    amount = openapi["components"]["schemas"]["TransferRequest"]["properties"]["amount"]
    assert amount["type"] == "string"


def test_openapi_customer_endpoints_need_a_bearer_token(openapi: dict[str, Any]) -> None:
    scheme = openapi["components"]["securitySchemes"]["HTTPBearer"]
    assert scheme["scheme"] == "bearer"
    for path, item in openapi["paths"].items():
        for operation in item.values():
            secured = "security" in operation
            assert secured is path.startswith(("/v1/accounts", "/v1/transfers")), path
