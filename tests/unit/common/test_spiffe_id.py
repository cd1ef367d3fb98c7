import re

import pytest

from services.common.errors import InvalidSpiffeIdError
from services.common.identity.spiffe_id import (
    MAX_ID_LENGTH,
    MAX_TRUST_DOMAIN_LENGTH,
    SpiffeId,
    validate_trust_domain,
)

SCHEME_ID = "spiffe://ztbank.example/env/prod/zone/az1/team/payments/svc/transfer-engine"


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        (SCHEME_ID, "ztbank.example", "/env/prod/zone/az1/team/payments/svc/transfer-engine"),
        ("spiffe://ztbank.example", "ztbank.example", ""),
        ("spiffe://td/a", "td", "/a"),
        ("spiffe://my_td-1.example/Mixed.Case_seg-1/x", "my_td-1.example", "/Mixed.Case_seg-1/x"),
        ("spiffe://td/.../a..b", "td", "/.../a..b"),
    ],
)
def test_parses_valid_ids(text: str, trust_domain: str, path: str) -> None:
    spiffe_id = SpiffeId.parse(text)
    assert spiffe_id == SpiffeId(trust_domain, path)
    assert str(spiffe_id) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("SPIFFE://ztbank.example/svc", "spiffe://"),
        ("Spiffe://ztbank.example/svc", "spiffe://"),
        ("https://ztbank.example/svc", "spiffe://"),
        ("spiffe:/ztbank.example/svc", "spiffe://"),
        ("spiffe://ZTBank.example/svc", "lowercase"),
        ("spiffe://ztbank.example:8443/svc", "lowercase"),
        ("spiffe://user@ztbank.example/svc", "lowercase"),
        ("spiffe://user:pw@ztbank.example/svc", "lowercase"),
        ("spiffe:///svc", "trust domain is empty"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe://td//svc", "empty segment"),
        ("spiffe://td/svc/", "trailing"),
        ("spiffe://td/", "trailing"),
        ("spiffe://td/./svc", "'.' and '..'"),
        ("spiffe://td/svc/..", "'.' and '..'"),
        ("spiffe://td/svc%20x", "segment"),
        ("spiffe://ztbank%2eexample/svc", "lowercase"),
        ("spiffe://td/svc?x=1", "segment"),
        ("spiffe://td?x=1", "lowercase"),
        ("spiffe://td/svc#frag", "segment"),
        ("spiffe://td#frag", "lowercase"),
        ("spiffe://td/sv c", "segment"),
        ("spiffe://td/svc*", "segment"),
        ("spiffe://td/caf\u00e9", "segment"),
        ("spiffe://t\u00e9/svc", "lowercase"),
        (" spiffe://td/svc", "spiffe://"),
        ("spiffe://td/svc\n", "segment"),
        ("spiffe://td\n", "lowercase"),
        ("spiffe://td/\ud800", "segment"),
    ],
)
def test_refuses_each_syntax_rule(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeIdError, match=re.escape(reason)):
        SpiffeId.parse(text)


def test_refuses_id_longer_than_limit() -> None:
    prefix = "spiffe://td/"
    at_limit = prefix + "a" * (MAX_ID_LENGTH - len(prefix))
    assert str(SpiffeId.parse(at_limit)) == at_limit
    with pytest.raises(InvalidSpiffeIdError, match="longer than"):
        SpiffeId.parse(at_limit + "a")


def test_refuses_trust_domain_longer_than_limit() -> None:
    assert validate_trust_domain("a" * MAX_TRUST_DOMAIN_LENGTH)
    with pytest.raises(InvalidSpiffeIdError, match="trust domain longer"):
        SpiffeId.parse("spiffe://" + "a" * (MAX_TRUST_DOMAIN_LENGTH + 1) + "/svc")


def test_is_a_value_error_for_callers_that_catch_those() -> None:
    with pytest.raises(ValueError, match="spiffe://"):
        SpiffeId.parse("nope")


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidSpiffeIdError, match="start with '/'"):
        SpiffeId("td", "svc")
    with pytest.raises(InvalidSpiffeIdError, match="lowercase"):
        SpiffeId("TD", "/svc")


def test_for_workload_follows_the_ztbank_scheme() -> None:
    spiffe_id = SpiffeId.for_workload(
        "ztbank.example", env="prod", zone="az1", team="payments", service="transfer-engine"
    )
    assert str(spiffe_id) == SCHEME_ID
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@pytest.mark.parametrize(
    ("component", "reason"),
    [
        ({"env": "prod/zone/az9"}, "env 'prod/zone/az9' must be a single path segment"),
        ({"service": "a/b"}, "service 'a/b' must be a single path segment"),
        ({"team": ""}, "empty segment"),
        ({"zone": ".."}, "'.' and '..'"),
        ({"env": "Prod env"}, "segment"),
    ],
)
def test_for_workload_refuses_bad_components(component: dict[str, str], reason: str) -> None:
    fields = {"env": "prod", "zone": "az1", "team": "payments", "service": "ledger"} | component
    with pytest.raises(InvalidSpiffeIdError, match=re.escape(reason)):
        SpiffeId.for_workload("ztbank.example", **fields)


def test_trust_domain_id_and_membership() -> None:
    trust_domain_id = SpiffeId.parse("spiffe://ztbank.example")
    workload = SpiffeId.parse(SCHEME_ID)
    assert trust_domain_id.is_trust_domain_id
    assert not workload.is_trust_domain_id
    assert workload.member_of("ztbank.example")
    assert not workload.member_of("other.example")


def test_ids_are_hashable_and_ordered() -> None:
    a, b = SpiffeId.parse("spiffe://td/a"), SpiffeId.parse("spiffe://td/b")
    assert {a, SpiffeId.parse("spiffe://td/a")} == {a}
    assert sorted([b, a]) == [a, b]
