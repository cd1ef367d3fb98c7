import asyncio
from datetime import timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from services.gateway.adapters.customer_directory import EngineCustomerDirectory
from services.gateway.domain.tokens import LEEWAY, MAX_TTL, CustomerTokens, IssuedToken, key_id
from services.gateway.errors import (
    EngineUnavailableError,
    InvalidTokenError,
    NotFoundError,
    TokenKeyError,
    UnknownCustomerError,
)
from tests.unit.gateway.fakes import FakeClock, FakeTransferEngine

ISSUER = "spiffe://ztbank.example/env/prod/zone/az1/team/channels/svc/gateway"


class Directory:
    def __init__(self, *customers: str) -> None:
        self.customers = set(customers)
        self.asked: list[str] = []

    async def is_customer(self, customer: str) -> bool:
        self.asked.append(customer)
        return customer in self.customers


def issue(tokens: CustomerTokens, customer: str) -> IssuedToken:
    return asyncio.run(tokens.issue(customer))


def service(
    key: ec.EllipticCurvePrivateKey,
    clock: FakeClock,
    *,
    issuer: str = ISSUER,
    ttl: timedelta = timedelta(minutes=10),
    directory: Directory | None = None,
) -> CustomerTokens:
    return CustomerTokens(
        key=key,
        issuer=issuer,
        ttl=ttl,
        directory=directory or Directory("alice", "bob"),
        clock=clock,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock) -> CustomerTokens:
    return service(signing_key, clock)


def test_issued_tokens_verify_to_their_customer(tokens: CustomerTokens) -> None:
    issued = issue(tokens, "alice")

    assert issued.expires_in == 600
    assert tokens.verify(issued.access_token) == "alice"


def test_kid_is_the_jwk_thumbprint(signing_key: ec.EllipticCurvePrivateKey) -> None:
    thumbprint = key_id(signing_key.public_key())
    assert len(thumbprint) == 43  # base64url SHA-256, no padding
    assert thumbprint != key_id(ec.generate_private_key(ec.SECP256R1()).public_key())


def test_valid_until_exp_plus_leeway(tokens: CustomerTokens, clock: FakeClock) -> None:
    token = issue(tokens, "alice").access_token
    clock.advance(600 + LEEWAY.total_seconds() - 1)
    assert tokens.verify(token) == "alice"

    clock.advance(1)

    with pytest.raises(InvalidTokenError, match="expired"):
        tokens.verify(token)


def test_not_valid_before_iat_minus_leeway(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    future = FakeClock(clock() + LEEWAY + timedelta(seconds=1))
    token = issue(service(signing_key, future), "alice").access_token

    with pytest.raises(InvalidTokenError, match="not valid yet"):
        service(signing_key, clock).verify(token)


def test_unknown_customers_get_nothing(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    directory = Directory("alice")
    tokens = service(signing_key, clock, directory=directory)

    with pytest.raises(UnknownCustomerError):
        issue(tokens, "carol")
    # Names that cannot be customers are refused without asking the directory.
    with pytest.raises(UnknownCustomerError):
        issue(tokens, "ALICE")
    assert directory.asked == ["carol"]


def test_another_gateway_key_is_refused(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    other = service(ec.generate_private_key(ec.SECP256R1()), clock)
    token = issue(other, "alice").access_token

    with pytest.raises(InvalidTokenError, match="unknown key"):
        service(signing_key, clock).verify(token)


def test_another_issuer_is_refused(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    token = issue(service(signing_key, clock, issuer=ISSUER + "-2"), "alice").access_token

    with pytest.raises(InvalidTokenError):
        service(signing_key, clock).verify(token)


def test_a_plain_jwt_with_our_key_is_not_an_access_token(
    tokens: CustomerTokens, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    claims = jwt.decode(issue(tokens, "alice").access_token, options={"verify_signature": False})
    header = {"kid": key_id(signing_key.public_key()), "typ": "JWT"}
    token = jwt.encode(claims, signing_key, algorithm="ES256", headers=header)

    with pytest.raises(InvalidTokenError, match="not a ztbank access token"):
        tokens.verify(token)


def test_es256_only(tokens: CustomerTokens, signing_key: ec.EllipticCurvePrivateKey) -> None:
    """A token that passes every other check (our key's kid, the access-token type, good
    claims) and differs only in its algorithm: refused by the algorithm pin itself."""
    p384 = ec.generate_private_key(ec.SECP384R1())
    claims = jwt.decode(issue(tokens, "alice").access_token, options={"verify_signature": False})
    header = {"kid": key_id(signing_key.public_key()), "typ": "at+jwt"}
    token = jwt.encode(claims, p384, algorithm="ES384", headers=header)

    with pytest.raises(InvalidTokenError, match="invalid token: The specified alg value is not"):
        tokens.verify(token)


def test_refuses_keys_that_are_not_p256(clock: FakeClock) -> None:
    with pytest.raises(TokenKeyError, match="P-256"):
        service(ec.generate_private_key(ec.SECP384R1()), clock)


@pytest.mark.parametrize("ttl", [timedelta(0), MAX_TTL + timedelta(seconds=1), timedelta(hours=1)])
def test_refuses_lifetimes_beyond_the_maximum(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock, ttl: timedelta
) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        service(signing_key, clock, ttl=ttl)


def test_maximum_lifetime_is_allowed(
    signing_key: ec.EllipticCurvePrivateKey, clock: FakeClock
) -> None:
    tokens = service(signing_key, clock, ttl=MAX_TTL)
    assert tokens.verify(issue(tokens, "bob").access_token) == "bob"


def test_engine_directory_knows_customers_by_their_accounts() -> None:
    engine = FakeTransferEngine()
    directory = EngineCustomerDirectory(engine)

    assert asyncio.run(directory.is_customer("alice"))
    assert not asyncio.run(directory.is_customer("carol"))
    engine.failure = NotFoundError("no such customer")
    assert not asyncio.run(directory.is_customer("alice"))
    engine.failure = EngineUnavailableError("down")
    with pytest.raises(EngineUnavailableError):
        asyncio.run(directory.is_customer("alice"))


def test_a_token_is_checked_in_full_once_and_its_times_on_every_use(
    tokens: CustomerTokens, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real_decode = jwt.decode

    def counted(token: str, *args: object, **kwargs: object) -> object:
        decoded.append(token)
        return real_decode(token, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counted)
    token = issue(tokens, "alice").access_token
    assert [tokens.verify(token) for _ in range(3)] == ["alice"] * 3
    assert decoded == [token]

    header, payload, signature = token.split(".")
    forged = (
        f"{header}.{payload}.{signature[:-2]}{'A' if signature[-2] != 'A' else 'B'}{signature[-1]}"
    )
    with pytest.raises(InvalidTokenError, match="invalid token"):
        tokens.verify(forged)  # a remembered token vouches for no other text

    clock.advance(600 + LEEWAY.total_seconds())
    with pytest.raises(InvalidTokenError, match="expired"):
        tokens.verify(token)
