"""In-memory fakes of the transfer-engine's Protocols, faithful enough to run the domain tests."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta

from services.common.risk_decision import RiskDecision as Decision
from services.transfer_engine.domain.model import (
    Account,
    AccountKind,
    Assessment,
    Transaction,
    Transfer,
    TransferRequest,
    TransferStatus,
)
from services.transfer_engine.errors import RiskUnavailableError


class FakeClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class FakeRisk:
    """Answers with ``answer`` (allow until told otherwise) unless made ``unavailable``."""

    def __init__(self) -> None:
        self.answer = Assessment(Decision.ALLOW, (), 0)
        self.unavailable = False
        self.retry_after_seconds: int | None = None  # as an open breaker to risk says
        # When set, every assessment waits there until all its parties arrive (failing after 5 s).
        self.before_answer: asyncio.Barrier | None = None
        self.calls: list[tuple[TransferRequest, str]] = []

    def answer_with(self, decision: Decision, *reasons: str, score: int = 50) -> None:
        self.answer = Assessment(decision, reasons, score)

    async def assess(self, request: TransferRequest, *, transfer_id: str) -> Assessment:
        self.calls.append((request, transfer_id))
        if self.before_answer is not None:
            async with asyncio.timeout(5):
                await self.before_answer.wait()
        if self.unavailable:
            raise RiskUnavailableError(
                "risk service unavailable", retry_after_seconds=self.retry_after_seconds
            )
        return self.answer


@dataclass(frozen=True)
class _Posting:
    sequence: int
    transfer_id: str
    account_id: str
    amount_minor: int
    balance_after_minor: int
    created_at: datetime


@dataclass
class _State:
    accounts: dict[str, Account] = field(default_factory=dict)
    transfers: dict[str, Transfer] = field(default_factory=dict)
    postings: list[_Posting] = field(default_factory=list)


class InMemoryLedgerWrite:
    def __init__(self, state: _State) -> None:
        self._state = state

    def account(self, account_id: str) -> Account | None:
        return self._state.accounts.get(account_id)

    def balance(self, account_id: str) -> int:
        return self._state.accounts[account_id].balance_minor

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None:
        return _by_key(self._state, customer, idempotency_key)

    def open_account(
        self, account_id: str, *, customer: str | None, currency: str, name: str, kind: AccountKind
    ) -> None:
        assert account_id not in self._state.accounts
        self._state.accounts[account_id] = Account(account_id, customer, currency, name, kind, 0)

    def add_transfer(self, transfer: Transfer) -> None:
        assert transfer.id not in self._state.transfers
        self._state.transfers[transfer.id] = transfer
        if transfer.status is TransferStatus.POSTED:
            self._post(transfer, transfer.from_account, -transfer.amount_minor)
            self._post(transfer, transfer.to_account, transfer.amount_minor)

    def _post(self, transfer: Transfer, account_id: str, amount_minor: int) -> None:
        account = self._state.accounts[account_id]
        balance = account.balance_minor + amount_minor
        if account.kind is AccountKind.CUSTOMER and balance < 0:
            raise ValueError(f"{account_id} would go negative")  # the SQLite CHECK's twin
        self._state.accounts[account_id] = replace(account, balance_minor=balance)
        self._state.postings.append(
            _Posting(
                len(self._state.postings),
                transfer.id,
                account_id,
                amount_minor,
                balance,
                transfer.created_at,
            )
        )


def _by_key(state: _State, customer: str, key: str) -> Transfer | None:
    return next(
        (t for t in state.transfers.values() if (t.customer, t.idempotency_key) == (customer, key)),
        None,
    )


class InMemoryLedgerRepository:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._state = _State()

    @contextmanager
    def write(self) -> Iterator[InMemoryLedgerWrite]:
        with self._lock:
            before = copy.deepcopy(self._state)
            try:
                yield InMemoryLedgerWrite(self._state)
            except BaseException:
                self._state = before
                raise

    def account(self, account_id: str) -> Account | None:
        with self._lock:
            return self._state.accounts.get(account_id)

    def accounts_of(self, customer: str) -> list[Account]:
        with self._lock:
            return sorted(
                (a for a in self._state.accounts.values() if a.customer == customer),
                key=lambda a: a.id,
            )

    def transfer(self, transfer_id: str) -> Transfer | None:
        with self._lock:
            return self._state.transfers.get(transfer_id)

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None:
        with self._lock:
            return _by_key(self._state, customer, idempotency_key)

    def transactions(self, account_id: str, *, since: date | None) -> list[Transaction]:
        with self._lock:
            postings = self._state.postings
            mine = [
                p
                for p in postings
                if p.account_id == account_id and (since is None or p.created_at.date() >= since)
            ]
            return [
                Transaction(
                    transfer_id=p.transfer_id,
                    account_id=p.account_id,
                    amount_minor=p.amount_minor,
                    currency=self._state.accounts[account_id].currency,
                    counterparty_account=next(
                        o.account_id
                        for o in postings
                        if o.transfer_id == p.transfer_id and o.sequence != p.sequence
                    ),
                    balance_after_minor=p.balance_after_minor,
                    created_at=p.created_at,
                )
                for p in sorted(mine, key=lambda p: (p.created_at, p.sequence), reverse=True)
            ]
