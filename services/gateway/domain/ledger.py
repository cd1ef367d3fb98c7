"""What the gateway knows of the ledger, and the port through which it asks the transfer-engine.

Amounts are integer minor units here, as in ``ledger.proto``; decimal strings exist only at the
HTTP edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Protocol

from services.common.risk_decision import RiskDecision


class TransferStatus(StrEnum):
    POSTED = "posted"  # money moved
    REVIEW = "review"  # held for review, nothing moved
    REJECTED = "rejected"  # nothing moved


@dataclass(frozen=True)
class Account:
    id: str
    customer: str
    name: str
    currency: str
    balance_minor: int


@dataclass(frozen=True)
class RiskAssessment:
    decision: RiskDecision
    reasons: tuple[str, ...]
    score: int


@dataclass(frozen=True)
class TransferOrder:
    """What a customer asks for; the engine answers with a ``Transfer``."""

    from_account: str
    to_account: str
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class Transfer:
    id: str
    customer: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str
    status: TransferStatus
    # None when the engine decided without asking risk (e.g. insufficient funds).
    risk: RiskAssessment | None
    created_at: str
    # True when the engine answered from its idempotency record instead of executing again.
    replayed: bool
    # For rejected transfers: insufficient_funds or risk_denied.
    rejection_reason: str = ""

    def carries_out(self, customer: str, order: TransferOrder) -> bool:
        return customer == self.customer and order == TransferOrder(
            self.from_account, self.to_account, self.amount_minor, self.currency
        )


@dataclass(frozen=True)
class Transaction:
    transfer_id: str
    account_id: str
    amount_minor: int  # negative for money leaving the account
    currency: str
    counterparty_account: str
    balance_after_minor: int
    created_at: str


class TransferEngine(Protocol):
    """The transfer-engine's API (``ztbank.ledger.v1.TransferEngine``), in domain terms.

    Implementations raise ``GatewayError`` subclasses: ``NotFoundError``,
    ``PermissionDeniedError``, ``InvalidRequestError``, ``ConflictError``,
    ``EngineUnavailableError`` or ``EngineError``.  Calls are coroutines of the event loop that
    serves the HTTP requests.
    """

    async def list_accounts(self, customer: str) -> list[Account]: ...

    async def get_account(self, customer: str, account_id: str) -> Account: ...

    async def list_transactions(
        self, customer: str, account_id: str, from_date: date | None
    ) -> list[Transaction]: ...

    async def create_transfer(
        self, customer: str, idempotency_key: str, order: TransferOrder
    ) -> Transfer: ...

    async def get_transfer(self, customer: str, transfer_id: str) -> Transfer: ...
