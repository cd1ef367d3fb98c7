"""Typed, env-driven settings of the risk service (``ZTBANK_*`` plus ``ZTBANK_RISK_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator

from services.common.runtime.service import ServiceSettings


class RiskSettings(ServiceSettings):
    """Everything the risk service reads from its environment."""

    # The ZTBANK_ prefix makes this ZTBANK_RISK_RULES.
    risk_rules: Path = Path("infra/risk/rules.json")

    @field_validator("risk_rules")
    @classmethod
    def _absolute_rules(cls, value: Path) -> Path:
        return value.absolute()

    @property
    def state_dir(self) -> Path:
        return self.home / "risk"

    @property
    def velocity_path(self) -> Path:
        return self.state_dir / "velocity.db"
