import re
from datetime import UTC, datetime, timedelta

import pytest

from services.common.identity.spiffe_id import SpiffeId
from services.issuer.domain.entries import (
    Entry,
    Selector,
    entitled_entries,
    parse_selectors,
    parse_workload_id,
    validate_dns_names,
)
from services.issuer.errors import EntryError

TD = "ztbank.example"
WORKLOAD = f"spiffe://{TD}/env/dev/zone/az1/team/payments/svc/ledger"
T0 = datetime(2030, 1, 1, tzinfo=UTC)

# -- selectors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:uid:1000", Selector("unix", "uid", "1000")),
        ("unix:uid:0", Selector("unix", "uid", "0")),
        ("unix:gid:100", Selector("unix", "gid", "100")),
        ("unix:path:/usr/bin/python3.11", Selector("unix", "path", "/usr/bin/python3.11")),
        ("unix:path:/opt/bank:v2/run", Selector("unix", "path", "/opt/bank:v2/run")),
        ("ztbank:socket:ledger", Selector("ztbank", "socket", "ledger")),
        ("ztbank:socket:bank-api_2", Selector("ztbank", "socket", "bank-api_2")),
        ("ztbank:socket:" + "a" * 63, Selector("ztbank", "socket", "a" * 63)),
    ],
)
def test_selector_parse_accepts(text: str, expected: Selector) -> None:
    selector = Selector.parse(text)
    assert selector == expected
    assert str(selector) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "TYPE:KEY:VALUE"),
        ("unix", "TYPE:KEY:VALUE"),
        ("unix:uid", "TYPE:KEY:VALUE"),
        ("unix:uid:", "numeric uid"),
        ("unix:uid:1000:1000", "numeric uid"),
        ("unix:uid:root", "numeric uid"),
        ("unix:uid:-1", "numeric uid"),
        ("unix:uid: 1000", "numeric uid"),
        ("unix:uid:12345678901", "numeric uid"),
        ("unix:gid:wheel", "numeric gid"),
        ("unix:pid:1", "unknown selector unix:pid"),
        ("UNIX:uid:1000", "unknown selector"),
        ("k8s:ns:default", "unknown selector k8s:ns"),
        ("ztbank:uid:1000", "unknown selector"),
        ("unix:path:usr/bin/python", "absolute"),
        ("unix:path:./bin", "absolute"),
        ("unix:path:", "absolute"),
        ("unix:path:/opt/my app", "absolute"),
        ("ztbank:socket:", "socket name"),
        ("ztbank:socket:Ledger", "socket name"),
        ("ztbank:socket:-ledger", "socket name"),
        ("ztbank:socket:_ledger", "socket name"),
        ("ztbank:socket:led/ger", "socket name"),
        ("ztbank:socket:../ledger", "socket name"),
        ("ztbank:socket:led ger", "socket name"),
        ("ztbank:socket:" + "a" * 64, "socket name"),
    ],
)
def test_selector_parse_refuses(text: str, reason: str) -> None:
    with pytest.raises(EntryError, match=re.escape(reason)):
        Selector.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "ztbank:socket:ledger\n",
        "unix:uid:1000\n",
        "unix:path:/usr/bin/python3\n",
        "unix:uid:\u0661\u0660\u0660\u0660",  # Arabic-Indic digits
    ],
)
def test_selector_parse_refuses_trailing_newline_and_non_ascii_digits(text: str) -> None:
    with pytest.raises(EntryError):
        Selector.parse(text)


def test_parse_selectors_needs_at_least_one() -> None:
    with pytest.raises(EntryError, match="at least one selector"):
        parse_selectors([])


def test_parse_selectors_deduplicates() -> None:
    assert parse_selectors(["unix:uid:1", "unix:uid:1", "unix:gid:2"]) == frozenset(
        {Selector("unix", "uid", "1"), Selector("unix", "gid", "2")}
    )


def test_parse_selectors_refuses_if_any_is_malformed() -> None:
    with pytest.raises(EntryError, match="numeric uid"):
        parse_selectors(["unix:gid:2", "unix:uid:x"])


# -- matching -------------------------------------------------------------------------------


def entry(
    entry_id: str, *selectors: str, created_at: datetime = T0, spiffe_id: str = WORKLOAD
) -> Entry:
    return Entry(
        id=entry_id,
        spiffe_id=SpiffeId.parse(spiffe_id),
        selectors=parse_selectors(selectors),
        created_at=created_at,
    )


