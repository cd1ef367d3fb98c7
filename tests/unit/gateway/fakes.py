"""In-memory stand-ins for the gateway's ports: a transfer-engine with alice and bob, a clock."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta

from services.common.risk_decision import RiskDecision
from services.gateway.domain.ledger import (
    Account,
    RiskAssessment,
    Transaction,
    Transfer,
    TransferOrder,
    TransferStatus,
)
from services.gateway.errors import (
    ConflictError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)

START = datetime(2026, 11, 28, 9, 30, tzinfo=UTC)

ALICE_CURRENT = "acc-alice-1"
ALICE_SAVINGS = "acc-alice-2"
BOB_CURRENT = "acc-bob-1"
MULE = "acc-mule-1"  # on the fake risk blocklist

# Transfers above this many fen are held for review.
REVIEW_ABOVE = 500_000


class FakeClock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _accounts() -> dict[str, Account]:
    return {
        account.id: account
        for account in (
            Account(ALICE_CURRENT, "alice", "Current", "CNY", 1_000_000),  # 10 000.00
            Account(ALICE_SAVINGS, "alice", "Savings", "CNY", 5_000),  # 50.00
            Account(BOB_CURRENT, "bob", "Current", "CNY", 12_345),  # 123.45
            Account(MULE, "mallory", "Current", "CNY", 0),
        )
    }


@dataclass
class FakeTransferEngine:
    """Behaves like the transfer-engine, including its own ownership and idempotency checks."""

    clock: FakeClock = field(default_factory=FakeClock)
    accounts: dict[str, Account] = field(default_factory=_accounts)
    transfers: dict[str, Transfer] = field(default_factory=dict)
    transactions: list[Transaction] = field(default_factory=list)
    idempotency: dict[tuple[str, str], str] = field(default_factory=dict)
    # Raised by every call while set: outages, internal errors.
    failure: GatewayError | None = None
    calls: list[str] = field(default_factory=list)

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if self.failure is not None:
            raise self.failure

    def _owned(self, customer: str, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            raise NotFoundError(f"no account {account_id}")
        if account.customer != customer:
            raise PermissionDeniedError(f"account {account_id} belongs to someone else")
        return account

    async def list_accounts(self, customer: str) -> list[Account]:
        self._enter("list_accounts")
        return [a for a in self.accounts.values() if a.customer == customer]

    async def get_account(self, customer: str, account_id: str) -> Account:
        self._enter("get_account")
        return self._owned(customer, account_id)

    async def list_transactions(
        self, customer: str, account_id: str, from_date: date | None
    ) -> list[Transaction]:
        self._enter("list_transactions")
        self._owned(customer, account_id)
        return [
            t
            for t in self.transactions
            if t.account_id == account_id
            and (from_date is None or datetime.fromisoformat(t.created_at).date() >= from_date)
        ]

    async def create_transfer(
        self, customer: str, idempotency_key: str, order: TransferOrder
    ) -> Transfer:
        self._enter("create_transfer")
        earlier = self.idempotency.get((customer, idempotency_key))
        if earlier is not None:
            transfer = self.transfers[earlier]
            if not transfer.carries_out(customer, order):
                raise ConflictError("idempotency key reused with a different request")
            return replace(transfer, replayed=True)
        source = self.accounts.get(order.from_account)
        if source is None or source.customer != customer:
            raise PermissionDeniedError(f"account {order.from_account} is not {customer}'s")
        destination = self.accounts.get(order.to_account)
        if destination is None:
            raise NotFoundError(f"no account {order.to_account}")
        for account in (source, destination):
            if account.currency != order.currency:
                raise InvalidRequestError(f"account {account.id} holds {account.currency}")
        status, risk, rejection_reason = self._decide(source, order)
        transfer = Transfer(
            id=f"tr-{len(self.transfers) + 1:04d}",
            customer=customer,
            from_account=order.from_account,
            to_account=order.to_account,
            amount_minor=order.amount_minor,
            currency=order.currency,
            status=status,
            risk=risk,
            created_at=self.clock().isoformat(),
            replayed=False,
            rejection_reason=rejection_reason,
        )
        self.transfers[transfer.id] = transfer
        self.idempotency[(customer, idempotency_key)] = transfer.id
        if status is TransferStatus.POSTED:
            self._post(transfer)
        return transfer

    def _decide(
        self, source: Account, order: TransferOrder
    ) -> tuple[TransferStatus, RiskAssessment | None, str]:
        if source.balance_minor < order.amount_minor:
            return TransferStatus.REJECTED, None, "insufficient_funds"
        if order.to_account == MULE:
            return (
                TransferStatus.REJECTED,
                RiskAssessment(RiskDecision.DENY, ("counterparty_blocklisted",), 95),
                "risk_denied",
            )
        if order.amount_minor > REVIEW_ABOVE:
            return (
                TransferStatus.REVIEW,
                RiskAssessment(RiskDecision.REVIEW, ("large_amount",), 60),
                "",
            )
        return TransferStatus.POSTED, RiskAssessment(RiskDecision.ALLOW, (), 5), ""

    def _post(self, transfer: Transfer) -> None:
        for account_id, counterparty, sign in (
            (transfer.from_account, transfer.to_account, -1),
            (transfer.to_account, transfer.from_account, 1),
        ):
            account = self.accounts[account_id]
            balance = account.balance_minor + sign * transfer.amount_minor
            self.accounts[account_id] = replace(account, balance_minor=balance)
            self.transactions.append(
                Transaction(
                    transfer_id=transfer.id,
                    account_id=account_id,
                    amount_minor=sign * transfer.amount_minor,
                    currency=transfer.currency,
                    counterparty_account=counterparty,
                    balance_after_minor=balance,
                    created_at=transfer.created_at,
                )
            )

    async def get_transfer(self, customer: str, transfer_id: str) -> Transfer:
        self._enter("get_transfer")
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise NotFoundError(f"no transfer {transfer_id}")
        if transfer.customer != customer:
            raise PermissionDeniedError(f"transfer {transfer_id} belongs to someone else")
        return transfer
