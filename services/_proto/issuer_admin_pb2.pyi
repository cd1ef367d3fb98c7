from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "selectors", "ttl_seconds", "dns_names", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    created_at: str
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., created_at: _Optional[str] = ...) -> None: ...

class CreateEntryRequest(_message.Message):
    __slots__ = ("spiffe_id", "selectors", "ttl_seconds", "dns_names")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListEntriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListEntriesResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...

class DeleteEntryRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteEntryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MintX509SVIDRequest(_message.Message):
    __slots__ = ("spiffe_id", "ttl_seconds", "dns_names")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    ttl_seconds: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, spiffe_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ...) -> None: ...

class MintX509SVIDResponse(_message.Message):
    __slots__ = ("chain_pem", "key_pem", "bundle_pem", "serial", "not_after")
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    chain_pem: bytes
    key_pem: bytes
    bundle_pem: bytes
    serial: str
    not_after: str
    def __init__(self, chain_pem: _Optional[bytes] = ..., key_pem: _Optional[bytes] = ..., bundle_pem: _Optional[bytes] = ..., serial: _Optional[str] = ..., not_after: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("serial", "spiffe_id", "reason", "undo")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    serial: str
    spiffe_id: str
    reason: str
    undo: bool
    def __init__(self, serial: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., reason: _Optional[str] = ..., undo: _Optional[bool] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("serials", "spiffe_id", "reason", "revoked_at", "replaced", "crl_number", "undone")
    SERIALS_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    CRL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    UNDONE_FIELD_NUMBER: _ClassVar[int]
    serials: _containers.RepeatedScalarFieldContainer[str]
    spiffe_id: str
    reason: str
    revoked_at: str
    replaced: _containers.RepeatedScalarFieldContainer[str]
    crl_number: int
    undone: bool
    def __init__(self, serials: _Optional[_Iterable[str]] = ..., spiffe_id: _Optional[str] = ..., reason: _Optional[str] = ..., revoked_at: _Optional[str] = ..., replaced: _Optional[_Iterable[str]] = ..., crl_number: _Optional[int] = ..., undone: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("trust_domain", "upstream", "workload_socket", "active_ca_serial", "active_ca_not_after", "entries", "bundle_size", "revocation_url", "crl_number", "revoked_certificates", "revoked_spiffe_ids", "ca_chain", "upstream_error", "upstream_last_success", "upstream_failures", "started")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_SOCKET_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CA_SERIAL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_CA_NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_URL_FIELD_NUMBER: _ClassVar[int]
    CRL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REVOKED_CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_SPIFFE_IDS_FIELD_NUMBER: _ClassVar[int]
    CA_CHAIN_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_ERROR_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_LAST_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    upstream: str
    workload_socket: str
    active_ca_serial: str
    active_ca_not_after: str
    entries: int
    bundle_size: int
    revocation_url: str
    crl_number: int
    revoked_certificates: int
    revoked_spiffe_ids: _containers.RepeatedScalarFieldContainer[str]
    ca_chain: _containers.RepeatedCompositeFieldContainer[CaCertificate]
    upstream_error: str
    upstream_last_success: str
    upstream_failures: int
    started: str
    def __init__(self, trust_domain: _Optional[str] = ..., upstream: _Optional[str] = ..., workload_socket: _Optional[str] = ..., active_ca_serial: _Optional[str] = ..., active_ca_not_after: _Optional[str] = ..., entries: _Optional[int] = ..., bundle_size: _Optional[int] = ..., revocation_url: _Optional[str] = ..., crl_number: _Optional[int] = ..., revoked_certificates: _Optional[int] = ..., revoked_spiffe_ids: _Optional[_Iterable[str]] = ..., ca_chain: _Optional[_Iterable[_Union[CaCertificate, _Mapping]]] = ..., upstream_error: _Optional[str] = ..., upstream_last_success: _Optional[str] = ..., upstream_failures: _Optional[int] = ..., started: _Optional[str] = ...) -> None: ...

class CaCertificate(_message.Message):
    __slots__ = ("subject", "serial", "not_after")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    subject: str
    serial: str
    not_after: str
    def __init__(self, subject: _Optional[str] = ..., serial: _Optional[str] = ..., not_after: _Optional[str] = ...) -> None: ...

class RenewCARequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewCAResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
