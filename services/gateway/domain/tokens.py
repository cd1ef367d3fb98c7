"""Customer access tokens: short-lived ES256 JWTs (RFC 9068 profile) issued and verified by the
gateway itself.

The teller authenticates the customer and vouches for them over mTLS; the gateway then issues a
token that names the customer (``sub``), itself as issuer (``iss``, its SPIFFE ID) and itself as
audience.  Verification trusts nothing from the token before the signature checks out: the
algorithm is pinned, the key is ours, and time claims are judged by the injected clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from services.gateway.errors import InvalidTokenError, TokenKeyError, UnknownCustomerError

ALGORITHM = "ES256"
AUDIENCE = "ztbank-gateway"
# RFC 9068 access-token type: a JWT minted for another purpose with the same key cannot pass.
JWT_TYPE = "at+jwt"
MAX_TTL = timedelta(minutes=15)
# Tolerated clock difference between gateway instances; also bounds how far past ``exp`` a
# token still works.
LEEWAY = timedelta(seconds=10)
CUSTOMER_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_CUSTOMER = re.compile(CUSTOMER_PATTERN)
_REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "exp", "jti"]

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class CustomerDirectory(Protocol):
    async def is_customer(self, customer: str) -> bool: ...


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_in: int  # seconds


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint: stable across restarts, changes with the key."""
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(public_key, as_dict=True)
    canonical = json.dumps(
        {name: jwk[name] for name in ("crv", "kty", "x", "y")}, separators=(",", ":")
    )
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _timestamp(claims: dict[str, Any], name: str) -> int:
    value = claims[name]
    # bool is an int in Python but never a timestamp.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTokenError(f"token claim {name!r} is not a timestamp")
    return value


class CustomerTokens:
    CACHE_SIZE = 4096

    def __init__(
        self,
        *,
        key: ec.EllipticCurvePrivateKey,
        issuer: str,
        ttl: timedelta,
        directory: CustomerDirectory,
        clock: Clock = utc_now,
    ) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise TokenKeyError(f"ES256 needs a P-256 key, not {key.curve.name}")
        if not timedelta(0) < ttl <= MAX_TTL:
            raise ValueError(f"token lifetime must be positive and at most {MAX_TTL}")
        self._key = key
        self._public_key = key.public_key()
        self._kid = key_id(self._public_key)
        self._issuer = issuer
        self._ttl_seconds = int(ttl.total_seconds())
        self._directory = directory
        self._clock = clock
        self._lock = threading.Lock()
        self._verified: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    async def issue(self, customer: str) -> IssuedToken:
        """A token for ``customer``; raises UnknownCustomerError for anyone the bank lacks."""
        if not _CUSTOMER.fullmatch(customer) or not await self._directory.is_customer(customer):
            raise UnknownCustomerError(f"no customer {customer!r}")
        issued_at = int(self._clock().timestamp())
        claims = {
            "iss": self._issuer,
            "sub": customer,
            "aud": AUDIENCE,
            "iat": issued_at,
            "exp": issued_at + self._ttl_seconds,
            "jti": uuid.uuid4().hex,
        }
        token = jwt.encode(
            claims, self._key, algorithm=ALGORITHM, headers={"kid": self._kid, "typ": JWT_TYPE}
        )
        return IssuedToken(access_token=token, expires_in=self._ttl_seconds)

    def verify(self, token: str) -> str:
        """The customer a valid token names; InvalidTokenError (with the reason) otherwise.

        A token whose signature and claims checked out is remembered by its exact text (the
        signing key is this instance's own), so a customer's next requests pay only for the
        time checks, which run on every call."""
        with self._lock:
            remembered = self._verified.get(token)
            if remembered is not None:
                self._verified.move_to_end(token)
        if remembered is None:
            remembered = self._verify_signed(token)
            with self._lock:
                self._verified[token] = remembered
                while len(self._verified) > self.CACHE_SIZE:
                    self._verified.popitem(last=False)
        subject, issued_at, expires = remembered
        now = self._clock().timestamp()
        leeway = LEEWAY.total_seconds()
        if now >= expires + leeway:
            raise InvalidTokenError("token has expired")
        if issued_at > now + leeway:
            raise InvalidTokenError("token is not valid yet")
        return subject

    def _verify_signed(self, token: str) -> tuple[str, int, int]:
        """(subject, iat, exp) of a token with our signature and well-formed claims."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"malformed token: {error}") from None
        if header.get("typ") != JWT_TYPE:
            raise InvalidTokenError("not a ztbank access token")
        if header.get("kid") != self._kid:
            raise InvalidTokenError("token signed by an unknown key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public_key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=self._issuer,
                # Time claims are judged in verify() against the injected clock, not PyJWT's.
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as error:
            raise InvalidTokenError(f"invalid token: {error}") from None
        issued_at, expires = _timestamp(claims, "iat"), _timestamp(claims, "exp")
        if expires - issued_at > MAX_TTL.total_seconds():
            raise InvalidTokenError("token lifetime exceeds the gateway's maximum")
        subject = claims["sub"]
        if not isinstance(subject, str) or not _CUSTOMER.fullmatch(subject):
            raise InvalidTokenError("token subject is not a customer")
        return subject, issued_at, expires
