from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Account(_message.Message):
    __slots__ = ("id", "customer", "currency", "balance_minor", "name")
    ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BALANCE_MINOR_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    customer: str
    currency: str
    balance_minor: int
    name: str
    def __init__(self, id: _Optional[str] = ..., customer: _Optional[str] = ..., currency: _Optional[str] = ..., balance_minor: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class RiskAssessment(_message.Message):
    __slots__ = ("decision", "reasons", "score")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    decision: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    score: int
    def __init__(self, decision: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., score: _Optional[int] = ...) -> None: ...

class Transfer(_message.Message):
    __slots__ = ("id", "customer", "from_account", "to_account", "amount_minor", "currency", "status", "risk", "created_at", "idempotency_key", "replayed", "rejection_reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    REJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    customer: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str
    status: str
    risk: RiskAssessment
    created_at: str
    idempotency_key: str
    replayed: bool
    rejection_reason: str
    def __init__(self, id: _Optional[str] = ..., customer: _Optional[str] = ..., from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., status: _Optional[str] = ..., risk: _Optional[_Union[RiskAssessment, _Mapping]] = ..., created_at: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., replayed: _Optional[bool] = ..., rejection_reason: _Optional[str] = ...) -> None: ...

class Transaction(_message.Message):
    __slots__ = ("transfer_id", "account_id", "amount_minor", "currency", "counterparty_account", "balance_after_minor", "created_at")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    COUNTERPARTY_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_MINOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    account_id: str
    amount_minor: int
    currency: str
    counterparty_account: str
    balance_after_minor: int
    created_at: str
    def __init__(self, transfer_id: _Optional[str] = ..., account_id: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., counterparty_account: _Optional[str] = ..., balance_after_minor: _Optional[int] = ..., created_at: _Optional[str] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ("customer",)
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    customer: str
    def __init__(self, customer: _Optional[str] = ...) -> None: ...

class ListAccountsResponse(_message.Message):
    __slots__ = ("accounts",)
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    accounts: _containers.RepeatedCompositeFieldContainer[Account]
    def __init__(self, accounts: _Optional[_Iterable[_Union[Account, _Mapping]]] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("customer", "account_id")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    customer: str
    account_id: str
    def __init__(self, customer: _Optional[str] = ..., account_id: _Optional[str] = ...) -> None: ...

class ListTransactionsRequest(_message.Message):
    __slots__ = ("customer", "account_id", "from_date")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_DATE_FIELD_NUMBER: _ClassVar[int]
    customer: str
    account_id: str
    from_date: str
    def __init__(self, customer: _Optional[str] = ..., account_id: _Optional[str] = ..., from_date: _Optional[str] = ...) -> None: ...

class ListTransactionsResponse(_message.Message):
    __slots__ = ("transactions",)
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    transactions: _containers.RepeatedCompositeFieldContainer[Transaction]
    def __init__(self, transactions: _Optional[_Iterable[_Union[Transaction, _Mapping]]] = ...) -> None: ...

class CreateTransferRequest(_message.Message):
    __slots__ = ("customer", "idempotency_key", "from_account", "to_account", "amount_minor", "currency")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    customer: str
    idempotency_key: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str
    def __init__(self, customer: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class GetTransferRequest(_message.Message):
    __slots__ = ("customer", "transfer_id")
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    customer: str
    transfer_id: str
    def __init__(self, customer: _Optional[str] = ..., transfer_id: _Optional[str] = ...) -> None: ...
