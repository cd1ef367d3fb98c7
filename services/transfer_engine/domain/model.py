"""The ledger's vocabulary. Money is an ``int`` of minor units (fen for CNY), never a float."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from services.common.risk_decision import RiskDecision

SUPPORTED_CURRENCIES = frozenset({"CNY"})
MAX_AMOUNT_MINOR = 10**13
MAX_IDEMPOTENCY_KEY_LENGTH = 128


class AccountKind(StrEnum):
    CUSTOMER = "customer"
    # The bank's own accounts (equity); they may go negative and never take customer transfers.
    INTERNAL = "internal"


class TransferStatus(StrEnum):
    POSTED = "posted"
    REVIEW = "review"
    REJECTED = "rejected"


class RejectionReason(StrEnum):
    RISK_DENIED = "risk_denied"
    INSUFFICIENT_FUNDS = "insufficient_funds"


@dataclass(frozen=True)
class Account:
    id: str
    customer: str | None  # None for internal accounts
    currency: str
    name: str
    kind: AccountKind
    balance_minor: int


@dataclass(frozen=True)
class TransferRequest:
    customer: str
    idempotency_key: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str

    @property
    def fingerprint(self) -> str:
        """What a replay must repeat exactly; customer and key are the lookup itself."""
        body = json.dumps([self.from_account, self.to_account, self.amount_minor, self.currency])
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Assessment:
    decision: RiskDecision
    reasons: tuple[str, ...]
    score: int


@dataclass(frozen=True)
class Transfer:
    id: str
    customer: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str
    status: TransferStatus
    created_at: datetime
    # The next three are None only for opening balances, which the bank posts without a request
    # and without asking risk.
    idempotency_key: str | None
    request_fingerprint: str | None
    assessment: Assessment | None
    rejection_reason: RejectionReason | None = None
    replayed: bool = False


@dataclass(frozen=True)
class Transaction:
    """One posting as its account holder sees it."""

    transfer_id: str
    account_id: str
    amount_minor: int  # negative when money leaves the account
    currency: str
    counterparty_account: str
    balance_after_minor: int
    created_at: datetime
