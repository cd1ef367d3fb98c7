"""JWT-SVIDs (ES256) and the JWKS bundle that verifies them, per the JWT-SVID spec."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from services.common.errors import InvalidSpiffeIdError
from services.common.identity.spiffe_id import SpiffeId
from services.issuer.errors import IssuerError

ALGORITHM = "ES256"
# Tolerated clock difference between the signer and us for nbf/iat.
CLOCK_SKEW = 30


class InvalidJwtSvidError(IssuerError):
    """A JWT-SVID failed validation; the message says why."""


def sign_jwt_svid(
    spiffe_id: SpiffeId,
    audience: Sequence[str],
    *,
    kid: str,
    key: ec.EllipticCurvePrivateKey,
    ttl: timedelta,
    key_expires: datetime,
    now: datetime,
) -> str:
    expires = min(now + ttl, key_expires)
    claims = {
        "sub": str(spiffe_id),
        "aud": list(audience),
        "iat": int(now.timestamp()),
        "exp": int(expires.timestamp()),
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM, headers={"kid": kid, "typ": "JWT"})


def jwks(keys: Mapping[str, ec.EllipticCurvePublicKey]) -> bytes:
    """RFC 7517 key set with the SPIFFE bundle's ``use: jwt-svid``."""
    documents = []
    for kid, public_key in keys.items():
        document: dict[str, Any] = ECAlgorithm.to_jwk(public_key, as_dict=True)
        document.update({"kid": kid, "use": "jwt-svid"})
        documents.append(document)
    return json.dumps({"keys": documents}, sort_keys=True).encode()


def validate_jwt_svid(
    token: str,
    audience: str,
    *,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    trust_domain: str,
    now: datetime,
) -> tuple[SpiffeId, dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as error:
        raise InvalidJwtSvidError(f"malformed JWT-SVID: {error}") from None
    if header.get("alg") != ALGORITHM:
        raise InvalidJwtSvidError(f"unsupported JWT-SVID algorithm {header.get('alg')!r}")
    key = keys.get(str(header.get("kid", "")))
    if key is None:
        raise InvalidJwtSvidError("JWT-SVID signed by a key not in the trust bundle")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            # Time claims are checked below against the injected clock, not PyJWT's own.
            options={
                "require": ["sub", "aud", "exp"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise InvalidJwtSvidError(f"JWT-SVID audience does not include {audience!r}") from None
    except jwt.PyJWTError as error:
        raise InvalidJwtSvidError(f"invalid JWT-SVID: {error}") from None
    if not isinstance(claims["exp"], int | float) or claims["exp"] <= now.timestamp():
        raise InvalidJwtSvidError("JWT-SVID has expired")
    not_before = claims.get("nbf", claims.get("iat", 0))
    if not isinstance(not_before, int | float) or not_before > now.timestamp() + CLOCK_SKEW:
        raise InvalidJwtSvidError("JWT-SVID is not valid yet")
    try:
        subject = SpiffeId.parse(str(claims["sub"]))
    except InvalidSpiffeIdError as error:
        raise InvalidJwtSvidError(f"JWT-SVID subject: {error}") from None
    if not subject.member_of(trust_domain):
        raise InvalidJwtSvidError(f"JWT-SVID subject {subject} is outside {trust_domain}")
    return subject, claims
