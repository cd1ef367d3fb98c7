"""Scoring a transfer against the rules: amount tiers, velocity and blocklists, with reasons."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from services.common.risk_decision import RiskDecision
from services.risk.domain.rules import Rules, RulesSource
from services.risk.errors import InvalidTransferError


class Reason(StrEnum):
    """Stable machine-readable codes: callers and dashboards match on them, so never rename."""

    BLOCKLISTED_ACCOUNT = "blocklisted_account"
    BLOCKLISTED_CUSTOMER = "blocklisted_customer"
    AMOUNT_ABOVE_DENY_THRESHOLD = "amount_above_deny_threshold"
    AMOUNT_ABOVE_REVIEW_THRESHOLD = "amount_above_review_threshold"
    CURRENCY_NOT_SUPPORTED = "currency_not_supported"
    VELOCITY_EXCEEDED = "velocity_exceeded"


DENY_REASONS = frozenset(
    {
        Reason.BLOCKLISTED_ACCOUNT,
        Reason.BLOCKLISTED_CUSTOMER,
        Reason.AMOUNT_ABOVE_DENY_THRESHOLD,
    }
)

# Each reason is an independent piece of evidence of weight w (percent); the score combines
# them as 100 * (1 - prod(1 - w/100)). Any deny reason alone scores >= 90 and the review
# reasons together never reach 90, so the score bands (allow 0, review 40-64, deny 90-100)
# agree with the decision. Documented in infra/risk/README.md.
SCORE_WEIGHTS: Mapping[Reason, int] = MappingProxyType(
    {
        Reason.BLOCKLISTED_ACCOUNT: 100,
        Reason.BLOCKLISTED_CUSTOMER: 100,
        Reason.AMOUNT_ABOVE_DENY_THRESHOLD: 90,
        Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD: 40,
        Reason.CURRENCY_NOT_SUPPORTED: 40,
        Reason.VELOCITY_EXCEEDED: 40,
    }
)


@dataclass(frozen=True)
class TransferRequest:
    """A transfer to assess; construction refuses malformed input with every problem named."""

    transfer_id: str
    customer: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        problems = []
        if self.amount_minor <= 0:
            problems.append(f"amount_minor must be positive (got {self.amount_minor})")
        for name in ("currency", "from_account", "to_account"):
            if not getattr(self, name).strip():
                problems.append(f"{name} is required")
        if problems:
            raise InvalidTransferError("; ".join(problems))


@dataclass(frozen=True)
class Assessment:
    decision: RiskDecision
    reasons: tuple[Reason, ...]
    score: int  # 0 (no risk) .. 100


class VelocityHistory(Protocol):
    def record(self, account: str, window_seconds: float) -> int:
        """Record one transfer from ``account`` now; return how many transfers from it,
        this one included, fall within the last ``window_seconds``.  Raises VelocityStoreError
        (VelocityStorageError when the storage failed), having recorded nothing."""
        ...


def combined_score(reasons: tuple[Reason, ...]) -> int:
    unexplained = math.prod(1 - SCORE_WEIGHTS[reason] / 100 for reason in reasons)
    return round(100 * (1 - unexplained))


def evaluate(request: TransferRequest, rules: Rules, recent_transfers: int) -> Assessment:
    """The pure decision: ``recent_transfers`` counts this transfer and the earlier ones from
    the same account within the velocity window."""
    reasons: list[Reason] = []
    if rules.blocked_accounts & {request.from_account, request.to_account}:
        reasons.append(Reason.BLOCKLISTED_ACCOUNT)
    if request.customer in rules.blocked_customers:
        reasons.append(Reason.BLOCKLISTED_CUSTOMER)
    # Thresholds are in the rules' currency; comparing another currency's minor units with
    # them would be meaningless, so such a transfer goes to a human instead.
    if request.currency != rules.currency:
        reasons.append(Reason.CURRENCY_NOT_SUPPORTED)
    # Only the higher amount tier is listed: both would be the same evidence counted twice.
    elif request.amount_minor >= rules.deny_threshold:
        reasons.append(Reason.AMOUNT_ABOVE_DENY_THRESHOLD)
    elif request.amount_minor >= rules.review_threshold:
        reasons.append(Reason.AMOUNT_ABOVE_REVIEW_THRESHOLD)
    if recent_transfers > rules.velocity_max_transfers:
        reasons.append(Reason.VELOCITY_EXCEEDED)

    if DENY_REASONS.intersection(reasons):
        decision = RiskDecision.DENY
    elif reasons:
        decision = RiskDecision.REVIEW
    else:
        decision = RiskDecision.ALLOW
    found = tuple(reasons)
    return Assessment(decision=decision, reasons=found, score=combined_score(found))


class RiskAssessor:
    """Applies the current rules and feeds the velocity history with every assessed transfer."""

    def __init__(self, rules: RulesSource, history: VelocityHistory) -> None:
        self._rules = rules
        self._history = history

    def assess(self, request: TransferRequest) -> Assessment:
        rules = self._rules.current()
        recent = self._history.record(request.from_account, rules.velocity_window_seconds)
        return evaluate(request, rules, recent)
