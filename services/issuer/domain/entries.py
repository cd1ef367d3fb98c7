"""Registration entries: which workload, recognised by which selectors, gets which SPIFFE ID."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.common.errors import InvalidSpiffeIdError
from services.common.identity.spiffe_id import SpiffeId
from services.issuer.errors import EntryError

# type -> key -> validator of the value.  ``ztbank:socket`` is the native single-user stack's
# selector: the workload connected on the per-workload socket of that name.
_SOCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_SELECTOR_RULES: dict[tuple[str, str], tuple[re.Pattern[str], str]] = {
    ("unix", "uid"): (re.compile(r"^[0-9]{1,10}$"), "a numeric uid"),
    ("unix", "gid"): (re.compile(r"^[0-9]{1,10}$"), "a numeric gid"),
    ("unix", "path"): (re.compile(r"^/\S*$"), "an absolute executable path"),
    ("ztbank", "socket"): (_SOCKET_NAME, "a socket name of [a-z0-9_-]"),
}


@dataclass(frozen=True, order=True)
class Selector:
    type: str
    key: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        parts = text.split(":", 2)
        if len(parts) != 3:
            raise EntryError(f"selector {text!r} must look like TYPE:KEY:VALUE, e.g. unix:uid:1000")
        selector_type, key, value = parts
        rule = _SELECTOR_RULES.get((selector_type, key))
        if rule is None:
            known = ", ".join(f"{t}:{k}" for t, k in _SELECTOR_RULES)
            raise EntryError(f"unknown selector {selector_type}:{key} (known: {known})")
        pattern, description = rule
        if not pattern.fullmatch(value):
            raise EntryError(f"selector {text!r}: value must be {description}")
        return cls(selector_type, key, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.key}:{self.value}"


def parse_selectors(texts: Iterable[str]) -> frozenset[Selector]:
    selectors = frozenset(Selector.parse(text) for text in texts)
    if not selectors:
        raise EntryError("an entry needs at least one selector")
    return selectors


def validate_dns_names(names: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(names)
    for name in checked:
        if not _DNS_NAME.fullmatch(name):
            raise EntryError(f"{name!r} is not a valid lowercase DNS name")
    return checked


def parse_workload_id(text: str, trust_domain: str) -> SpiffeId:
    """A SPIFFE ID that may be issued to a workload of ``trust_domain``."""
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeIdError as error:
        raise EntryError(str(error)) from None
    if not spiffe_id.member_of(trust_domain):
        raise EntryError(f"{spiffe_id} is outside the trust domain {trust_domain}")
    if spiffe_id.is_trust_domain_id:
        raise EntryError(f"{spiffe_id} names the trust domain itself, not a workload")
    return spiffe_id


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    ttl: timedelta | None = None
    dns_names: tuple[str, ...] = ()
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def matches(self, workload_selectors: frozenset[Selector]) -> bool:
        """SPIRE semantics: every selector of the entry must be present on the workload."""
        return self.selectors <= workload_selectors


def entitled_entries(entries: Iterable[Entry], selectors: frozenset[Selector]) -> list[Entry]:
    """Matching entries, oldest first, so the default (first) SVID is stable."""
    return sorted(
        (entry for entry in entries if entry.matches(selectors)),
        key=lambda entry: (entry.created_at, entry.id),
    )


@dataclass(frozen=True)
class IssuedRecord:
    serial: str
    spiffe_id: str
    not_after: datetime
    issued_at: datetime
    source: str
    entry_id: str | None
    # Serial (hex) of the signing CA that issued it; None in records older than revocation.
    ca_serial: str | None = None
