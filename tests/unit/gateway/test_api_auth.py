import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from services.common.identity.workloads import GATEWAY
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.gateway.domain.tokens import key_id
from tests.unit.gateway.conftest import TRUST_DOMAIN
from tests.unit.gateway.fakes import FakeClock

ISSUER = str(GATEWAY.spiffe_id(TRUST_DOMAIN))


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def craft(
    key: ec.EllipticCurvePrivateKey, clock: FakeClock, *, kid_of: ec.EllipticCurvePrivateKey
) -> dict[str, Any]:
    now = int(clock().timestamp())
    return {
        "claims": {
            "iss": ISSUER,
            "sub": "alice",
            "aud": "ztbank-gateway",
            "iat": now,
            "exp": now + 300,
            "jti": "x" * 32,
        },
        "headers": {"kid": key_id(kid_of.public_key()), "typ": "at+jwt"},
    }


def sign(
    key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    *,
    kid_of: ec.EllipticCurvePrivateKey | None = None,
    **changes: Any,
) -> str:
    parts = craft(key, clock, kid_of=kid_of or key)
    parts["claims"].update(changes)
    parts["claims"] = {name: value for name, value in parts["claims"].items() if value is not None}
    return jwt.encode(parts["claims"], key, algorithm="ES256", headers=parts["headers"])


def get_accounts(client: TestClient, authorization: str | None) -> Any:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return client.get("/v1/accounts", headers=headers)


def assert_unauthenticated(response: Any, *, token_presented: bool) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="ztbank-gateway"')
    assert ('error="invalid_token"' in challenge) is token_presented
    assert response.json()["type"].endswith(":unauthenticated")


def test_a_valid_token_is_accepted(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    response = get_accounts(client, f"Bearer {sign(signing_key, clock)}")
    assert response.status_code == 200


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer ", "Basic YWxpY2U6eA=="])
def test_missing_credentials(client: TestClient, authorization: str | None) -> None:
    assert_unauthenticated(get_accounts(client, authorization), token_presented=False)


def test_expired_token(client: TestClient, alice: dict[str, str], clock: FakeClock) -> None:
    clock.advance(600 + 9)  # within the leeway
    assert client.get("/v1/accounts", headers=alice).status_code == 200

    clock.advance(1)

    response = client.get("/v1/accounts", headers=alice)
    assert_unauthenticated(response, token_presented=True)
    assert "expired" in response.json()["detail"]


def test_token_from_the_future(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    now = int(clock().timestamp())
    token = sign(signing_key, clock, iat=now + 60, exp=now + 360)
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


def test_forged_signature(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    # Signed by another key but claiming ours by kid.
    forger = ec.generate_private_key(ec.SECP256R1())
    token = sign(forger, clock, kid_of=signing_key)
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


def test_tampered_claims(client: TestClient, alice: dict[str, str]) -> None:
    header, payload, signature = alice["Authorization"].removeprefix("Bearer ").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "bob"
    token = ".".join([header, _b64(claims), signature])
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


def test_alg_none(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    parts = craft(signing_key, clock, kid_of=signing_key)
    header = {"alg": "none", **parts["headers"]}
    token = f"{_b64(header)}.{_b64(parts['claims'])}."
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


def test_hs256_with_the_public_key_as_secret(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    public_pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    parts = craft(signing_key, clock, kid_of=signing_key)
    header = _b64({"alg": "HS256", **parts["headers"]})
    payload = _b64(parts["claims"])
    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": "ztbank-admin"},
        {"aud": ["ztbank-admin", "other"]},
        {"aud": None},
        {"iss": "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/teller"},
        {"iss": None},
        {"exp": None},
        {"iat": None},
        {"jti": None},
        {"sub": None},
        {"sub": "Alice"},
        {"sub": 7},
        {"exp": True},
    ],
)
def test_wrong_or_missing_claims(
    client: TestClient,
    signing_key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    changes: dict[str, Any],
) -> None:
    token = sign(signing_key, clock, **changes)
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


def test_lifetime_beyond_the_maximum(
    client: TestClient, signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    now = int(clock().timestamp())
    token = sign(signing_key, clock, exp=now + 15 * 60 + 1)
    assert_unauthenticated(get_accounts(client, f"Bearer {token}"), token_presented=True)


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "Bearer x", "é" * 10])
def test_garbage(client: TestClient, token: str) -> None:
    response = client.get("/v1/accounts", headers={b"Authorization": f"Bearer {token}".encode()})
    assert_unauthenticated(response, token_presented=True)
