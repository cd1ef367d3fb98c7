"""The risk service's verdict on a transfer, as ``risk.proto`` and ``ledger.proto`` carry it (a
string): one vocabulary for the three services that handle it, so that a value the risk
service decides is one the transfer-engine acts on and records and the gateway shows."""

from __future__ import annotations

from enum import StrEnum


class RiskDecision(StrEnum):
    ALLOW = "allow"
    REVIEW = "review"
    DENY = "deny"
