"""The transfer-engine's use cases: read accounts and transactions, and move money exactly once."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Protocol

from services.common.risk_decision import RiskDecision
from services.transfer_engine.domain.model import (
    MAX_AMOUNT_MINOR,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    SUPPORTED_CURRENCIES,
    Account,
    AccountKind,
    Assessment,
    RejectionReason,
    Transaction,
    Transfer,
    TransferRequest,
    TransferStatus,
)
from services.transfer_engine.domain.seed import (
    BANK_EQUITY_ACCOUNT,
    BANK_EQUITY_NAME,
    DEMO_ACCOUNTS,
    SEED_CURRENCY,
    opening_transfer_id,
)
from services.transfer_engine.errors import (
    IdempotencyConflictError,
    InvalidRequestError,
    NotFoundError,
    NotOwnerError,
)

Clock = Callable[[], datetime]
# date.fromisoformat alone also takes 20240501 and 2024-W18-3; the API promises YYYY-MM-DD only.
_DATE_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}")


def utc_now() -> datetime:
    return datetime.now(UTC)


class RiskAssessor(Protocol):
    async def assess(self, request: TransferRequest, *, transfer_id: str) -> Assessment:
        """Raises RiskUnavailableError when no usable answer arrives in time."""
        ...


class LedgerWrite(Protocol):
    """One write transaction: whatever is done through it commits together or not at all."""

    def account(self, account_id: str) -> Account | None: ...

    def balance(self, account_id: str) -> int: ...

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None: ...

    def open_account(
        self, account_id: str, *, customer: str | None, currency: str, name: str, kind: AccountKind
    ) -> None:
        """Creates the account (and its customer) at a zero balance: money arrives by postings."""
        ...

    def add_transfer(self, transfer: Transfer) -> None:
        """Stores the transfer; a posted one also gets its two postings and moves both balances."""
        ...


class LedgerRepository(Protocol):
    def account(self, account_id: str) -> Account | None: ...

    def accounts_of(self, customer: str) -> list[Account]: ...

    def transfer(self, transfer_id: str) -> Transfer | None: ...

    def transfer_by_key(self, customer: str, idempotency_key: str) -> Transfer | None: ...

    def transactions(self, account_id: str, *, since: date | None) -> list[Transaction]:
        """Postings to the account on or after ``since`` (UTC), newest first."""
        ...

    def write(self) -> AbstractContextManager[LedgerWrite]:
        """Serialises writers; commits when the block ends normally, rolls back otherwise."""
        ...


def _require(field: str, value: str) -> None:
    if not value:
        raise InvalidRequestError(f"{field} is required")


def parse_from_date(text: str) -> date | None:
    if not text:
        return None
    invalid = InvalidRequestError(f"from_date {text!r} is not a date of the form YYYY-MM-DD")
    if not _DATE_SHAPE.fullmatch(text):
        raise invalid
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise invalid from None


def _validate(request: TransferRequest) -> None:
    _require("customer", request.customer)
    key = request.idempotency_key
    _require("idempotency_key", key)
    if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise InvalidRequestError(
            f"idempotency_key must be 1..{MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters"
        )
    _require("from_account", request.from_account)
    _require("to_account", request.to_account)
    if request.from_account == request.to_account:
        raise InvalidRequestError("from_account and to_account must differ")
    if not 0 < request.amount_minor <= MAX_AMOUNT_MINOR:
        raise InvalidRequestError(
            f"amount_minor must be between 1 and {MAX_AMOUNT_MINOR} (got {request.amount_minor})"
        )
    if request.currency not in SUPPORTED_CURRENCIES:
        raise InvalidRequestError(
            f"currency {request.currency!r} is not supported"
            f" (supported: {', '.join(sorted(SUPPORTED_CURRENCIES))})"
        )


def _replay(earlier: Transfer, request: TransferRequest) -> Transfer:
    if earlier.request_fingerprint != request.fingerprint:
        raise IdempotencyConflictError(
            f"idempotency key {request.idempotency_key!r} was already used for another request"
        )
    return replace(earlier, replayed=True)


def _outcome(
    assessment: Assessment, *, funds_suffice: bool
) -> tuple[TransferStatus, RejectionReason | None]:
    if assessment.decision is RiskDecision.DENY:
        return TransferStatus.REJECTED, RejectionReason.RISK_DENIED
    # Checked for review too: a reviewer should never be asked to approve an unpayable transfer.
    if not funds_suffice:
        return TransferStatus.REJECTED, RejectionReason.INSUFFICIENT_FUNDS
    if assessment.decision is RiskDecision.REVIEW:
        return TransferStatus.REVIEW, None
    return TransferStatus.POSTED, None


class Ledger:
    def __init__(
        self, *, repository: LedgerRepository, risk: RiskAssessor, clock: Clock = utc_now
    ) -> None:
        self._repository = repository
        self._risk = risk
        self._clock = clock

    def ensure_seeded(self) -> None:
        """Opens the demo accounts that are missing, each with its opening balance posted."""
        with self._repository.write() as ledger:
            if ledger.account(BANK_EQUITY_ACCOUNT) is None:
                ledger.open_account(
                    BANK_EQUITY_ACCOUNT,
                    customer=None,
                    currency=SEED_CURRENCY,
                    name=BANK_EQUITY_NAME,
                    kind=AccountKind.INTERNAL,
                )
            for opening in DEMO_ACCOUNTS:
                if ledger.account(opening.id) is not None:
                    continue
                ledger.open_account(
                    opening.id,
                    customer=opening.customer,
                    currency=SEED_CURRENCY,
                    name=opening.name,
                    kind=AccountKind.CUSTOMER,
                )
                ledger.add_transfer(
                    Transfer(
                        id=opening_transfer_id(opening.id),
                        customer=opening.customer,
                        from_account=BANK_EQUITY_ACCOUNT,
                        to_account=opening.id,
                        amount_minor=opening.opening_balance_minor,
                        currency=SEED_CURRENCY,
                        status=TransferStatus.POSTED,
                        created_at=self._clock(),
                        idempotency_key=None,
                        request_fingerprint=None,
                        assessment=None,
                    )
                )

    def accounts(self, customer: str) -> list[Account]:
        _require("customer", customer)
        return self._repository.accounts_of(customer)

    def account(self, customer: str, account_id: str) -> Account:
        _require("customer", customer)
        _require("account_id", account_id)
        account = self._repository.account(account_id)
        if account is None:
            raise NotFoundError(f"account {account_id} not found")
        if account.customer != customer:
            raise NotOwnerError(f"account {account_id} does not belong to customer {customer}")
        return account

    def transactions(self, customer: str, account_id: str, from_date: str) -> list[Transaction]:
        """``from_date`` is YYYY-MM-DD (UTC) or empty for the whole history."""
        since = parse_from_date(from_date)
        self.account(customer, account_id)
        return self._repository.transactions(account_id, since=since)

    def transfer(self, customer: str, transfer_id: str) -> Transfer:
        _require("customer", customer)
        _require("transfer_id", transfer_id)
        transfer = self._repository.transfer(transfer_id)
        # Someone else's transfer reads exactly like a missing one, so ids reveal nothing.
        if transfer is None or transfer.customer != customer:
            raise NotFoundError(f"transfer {transfer_id} not found")
        return transfer

    async def create_transfer(self, request: TransferRequest) -> Transfer:
        """Posts, holds for review or rejects the transfer, once per (customer, key).

        Raises IdempotencyConflictError when the key was used for a different request, and
        RiskUnavailableError (storing nothing, so a retry with the same key is safe) when risk
        gives no answer.  Checks and reads run on the caller's event loop; the write (its
        fsync) runs in a worker thread.
        """
        _validate(request)
        earlier = self._repository.transfer_by_key(request.customer, request.idempotency_key)
        if earlier is not None:
            return _replay(earlier, request)
        self._check_accounts(request)
        transfer_id = f"tr-{uuid.uuid4().hex}"
        # Before the write transaction: the ledger's write lock must never wait on the network.
        assessment = await self._risk.assess(request, transfer_id=transfer_id)
        return await asyncio.to_thread(self._record, request, transfer_id, assessment)

    def _record(
        self, request: TransferRequest, transfer_id: str, assessment: Assessment
    ) -> Transfer:
        with self._repository.write() as ledger:
            # A duplicate may have committed while risk was deciding; its answer wins.
            earlier = ledger.transfer_by_key(request.customer, request.idempotency_key)
            if earlier is not None:
                return _replay(earlier, request)
            funds_suffice = ledger.balance(request.from_account) >= request.amount_minor
            status, rejection_reason = _outcome(assessment, funds_suffice=funds_suffice)
            transfer = Transfer(
                id=transfer_id,
                customer=request.customer,
                from_account=request.from_account,
                to_account=request.to_account,
                amount_minor=request.amount_minor,
                currency=request.currency,
                status=status,
                created_at=self._clock(),
                idempotency_key=request.idempotency_key,
                request_fingerprint=request.fingerprint,
                assessment=assessment,
                rejection_reason=rejection_reason,
            )
            ledger.add_transfer(transfer)
        return transfer

    def _check_accounts(self, request: TransferRequest) -> None:
        source = self._repository.account(request.from_account)
        # A missing source reads like someone else's: a transfer probes no account IDs.
        if source is None or source.customer != request.customer:
            raise NotOwnerError(
                f"account {request.from_account} does not belong to customer {request.customer}"
            )
        destination = self._repository.account(request.to_account)
        if destination is None:
            raise NotFoundError(f"account {request.to_account} not found")
        if destination.kind is not AccountKind.CUSTOMER:
            raise InvalidRequestError(f"account {request.to_account} does not take transfers")
        for account in (source, destination):
            if account.currency != request.currency:
                raise InvalidRequestError(
                    f"account {account.id} holds {account.currency}, not {request.currency}"
                )
