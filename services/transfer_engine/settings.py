"""Typed, env-driven settings of the transfer-engine (``ZTBANK_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.resilience.settings import BreakerSettings
from services.common.runtime.service import ServiceSettings


class TransferEngineSettings(ServiceSettings, BreakerSettings):
    """Everything the transfer-engine reads from its environment (the breaker's knobs to risk
    included)."""

    # Every transfer waits for risk before it posts, so this bounds the latency of a transfer.
    risk_timeout_seconds: float = Field(default=2.0, gt=0, le=30)

    @property
    def state_dir(self) -> Path:
        return self.home / "transfer-engine"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.db"
