"""Typed, env-driven settings of the gateway (``ZTBANK_*``)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from services.common.durations import format_duration, parse_duration
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import GATEWAY, TELLER
from services.common.mtls.https import DEFAULT_MAX_IN_FLIGHT
from services.common.resilience.settings import BreakerSettings
from services.common.runtime.service import ServiceSettings

# Customer tokens are bearer credentials: a stolen one works until it expires, so the ceiling is
# hard and not configurable.
MAX_TOKEN_TTL = timedelta(minutes=15)
MIN_TOKEN_TTL = timedelta(seconds=30)
MAX_ENGINE_TIMEOUT = timedelta(seconds=60)


class GatewaySettings(ServiceSettings, BreakerSettings):
    """Everything the gateway reads from its environment (the breaker's knobs to the
    transfer-engine included)."""

    # ZTBANK_TOKEN_TTL
    token_ttl: timedelta = timedelta(minutes=10)
    # ZTBANK_ENGINE_TIMEOUT: deadline of each call to the transfer-engine.
    engine_timeout: timedelta = timedelta(seconds=5)
    # ZTBANK_MAX_IN_FLIGHT: requests served at once; more are answered 503 at once (shed)
    # instead of waiting behind the others.
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, ge=1)

    @field_validator("token_ttl", "engine_timeout", mode="before")
    @classmethod
    def _parse_durations(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _bounded(self) -> GatewaySettings:
        if not MIN_TOKEN_TTL <= self.token_ttl <= MAX_TOKEN_TTL:
            raise ValueError(
                "ZTBANK_TOKEN_TTL must be between 30s and 15m"
                f" (got {format_duration(self.token_ttl)})"
            )
        if not timedelta(0) < self.engine_timeout <= MAX_ENGINE_TIMEOUT:
            raise ValueError(
                "ZTBANK_ENGINE_TIMEOUT must be between 1ms and 60s"
                f" (got {format_duration(self.engine_timeout)})"
            )
        return self

    @property
    def state_dir(self) -> Path:
        return self.home / "gateway"

    @property
    def token_key_path(self) -> Path:
        return self.state_dir / "token-signing.key"

    @property
    def gateway_id(self) -> SpiffeId:
        """The gateway's own SPIFFE ID: the issuer (``iss``) of customer tokens."""
        return GATEWAY.spiffe_id(self.trust_domain)

    @property
    def teller_id(self) -> SpiffeId:
        """The only caller that may obtain customer tokens."""
        return TELLER.spiffe_id(self.trust_domain)
