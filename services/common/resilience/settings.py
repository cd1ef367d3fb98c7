"""The breaker's settings, written once: ``BreakerConfig`` holds every ``ZTBANK_BREAKER_*`` knob
(docs/breaker.md, "Settings") and is what a ``CircuitBreaker`` reads; ``BreakerSettings`` is the
part of a calling service's settings (gateway, transfer-engine) that fills it, and the trust
table's path, from the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails
from pydantic_settings import SettingsConfigDict

from services.common.resilience.trust_table import TrustTable
from services.common.resilience.window import BUCKET_SECONDS
from services.common.settings import ZtbankSettings


class BreakerConfig(BaseModel):
    """How a breaker decides; each field is ``ZTBANK_BREAKER_<FIELD>`` in the environment."""

    model_config = ConfigDict(frozen=True)

    # Every peer's trust while the table file does not exist: prod's trust in the shipped table.
    trust_without_table: float = Field(default=0.95, ge=0, le=1)
    trust_weight: float = Field(default=0.6, ge=0, le=1)  # the lifetime weighs the rest
    min_score: float = Field(default=0.75, ge=0, le=1)
    window_seconds: float = Field(default=60.0, ge=BUCKET_SECONDS, le=3600)
    near_expiry_window_seconds: float = Field(default=30.0, ge=BUCKET_SECONDS)
    near_expiry_fraction: float = Field(default=0.5, ge=0, le=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    low_trust_below: float = Field(default=0.8, ge=0, le=1)
    low_trust_failure_rate: float = Field(default=0.05, gt=0, le=1)
    min_calls: int = Field(default=10, ge=1)
    open_seconds: float = Field(default=10.0, gt=0, le=600)

    @model_validator(mode="after")
    def _short_window_within_the_window(self) -> BreakerConfig:
        if self.near_expiry_window_seconds > self.window_seconds:
            raise ValueError(
                "ZTBANK_BREAKER_NEAR_EXPIRY_WINDOW_SECONDS must not exceed"
                " ZTBANK_BREAKER_WINDOW_SECONDS"
            )
        return self


class BreakerSettings(ZtbankSettings):
    """The breaker knobs of a calling service (``ZTBANK_BREAKER_*``, ``ZTBANK_TRUST_LEVELS``)."""

    # ZTBANK_BREAKER_MIN_SCORE fills breaker.min_score: one split after the field's name keeps
    # the variables' historical flat names.  Only nested-model fields are split, and
    # ``breaker`` is the only one.
    model_config = SettingsConfigDict(env_nested_delimiter="_", env_nested_max_split=1)

    trust_levels: Path = Path("infra/trust-levels.json")
    breaker: BreakerConfig = BreakerConfig()

    @field_validator("trust_levels")
    @classmethod
    def _absolute_table_path(cls, value: Path) -> Path:
        return value.absolute()

    @model_validator(mode="wrap")
    @classmethod
    def _errors_name_flat_variables(
        cls, data: Any, handler: ModelWrapValidatorHandler[BreakerSettings]
    ) -> BreakerSettings:
        # ``load_settings`` names the variable at fault after an error's location: relocate the
        # nested ones (breaker.min_score) to the variable's flat name (breaker_min_score), and a
        # check across knobs to the whole settings (its message names the variables).
        try:
            return handler(data)
        except ValidationError as error:
            details = [_flat_location(detail) for detail in error.errors()]
            raise ValidationError.from_exception_data(error.title, details) from None

    def trust_table(self) -> TrustTable:
        return TrustTable(self.trust_levels, trust_without_table=self.breaker.trust_without_table)


def _flat_location(detail: ErrorDetails) -> InitErrorDetails:
    location = detail["loc"]
    if location[:1] == ("breaker",):
        location = ("_".join(str(part) for part in location),) if len(location) > 1 else ()
    flat: InitErrorDetails = {"type": detail["type"], "loc": location, "input": detail["input"]}
    if "ctx" in detail:
        flat["ctx"] = detail["ctx"]
    return flat
