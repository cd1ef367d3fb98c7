"""The JSON the gateway reads and writes; money is always a decimal string here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.money import format_amount
from services.common.problem import Problem
from services.common.risk_decision import RiskDecision
from services.gateway.domain.ledger import (
    Account,
    RiskAssessment,
    Transaction,
    Transfer,
    TransferStatus,
)
from services.gateway.domain.tokens import CUSTOMER_PATTERN

# Account and transfer IDs as they may appear in a path; anything else never reaches the engine.
RESOURCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
ResourceId = Annotated[str, Field(pattern=RESOURCE_ID_PATTERN)]
DecimalAmount = Annotated[
    str,
    Field(
        max_length=32,
        description="positive decimal string with at most the currency's decimal places",
        examples=["12.34"],
    ),
]
Money = Annotated[
    str, Field(description="decimal string in the currency's major unit", examples=["12.34"])
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["CNY"])]


class _Input(BaseModel):
    # strict: a JSON number where a string is expected (an amount as 12.34) is refused, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenRequest(_Input):
    customer: str = Field(pattern=CUSTOMER_PATTERN, examples=["alice"])


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - RFC 6749's token type, not a secret
    expires_in: int = Field(description="seconds until the token expires")


class Health(BaseModel):
    status: Literal["live", "ready"]


class TransferRequest(_Input):
    from_account: ResourceId
    to_account: ResourceId
    amount: DecimalAmount
    currency: Currency


class AccountOut(BaseModel):
    id: str
    name: str
    currency: str
    balance: Money

    @classmethod
    def of(cls, account: Account) -> AccountOut:
        return cls(
            id=account.id,
            name=account.name,
            currency=account.currency,
            balance=format_amount(account.balance_minor, account.currency),
        )


class AccountList(BaseModel):
    accounts: list[AccountOut]


class TransactionOut(BaseModel):
    transfer_id: str
    account_id: str
    amount: Money = Field(description="negative when money left the account")
    currency: str
    counterparty_account: str
    balance_after: Money
    created_at: str

    @classmethod
    def of(cls, transaction: Transaction) -> TransactionOut:
        return cls(
            transfer_id=transaction.transfer_id,
            account_id=transaction.account_id,
            amount=format_amount(transaction.amount_minor, transaction.currency),
            currency=transaction.currency,
            counterparty_account=transaction.counterparty_account,
            balance_after=format_amount(transaction.balance_after_minor, transaction.currency),
            created_at=transaction.created_at,
        )


class TransactionList(BaseModel):
    transactions: list[TransactionOut]


class RiskOut(BaseModel):
    decision: RiskDecision
    reasons: list[str]
    score: int

    @classmethod
    def of(cls, risk: RiskAssessment) -> RiskOut:
        return cls(decision=risk.decision, reasons=list(risk.reasons), score=risk.score)


class TransferOut(BaseModel):
    id: str
    status: TransferStatus
    from_account: str
    to_account: str
    amount: Money
    currency: str
    risk: RiskOut | None = Field(description="null when the engine decided without risk scoring")
    created_at: str

    @classmethod
    def of(cls, transfer: Transfer) -> TransferOut:
        return cls(
            id=transfer.id,
            status=transfer.status,
            from_account=transfer.from_account,
            to_account=transfer.to_account,
            amount=format_amount(transfer.amount_minor, transfer.currency),
            currency=transfer.currency,
            risk=RiskOut.of(transfer.risk) if transfer.risk else None,
            created_at=transfer.created_at,
        )


class FieldError(BaseModel):
    location: list[str | int] = Field(examples=[["body", "amount"]])
    message: str
    type: str


class ValidationProblem(Problem):
    errors: list[FieldError]


class RejectedTransferProblem(Problem):
    transfer_id: str
    reasons: list[str]
    transfer: TransferOut
