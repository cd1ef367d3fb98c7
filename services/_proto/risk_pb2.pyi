from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AssessRequest(_message.Message):
    __slots__ = ("transfer_id", "customer", "from_account", "to_account", "amount_minor", "currency")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_FIELD_NUMBER: _ClassVar[int]
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    customer: str
    from_account: str
    to_account: str
    amount_minor: int
    currency: str
    def __init__(self, transfer_id: _Optional[str] = ..., customer: _Optional[str] = ..., from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class Assessment(_message.Message):
    __slots__ = ("decision", "reasons", "score")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    decision: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    score: int
    def __init__(self, decision: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., score: _Optional[int] = ...) -> None: ...