def workload(*selectors: str) -> frozenset[Selector]:
    return frozenset(Selector.parse(s) for s in selectors)


def test_entry_matches_when_all_its_selectors_are_present() -> None:
    registered = entry("e1", "unix:uid:1000", "unix:path:/usr/bin/ledger")
    assert registered.matches(
        workload("unix:uid:1000", "unix:gid:1000", "unix:path:/usr/bin/ledger")
    )
    assert registered.matches(workload("unix:uid:1000", "unix:path:/usr/bin/ledger"))


@pytest.mark.parametrize(
    "selectors",
    [
        ("unix:uid:1000",),
        ("unix:path:/usr/bin/ledger",),
        ("unix:uid:1001", "unix:path:/usr/bin/ledger"),
        ("unix:uid:1000", "unix:path:/usr/bin/ledger2"),
        ("unix:gid:1000", "unix:path:/usr/bin/ledger"),
        (),
    ],
)
def test_entry_does_not_match_a_partial_or_different_workload(selectors: tuple[str, ...]) -> None:
    registered = entry("e1", "unix:uid:1000", "unix:path:/usr/bin/ledger")
    assert not registered.matches(workload(*selectors))


def test_entitled_entries_oldest_first_then_by_id() -> None:
    newest = entry("a", "unix:uid:1000", created_at=T0 + timedelta(minutes=2))
    oldest = entry("z", "unix:uid:1000", created_at=T0)
    tie_b = entry("b", "unix:uid:1000", created_at=T0 + timedelta(minutes=1))
    tie_a = entry("a2", "unix:gid:50", created_at=T0 + timedelta(minutes=1))
    other = entry("o", "unix:uid:2000", created_at=T0 - timedelta(days=1))
    result = entitled_entries(
        [newest, other, tie_b, oldest, tie_a], workload("unix:uid:1000", "unix:gid:50")
    )
    assert [e.id for e in result] == ["z", "a2", "b", "a"]


def test_entitled_entries_empty_when_nothing_matches() -> None:
    assert entitled_entries([entry("e", "unix:uid:1")], workload("unix:uid:2")) == []


# -- workload IDs ---------------------------------------------------------------------------


def test_parse_workload_id_accepts_an_id_of_the_trust_domain() -> None:
    assert parse_workload_id(WORKLOAD, TD) == SpiffeId(
        TD, "/env/dev/zone/az1/team/payments/svc/ledger"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("spiffe://other.example/svc/ledger", "outside the trust domain"),
        ("spiffe://ztbank.example.evil/svc/ledger", "outside the trust domain"),
        (f"spiffe://{TD}", "trust domain itself"),
        ("ledger", "spiffe://"),
        (f"https://{TD}/svc/ledger", "spiffe://"),
        (f"spiffe://{TD}/svc//ledger", "empty segment"),
        (f"spiffe://{TD}/svc/ledger/", "trailing"),
        ("spiffe://ZTBank.example/svc/ledger", "lowercase"),
        (f"spiffe://{TD}/svc/../admin", "'..'"),
    ],
)
def test_parse_workload_id_refuses(text: str, reason: str) -> None:
    with pytest.raises(EntryError, match=re.escape(reason)):
        parse_workload_id(text, TD)


# -- DNS names ------------------------------------------------------------------------------


def test_validate_dns_names_accepts_lowercase_names() -> None:
    longest = ("a" * 62 + ".") * 4 + "a"  # 253 characters
    names = ["ledger", "ledger.ztbank.example", "a-b.c1.example", "x" * 63 + ".example", longest]
    assert validate_dns_names(names) == tuple(names)
    assert validate_dns_names([]) == ()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Ledger.example",
        "-ledger.example",
        "ledger-.example",
        "ledger..example",
        ".ledger.example",
        "ledger.example.",
        "*.ledger.example",
        "led_ger.example",
        "ledger example",
        "l\u00e9dger.example",
        "x" * 64 + ".example",
        ("a" * 62 + ".") * 4 + "ab",  # 254 characters
    ],
)
def test_validate_dns_names_refuses(name: str) -> None:
    with pytest.raises(EntryError, match="not a valid lowercase DNS name"):
        validate_dns_names(["ok.example", name])


def test_validate_dns_names_refuses_trailing_newline() -> None:
    with pytest.raises(EntryError):
        validate_dns_names(["ledger.example\n"])
