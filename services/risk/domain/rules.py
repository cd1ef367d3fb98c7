"""The rules the risk engine applies, in the shape of the JSON rules file (infra/risk/README.md)."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.risk.errors import RulesError

# Upper bounds keep the velocity history small: it never needs more than
# MAX_VELOCITY_TRANSFERS + 1 events per account, none older than a day.
MAX_VELOCITY_TRANSFERS = 1000
MAX_VELOCITY_WINDOW_SECONDS = 86_400.0


class Rules(BaseModel):
    # extra="forbid": a misspelt key would otherwise silently leave its rule at the default.
    # strict: JSON true must not pass for 1, nor "500000" for a number.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    currency: str = Field(default="CNY", min_length=1)
    review_threshold: int = Field(default=500_000, gt=0)
    deny_threshold: int = Field(default=5_000_000, gt=0)
    velocity_max_transfers: int = Field(default=5, ge=1, le=MAX_VELOCITY_TRANSFERS)
    velocity_window_seconds: float = Field(default=60.0, gt=0, le=MAX_VELOCITY_WINDOW_SECONDS)
    blocked_accounts: frozenset[str] = frozenset()
    blocked_customers: frozenset[str] = frozenset()

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> Rules:
        if self.deny_threshold <= self.review_threshold:
            raise ValueError(
                f"deny_threshold ({self.deny_threshold}) must be above"
                f" review_threshold ({self.review_threshold})"
            )
        return self


def parse_rules(data: bytes, *, source: str) -> Rules:
    """Validate the JSON rules in ``data``; every problem is named in one line."""
    try:
        return Rules.model_validate_json(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'rules'}: "
            + str(item["msg"]).removeprefix("Value error, ")
            for item in error.errors()
        )
        raise RulesError(f"invalid risk rules in {source}: {problems}") from None


class RulesSource(Protocol):
    def current(self) -> Rules:
        """The rules to apply now; never raises once the source has started."""
        ...
