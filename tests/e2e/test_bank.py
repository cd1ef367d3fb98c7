"""The bank as a customer sees it through the teller, over the real stack.

Tests share one ledger, so they compare balances before and after rather than with the seed.
Every transfer that reaches risk counts towards its velocity rule (more than 5 from one account
in 60 s is held for review); this module stays at 3 per account.  The restart test runs last.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from services.common.identity.pem import fingerprint_sha256
from services.common.identity.workloads import GATEWAY, RISK, TELLER, TRANSFER_ENGINE
from services.labs.teller import Reply, TellerClient
from tests.e2e.conftest import FILE_TIMEOUT, E2EStack, HttpsReply, balances
from tests.support.helpers import wait_until
from tests.support.iana import TLS_SUITE_CODES

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice", "bob"
ALICE_CNY, ALICE_SAVINGS, BOB_CNY = "acc-alice-cny", "acc-alice-savings", "acc-bob-cny"
TRANSFERS = "/v1/transfers"
CREATE_TRANSFER = "/ztbank.ledger.v1.TransferEngine/CreateTransfer"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
HEX = re.compile(r"[0-9a-f]+")


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def order(source: str, target: str, amount: str, currency: str = "CNY") -> dict[str, str]:
    return {"from_account": source, "to_account": target, "amount": amount, "currency": currency}


def new_key() -> str:
    return f"e2e-{uuid.uuid4()}"


def post_transfer(teller: TellerClient, customer: str, body: Any, key: str) -> Reply:
    return teller.as_customer(
        customer, "POST", TRANSFERS, body=body, headers={"Idempotency-Key": key}
    )


def all_balances(teller: TellerClient) -> dict[str, Decimal]:
    return {**balances(teller, ALICE), **balances(teller, BOB)}


def assert_problem(reply: Reply | HttpsReply, status: int) -> None:
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/problem+json"), reply
    assert isinstance(reply.body, dict), reply
    assert reply.body["status"] == status, reply
    assert reply.body["title"], reply


def transactions_of(teller: TellerClient, customer: str, account: str, day: str) -> list[Any]:
    reply = teller.as_customer(customer, "GET", f"/v1/accounts/{account}/transactions?from={day}")
    assert reply.status == 200, reply
    return list(reply.body["transactions"])


def in_trace(trace_id: str, method: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record["trace_id"] == trace_id and record["method"] == method


# -- 1. a transfer end to end -------------------------------------------------------------------


def test_transfer_end_to_end(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)
    teller_svid = stack.svid(TELLER.name)
    headers = {"Authorization": f"Bearer {teller.token(ALICE)}", "Idempotency-Key": new_key()}

    reply = stack.https(
        teller_svid, "POST", TRANSFERS, body=order(ALICE_CNY, BOB_CNY, "12.34"), headers=headers
    )

    assert reply.status == 201, reply
    transfer = reply.body
    assert transfer["status"] == "posted"
    assert {k: transfer[k] for k in ("from_account", "to_account", "amount", "currency")} == (
        order(ALICE_CNY, BOB_CNY, "12.34")
    )
    assert transfer["risk"] == {"decision": "allow", "reasons": [], "score": 0}
    assert reply.headers["location"] == f"{TRANSFERS}/{transfer['id']}"

    after = all_balances(teller)
    assert before[ALICE_CNY] - after[ALICE_CNY] == Decimal("12.34")
    assert after[BOB_CNY] - before[BOB_CNY] == Decimal("12.34")
    assert after[ALICE_SAVINGS] == before[ALICE_SAVINGS]

    day = transfer["created_at"][:10]
    for customer, account, amount, counterparty in (
        (ALICE, ALICE_CNY, "-12.34", BOB_CNY),
        (BOB, BOB_CNY, "12.34", ALICE_CNY),
    ):
        lines = [
            t
            for t in transactions_of(teller, customer, account, day)
            if t["transfer_id"] == transfer["id"]
        ]
        assert lines == [
            {
                "transfer_id": transfer["id"],
                "account_id": account,
                "amount": amount,
                "currency": "CNY",
                "counterparty_account": counterparty,
                "balance_after": f"{after[account]:.2f}",
                "created_at": transfer["created_at"],
            }
        ]

    fetched = teller.as_customer(ALICE, "GET", f"{TRANSFERS}/{transfer['id']}")
    assert fetched.status == 200, fetched
    assert fetched.body == transfer

    # The gateway's audit of exactly this request (found by our end of the connection).
    record = stack.wait_for_audit(
        GATEWAY.name,
        lambda r: r["source_port"] == reply.local_port and r["method"] == "POST /v1/transfers",
        "the transfer request",
    )
    gateway = stack.addresses[GATEWAY.name]
    assert reply.tls_version in {"TLSv1.2", "TLSv1.3"}
    assert reply.cipher
    assert {k: v for k, v in record.items() if k not in {"time", "trace_id"}} == {
        "caller_spiffe_id": stack.spiffe_id(TELLER.name),
        "cert_serial": teller_svid.serial,
        "cert_sha256": fingerprint_sha256(teller_svid.leaf),
        "source_addr": reply.local_addr,
        "source_port": reply.local_port,
        "dest_addr": reply.peer_addr,
        "dest_port": gateway.port,
        "tls_version": reply.tls_version,
        "cipher": reply.cipher,
        "service": GATEWAY.name,
        "method": "POST /v1/transfers",
        "decision": "allow",
        "reason": "allowed by policy rule for gateway",
        # The encrypted-traffic fields (JR/T 0194-2020).
        "event": "authz",
        "handshake": "success",
        "cipher_code": TLS_SUITE_CODES[reply.cipher],
        "sni": None if is_ip_literal(gateway.host) else gateway.host,  # no SNI for an IP
        "alpn": "http/1.1",
        "session_id": record["session_id"],
        "cert_subject": teller_svid.leaf.subject.rfc4514_string(),
    }
    assert re.fullmatch(r"[0-9a-f]{16}", record["session_id"]), record
    trace_id = record["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id), record

    # The same trace is in the audit of the next hops, with their callers' identities.
    for service, method, caller in (
        (TRANSFER_ENGINE.name, CREATE_TRANSFER, GATEWAY.name),
        (RISK.name, ASSESS, TRANSFER_ENGINE.name),
    ):
        hop = stack.wait_for_audit(
            service,
            in_trace(trace_id, method),
            f"{method} in trace {trace_id}",
        )
        assert hop["caller_spiffe_id"] == stack.spiffe_id(caller), hop
        assert (hop["decision"], hop["reason"]) == (
            "allow",
            f"allowed by policy rule for {service}",
        )
        # The caller's address as its registered name resolves (loopback natively, its
        # container's on the compose network); the service's own as it is registered.
        caller_addr = socket.gethostbyname(stack.addresses[caller].host)
        assert (hop["service"], hop["source_addr"]) == (service, caller_addr), hop
        assert (hop["dest_addr"], hop["dest_port"]) == (
            stack.addresses[service].host,
            stack.addresses[service].port,
        ), hop
        assert isinstance(hop["source_port"], int), hop
        assert HEX.fullmatch(hop["cert_serial"]), hop
        assert re.fullmatch(r"[0-9a-f]{64}", hop["cert_sha256"]), hop

    # ONE trace: gateway span -> transfer-engine span -> risk span, parent by parent.
    wanted = {
        GATEWAY.name: "POST /v1/transfers",
        TRANSFER_ENGINE.name: CREATE_TRANSFER,
        RISK.name: ASSESS,
    }

    def trace_spans() -> dict[str, dict[str, Any]] | None:
        found = {}
        trace = stack.trace(trace_id)
        for service, name in wanted.items():
            spans = [s for s in trace if s["service"] == service and s["name"] == name]
            if not spans:
                return None
            assert len(spans) == 1, spans
            found[service] = spans[0]
        return found

    spans = wait_until(
        trace_spans,
        timeout=FILE_TIMEOUT,
        message=lambda: (
            f"trace {trace_id} is not complete: "
            + str([(s["service"], s["name"]) for s in stack.trace(trace_id)])
        ),
    )
    everything = {s["span_id"]: s for s in stack.trace(trace_id)}

    def ancestors(span: dict[str, Any]) -> list[str]:
        chain, parent = [], span["parent_id"]
        while parent is not None and parent in everything:
            chain.append(parent)
            parent = everything[parent]["parent_id"]
        return chain

    assert spans[GATEWAY.name]["span_id"] in ancestors(spans[TRANSFER_ENGINE.name])
    assert spans[TRANSFER_ENGINE.name]["span_id"] in ancestors(spans[RISK.name])
    assert all(s["service"] == service for service, s in spans.items()), spans


# -- 2. idempotency ------------------------------------------------------------------------------


def test_idempotent_replay_and_conflict(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)
    key = new_key()
    body = order(ALICE_SAVINGS, BOB_CNY, "1.00")

    first = post_transfer(teller, ALICE, body, key)
    assert first.status == 201, first
    assert "idempotent-replayed" not in first.headers

    replay = post_transfer(teller, ALICE, body, key)
    assert (replay.status, replay.body) == (first.status, first.body)
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.headers["location"] == first.headers["location"]

    after = all_balances(teller)
    assert before[ALICE_SAVINGS] - after[ALICE_SAVINGS] == Decimal("1.00")
    assert after[BOB_CNY] - before[BOB_CNY] == Decimal("1.00")
    lines = transactions_of(teller, ALICE, ALICE_SAVINGS, first.body["created_at"][:10])
    assert [t["transfer_id"] for t in lines].count(first.body["id"]) == 1

    conflict = post_transfer(teller, ALICE, {**body, "amount": "2.00"}, key)
    assert_problem(conflict, 409)
    assert all_balances(teller) == after

    # Keys belong to one customer: bob's request with alice's key is a transfer of its own.
    bobs = post_transfer(teller, BOB, order(BOB_CNY, ALICE_CNY, "0.01"), key)
    assert bobs.status == 201, bobs
    assert "idempotent-replayed" not in bobs.headers
    assert bobs.body["id"] != first.body["id"]
    final = all_balances(teller)
    assert (final[BOB_CNY], final[ALICE_CNY]) == (
        after[BOB_CNY] - Decimal("0.01"),
        after[ALICE_CNY] + Decimal("0.01"),
    )


# -- 3. refused and held transfers ---------------------------------------------------------------


def test_overdraft_is_refused(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)
    amount = before[ALICE_SAVINGS] + Decimal("100.00")
    assert amount < Decimal("5000.00"), "keep below the review threshold: only funds decide"

    reply = post_transfer(teller, ALICE, order(ALICE_SAVINGS, BOB_CNY, f"{amount:.2f}"), new_key())

    assert_problem(reply, 422)
    assert reply.body["reasons"] == ["insufficient_funds"]
    assert reply.body["transfer"]["status"] == "rejected"
    assert reply.body["transfer_id"] == reply.body["transfer"]["id"]
    assert all_balances(teller) == before
    fetched = teller.as_customer(ALICE, "GET", f"{TRANSFERS}/{reply.body['transfer_id']}")
    assert (fetched.status, fetched.body["status"]) == (200, "rejected")


def test_risk_deny_is_refused(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)

    reply = post_transfer(teller, ALICE, order(ALICE_CNY, BOB_CNY, "50000.00"), new_key())

    assert_problem(reply, 422)
    assert reply.body["reasons"] == ["risk_denied", "amount_above_deny_threshold"]
    assert reply.body["transfer"]["status"] == "rejected"
    assert reply.body["transfer"]["risk"]["decision"] == "deny"
    assert all_balances(teller) == before


def test_risk_review_holds_the_transfer(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)
    assert before[ALICE_CNY] >= Decimal("6000.00")

    reply = post_transfer(teller, ALICE, order(ALICE_CNY, BOB_CNY, "6000.00"), new_key())

    assert reply.status == 202, reply
    assert reply.body["status"] == "review"
    assert reply.body["risk"]["decision"] == "review"
    assert reply.body["risk"]["reasons"] == ["amount_above_review_threshold"]
    assert reply.headers["location"] == f"{TRANSFERS}/{reply.body['id']}"
    assert all_balances(teller) == before
    day = reply.body["created_at"][:10]
    for customer, account in ((ALICE, ALICE_CNY), (BOB, BOB_CNY)):
        held = [t for t in transactions_of(teller, customer, account, day)]
        assert reply.body["id"] not in {t["transfer_id"] for t in held}


# -- 4. one customer, another's accounts -----------------------------------------------------


def test_other_customers_account_is_forbidden(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)

    for path in (f"/v1/accounts/{BOB_CNY}", f"/v1/accounts/{BOB_CNY}/transactions"):
        reply = teller.as_customer(ALICE, "GET", path)
        assert_problem(reply, 403)
        assert "balance" not in reply.body
        assert "transactions" not in reply.body

    stolen = post_transfer(teller, ALICE, order(BOB_CNY, ALICE_CNY, "1.00"), new_key())
    assert_problem(stolen, 403)
    assert all_balances(teller) == before

    own = balances(teller, ALICE)
    assert set(own) == {ALICE_CNY, ALICE_SAVINGS}

    # Someone else's transfer reads exactly like one that does not exist.
    alices = f"{TRANSFERS}/tr-opening-{ALICE_CNY}"
    assert teller.as_customer(ALICE, "GET", alices).status == 200
    assert_problem(teller.as_customer(BOB, "GET", alices), 404)


def test_unknown_account_or_transfer(stack: E2EStack) -> None:
    teller = stack.teller()
    before = all_balances(teller)

    assert_problem(teller.as_customer(ALICE, "GET", f"{TRANSFERS}/tr-does-not-exist"), 404)

    to_nowhere = post_transfer(teller, ALICE, order(ALICE_CNY, "acc-nobody", "1.00"), new_key())
    assert_problem(to_nowhere, 404)
    assert all_balances(teller) == before

    # Reading an account that is not yours is 403 whether or not it exists (documented in
    # services/gateway/domain/banking.py): account IDs cannot be probed through the API.
    unknown = teller.as_customer(ALICE, "GET", "/v1/accounts/acc-nobody")
    bobs = teller.as_customer(ALICE, "GET", f"/v1/accounts/{BOB_CNY}")
    assert_problem(unknown, 403)
    assert_problem(bobs, 403)
    assert (unknown.body["type"], unknown.body["title"]) == (bobs.body["type"], bobs.body["title"])


# -- 5. malformed requests -------------------------------------------------------------------

VALID = order(ALICE_CNY, BOB_CNY, "1.00")
MALFORMED_TRANSFERS: list[tuple[str, dict[str, Any], int]] = [
    ("not JSON", {"data": b'{"from_account": "acc-alice-cny",'}, 422),
    ("empty body", {"data": b""}, 422),
    ("JSON array", {"body": [ALICE_CNY, BOB_CNY, "1.00", "CNY"]}, 422),
    ("missing fields", {"body": {"from_account": ALICE_CNY, "amount": "1.00"}}, 422),
    ("amount as a JSON number", {"body": {**VALID, "amount": 12.34}}, 422),
    ("amount 1e3", {"body": {**VALID, "amount": "1e3"}}, 422),
    ("amount -5", {"body": {**VALID, "amount": "-5"}}, 422),
    ("amount 0.001", {"body": {**VALID, "amount": "0.001"}}, 422),
    ("amount 0", {"body": {**VALID, "amount": "0"}}, 422),
    ("amount abc", {"body": {**VALID, "amount": "abc"}}, 422),
    ("amount with spaces", {"body": {**VALID, "amount": " 1.00"}}, 422),
    ("huge amount", {"body": {**VALID, "amount": "1" + "0" * 19}}, 422),
    ("amount longer than any", {"body": {**VALID, "amount": "1" * 40}}, 422),
    ("currency USD", {"body": {**VALID, "currency": "USD"}}, 422),
    ("currency in lower case", {"body": {**VALID, "currency": "cny"}}, 422),
    ("unknown field", {"body": {**VALID, "memo": "hi"}}, 422),
    ("same account twice", {"body": {**VALID, "to_account": ALICE_CNY}}, 422),
    ("account id with a slash", {"body": {**VALID, "to_account": "../acc-bob-cny"}}, 422),
    ("body over 16 KiB", {"body": {**VALID, "to_account": "x" * 20_000}}, 413),
    ("missing Idempotency-Key", {"body": VALID, "key": None}, 400),
    ("Idempotency-Key over 128", {"body": VALID, "key": "k" * 129}, 400),
    ("Idempotency-Key with a space", {"body": VALID, "key": "two words"}, 400),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [pytest.param(r, s, id=name) for name, r, s in MALFORMED_TRANSFERS],
)
def test_malformed_transfer_is_a_problem(
    stack: E2EStack, request_: dict[str, Any], expected: int
) -> None:
    teller = stack.teller()
    before = all_balances(teller)
    headers = {"Authorization": f"Bearer {teller.token(ALICE)}"}
    key = request_.get("key", new_key())
    if key is not None:
        headers["Idempotency-Key"] = key

    reply = stack.https(
        stack.svid(TELLER.name),
        "POST",
        TRANSFERS,
        body=request_.get("body"),
        data=request_.get("data"),
        headers=headers,
    )

    assert_problem(reply, expected)
    assert "id" not in reply.body
    assert all_balances(teller) == before


@pytest.mark.parametrize(
    "day", ["2024-13-01", "2024-02-30", "20240101", "2024-1-1", "yesterday", "1700000000"]
)
def test_bad_from_date_is_a_problem(stack: E2EStack, day: str) -> None:
    reply = stack.teller().as_customer(
        ALICE, "GET", f"/v1/accounts/{ALICE_CNY}/transactions?from={day}"
    )
    assert_problem(reply, 422)
    assert "transactions" not in reply.body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/accounts"),
        ("GET", f"/v1/accounts/{ALICE_CNY}"),
        ("GET", f"/v1/accounts/{ALICE_CNY}/transactions"),
        ("GET", f"{TRANSFERS}/tr-opening-{ALICE_CNY}"),
        ("POST", TRANSFERS),
    ],
)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer",
        "Bearer garbage",
        "Basic YWxpY2U6YWxpY2U=",
        "Bearer eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSJ9.",
    ],
    ids=["none", "empty-bearer", "garbage", "basic", "alg-none-jwt"],
)
def test_missing_or_bad_token_is_401(
    stack: E2EStack, method: str, path: str, authorization: str | None
) -> None:
    teller = stack.teller()
    before = balances(teller, ALICE)
    headers = {"Idempotency-Key": new_key()}
    if authorization is not None:
        headers["Authorization"] = authorization
    body = VALID if method == "POST" else None

    reply = teller.request(method, path, body=body, headers=headers)

    assert_problem(reply, 401)
    assert reply.headers["www-authenticate"].startswith("Bearer"), reply
    assert balances(teller, ALICE) == before


def test_tampered_token_is_401(stack: E2EStack) -> None:
    teller = stack.teller()
    token = teller.token(ALICE)
    header, payload, signature = token.split(".")
    # A payload changed under the signature of the original.
    forged = f"{header}.{payload[:-4]}AAAA.{signature}"
    reply = teller.request("GET", "/v1/accounts", headers={"Authorization": f"Bearer {forged}"})
    assert_problem(reply, 401)
    assert "accounts" not in reply.body


# -- 6. durability: last in this module ------------------------------------------------------


def test_balances_and_idempotency_survive_a_restart(stack: E2EStack) -> None:
    processes = stack.controlled.services
    teller = stack.teller()
    key = new_key()
    body = order(BOB_CNY, ALICE_CNY, "0.50")
    first = post_transfer(teller, BOB, body, key)
    assert first.status == 201, first
    before = all_balances(teller)
    pids = {name: process.pid() for name, process in processes.items()}

    status = stack.restart()

    assert all(p.healthy for p in status.services.values()), stack.log_tails()
    restarted = {name: process.pid() for name, process in processes.items()}
    assert all(restarted[name] not in {None, pid} for name, pid in pids.items()), restarted
    teller = stack.teller()  # the old teller SVID may not outlive a restart
    assert all_balances(teller) == before
    replay = post_transfer(teller, BOB, body, key)
    assert (replay.status, replay.body) == (201, first.body)
    assert replay.headers.get("idempotent-replayed") == "true"
    assert all_balances(teller) == before
    fetched = teller.as_customer(BOB, "GET", f"{TRANSFERS}/{first.body['id']}")
    assert (fetched.status, fetched.body) == (200, first.body)
