from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import OPS, TELLER
from services.common.mtls.peer import PeerIdentity, reset_current_peer, set_current_peer
from services.common.runtime.health import ServiceHealth
from services.common.settings import load_settings
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from tests.support.helpers import scrub_environment
from tests.unit.gateway.fakes import FakeClock, FakeTransferEngine

TRUST_DOMAIN = "ztbank.example"


def peer(spiffe_id: SpiffeId) -> PeerIdentity:
    return PeerIdentity(
        spiffe_id=spiffe_id, serial="0a", fingerprint_sha256="ff" * 32, address="127.0.0.1:50000"
    )


TELLER_PEER = peer(TELLER.spiffe_id(TRUST_DOMAIN))
OPS_PEER = peer(OPS.spiffe_id(TRUST_DOMAIN))


@dataclass
class Caller:
    """The mTLS identity the next requests arrive with (None: the wiring forgot to set one)."""

    identity: PeerIdentity | None = TELLER_PEER


def with_peer(app: ASGIApp, caller: Caller) -> ASGIApp:
    """What the mTLS server does for real: set the verified peer around each request."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        token = set_current_peer(caller.identity)
        try:
            await app(scope, receive, send)
        finally:
            reset_current_peer(token)

    return serve


@pytest.fixture(scope="session")
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GatewaySettings:
    scrub_environment(monkeypatch)
    return load_settings(GatewaySettings, home=tmp_path / "var", trust_domain=TRUST_DOMAIN)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> FakeTransferEngine:
    return FakeTransferEngine(clock=clock)


@pytest.fixture
def caller() -> Caller:
    return Caller()


@pytest.fixture
def health() -> ServiceHealth:
    """The gateway's real health, with no checks until a test requires one."""
    return ServiceHealth("gateway")


@pytest.fixture
def client(
    settings: GatewaySettings,
    engine: FakeTransferEngine,
    signing_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    caller: Caller,
    health: ServiceHealth,
) -> Iterator[TestClient]:
    app = create_app(settings, engine, signing_key, health=health, clock=clock)
    with TestClient(with_peer(app, caller), raise_server_exceptions=False) as test_client:
        yield test_client


def bearer(client: TestClient, customer: str) -> dict[str, str]:
    response = client.post("/v1/tokens", json={"customer": customer})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def alice(client: TestClient) -> dict[str, str]:
    return bearer(client, "alice")


@pytest.fixture
def bob(client: TestClient) -> dict[str, str]:
    return bearer(client, "bob")


@pytest.fixture
def openapi(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document
