"""Attacks on the write paths (issue 20, item 3): whoever is not a path's one caller moves nothing.

Each write path is asked to move money (or to count a transfer) by clients the policy chain
(teller -> gateway -> transfer-engine -> risk) does not admit there: a minted intruder ID of the
trust domain, the other workloads' own SVIDs, a revoked certificate of the legitimate caller's
ID; and by the legitimate caller misusing it (an idempotency key replayed with another body,
another customer's token).  For every attack the test asserts what the client sees exactly, the
audit record of the service that refused, and that nothing changed: the balances and the
transaction lists of every customer account, the risk service's velocity store, and that the
idempotency key of the attack is still unused (so no rejected or held transfer was stored
either; neither shows in a balance).

Every attack sends the same request as a positive control that the legitimate caller sends at the
end of the module: it IS served and DOES move money and velocity, so each "nothing changed"
comparison is shown able to fail.  Attacks and controls carry a W3C ``traceparent`` of their
own, so the records of exactly that request are found in every service's audit log.

The velocity store is the risk service's SQLite file, read here read-only; a stack where this
process cannot read it skips the tests that need it, saying so.  Money only ever moves from bob's
account, three times: alice's accounts are what tests/e2e/test_rotation.py keeps busy, and risk's
velocity rule holds more than 5 transfers from one account within 60 s for review.  Before each
transfer that must be posted, the module waits until risk's own history leaves room for it.
"""

from __future__ import annotations

import secrets
import sqlite3
import ssl
import time
import urllib.request
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from http.client import RemoteDisconnected
from typing import Any

import grpc
import pytest
from cryptography import x509

from services._proto import ledger_pb2, risk_pb2
from services.common.identity.pem import fingerprint_sha256
from services.common.identity.workloads import GATEWAY, OPS, RISK, TELLER, TRANSFER_ENGINE
from services.risk.domain.rules import parse_rules
from tests.e2e.conftest import (
    RPC_TIMEOUT,
    AnyCredentials,
    Credentials,
    E2EStack,
    GatewayRefusedError,
    HttpsReply,
    as_credentials,
    balances,
)
from tests.support.helpers import wait_until

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice", "bob"
ALICE_CNY, ALICE_SAVINGS, BOB_CNY = "acc-alice-cny", "acc-alice-savings", "acc-bob-cny"
CUSTOMERS = (ALICE, BOB)
TRANSFERS = "/v1/transfers"
POST_TRANSFERS = f"POST {TRANSFERS}"
CREATE_TRANSFER = "/ztbank.ledger.v1.TransferEngine/CreateTransfer"
LIST_ACCOUNTS = "/ztbank.ledger.v1.TransferEngine/ListAccounts"
ASSESS = "/ztbank.risk.v1.Risk/Assess"
INTRUDER_PATH = "/env/prod/zone/az1/team/x/svc/write-intruder"
PROBLEM_PREFIX = "tag:ztbank.example,2026:problem:"
# A revocation reaches every service within a CRL poll (0.5 s); generous on a loaded machine.
REVOCATION_TIMEOUT = 20.0
# How a client sees a connection aborted after the TLS handshake, with no TLS alert and no HTTP
# answer: which one depends only on where the abort finds it (writing the request: a reset, a
# broken pipe or TLS's EOF; reading the answer: a reset, or an EOF before any status line).
CLOSED_WITHOUT_ANSWER = (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, RemoteDisconnected)
VICTIM_TTL_SECONDS = 300

# What every client asks each path, the control included.
ENGINE_CUSTOMER, ENGINE_FROM, ENGINE_TO, ENGINE_MINOR = BOB, BOB_CNY, ALICE_CNY, 7
ENGINE_AMOUNT = Decimal("0.07")
GATEWAY_CUSTOMER = BOB
GATEWAY_ORDER = {
    "from_account": BOB_CNY,
    "to_account": ALICE_SAVINGS,
    "amount": "0.05",
    "currency": "CNY",
}
# Accounts the ledger does not hold: assessing them counts velocity, and no transfer's.
PROBE_FROM, PROBE_TO = "acc-e2e-write-attack-from", "acc-e2e-write-attack-to"


def probe_assessment() -> risk_pb2.AssessRequest:
    return risk_pb2.AssessRequest(
        transfer_id=f"tr-e2e-{uuid.uuid4().hex}",
        customer=ALICE,
        from_account=PROBE_FROM,
        to_account=PROBE_TO,
        amount_minor=100,
        currency="CNY",
    )


def new_key() -> str:
    return f"e2e-attack-{uuid.uuid4()}"


def new_trace() -> tuple[str, str]:
    """A trace ID and the W3C ``traceparent`` that starts it (sampled)."""
    trace_id = secrets.token_hex(16)
    return trace_id, f"00-{trace_id}-{secrets.token_hex(8)}-01"


# -- what nothing changed means ----------------------------------------------------------------


@dataclass(frozen=True, order=True)
class VelocityEvent:
    rowid: int
    account: str
    at: float


def velocity_events(stack: E2EStack) -> frozenset[VelocityEvent]:
    """Every row of the risk service's velocity history, read from its SQLite file read-only
    (WAL: the writer's last commit is seen).  Skips where this process cannot read the file (a
    stack not ours that keeps it elsewhere); the sandbox stack must always give it."""
    path = stack.settings.home_of(RISK.name) / "risk" / "velocity.db"
    try:
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute("SELECT rowid, account, at FROM velocity_events").fetchall()
    except (OSError, sqlite3.Error) as error:
        if stack.native is not None:
            raise
        pytest.skip(f"reads risk's velocity store, which this stack does not let us: {error}")
    return frozenset(VelocityEvent(int(r[0]), str(r[1]), float(r[2])) for r in rows)


def wait_for_velocity_room(stack: E2EStack, account: str) -> None:
    """Until one more transfer from ``account`` stays within risk's velocity rule, by risk's own
    history and rules: a control must be posted, not held for review because another module
    (or an earlier run on the same stack) has just been busy with the account."""
    path = stack.settings.risk_rules
    rules = parse_rules(path.read_bytes(), source=str(path))

    def recent() -> int:
        horizon = time.time() - rules.velocity_window_seconds
        return sum(1 for e in velocity_events(stack) if e.account == account and e.at > horizon)

    wait_until(
        lambda: recent() < rules.velocity_max_transfers,
        timeout=rules.velocity_window_seconds + 10,
        message=lambda: f"{recent()} transfers from {account} within risk's velocity window",
        interval=0.5,
    )


@dataclass(frozen=True)
class BankState:
    """What an attack on a write path could change."""

    balances: dict[str, Decimal]  # every account of alice and bob
    transactions: dict[str, list[dict[str, Any]]]  # the same accounts' whole histories
    velocity: frozenset[VelocityEvent]


def bank_state(stack: E2EStack) -> BankState:
    teller = stack.teller()
    amounts: dict[str, Decimal] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    for customer in CUSTOMERS:
        own = balances(teller, customer)
        amounts.update(own)
        for account in own:
            reply = teller.as_customer(customer, "GET", f"/v1/accounts/{account}/transactions")
            assert reply.status == 200, reply
            histories[account] = list(reply.body["transactions"])
    return BankState(amounts, histories, velocity_events(stack))


def new_lines(before: BankState, after: BankState, transfer_id: str) -> dict[str, str]:
    """The amount of each ledger line ``transfer_id`` added, by account."""
    found = {}
    for account, lines in after.transactions.items():
        added = [line for line in lines if line not in before.transactions[account]]
        assert all(line["transfer_id"] == transfer_id for line in added), added
        found.update({line["account_id"]: line["amount"] for line in added})
    return found


# -- raw calls ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RpcOutcome:
    code: grpc.StatusCode
    details: str
    reply: Any  # None unless OK


def rpc(
    stack: E2EStack,
    service: str,
    credentials: AnyCredentials,
    method: str,
    request: Any,
    response_type: Any,
    traceparent: str | None = None,
) -> RpcOutcome:
    """One unary call on a new channel (so a new TLS connection) as ``credentials``."""
    metadata = (("traceparent", traceparent),) if traceparent else None
    with stack.grpc_channel(service, credentials) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            reply = call(request, timeout=RPC_TIMEOUT, metadata=metadata)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call):  # every unary call error is one
                raise
            return RpcOutcome(error.code(), error.details() or "", None)
    return RpcOutcome(grpc.StatusCode.OK, "", reply)


def engine_order(key: str) -> ledger_pb2.CreateTransferRequest:
    return ledger_pb2.CreateTransferRequest(
        customer=ENGINE_CUSTOMER,
        idempotency_key=key,
        from_account=ENGINE_FROM,
        to_account=ENGINE_TO,
        amount_minor=ENGINE_MINOR,
        currency="CNY",
    )


def create_transfer(
    stack: E2EStack, credentials: AnyCredentials, request: ledger_pb2.CreateTransferRequest
) -> tuple[RpcOutcome, str]:
    trace_id, traceparent = new_trace()
    outcome = rpc(
        stack,
        TRANSFER_ENGINE.name,
        credentials,
        CREATE_TRANSFER,
        request,
        ledger_pb2.Transfer,
        traceparent,
    )
    return outcome, trace_id


def post_transfer(
    stack: E2EStack, credentials: AnyCredentials, token: str, key: str, body: dict[str, str]
) -> tuple[HttpsReply, str]:
    trace_id, traceparent = new_trace()
    reply = stack.https(
        credentials,
        "POST",
        TRANSFERS,
        body=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Idempotency-Key": key,
            "traceparent": traceparent,
        },
    )
    return reply, trace_id


def problem_body(reply: HttpsReply) -> dict[str, Any]:
    assert reply.is_problem, reply
    assert isinstance(reply.body, dict)
    return reply.body


# -- the idempotency keys of the attacks stay unused ---------------------------------------------


def engine_key_probe(stack: E2EStack, customer: str, key: str) -> RpcOutcome:
    """The transfer-engine looks a key up before anything else: asked again by the gateway with
    the key and a source account that is not the customer's, it answers "not yours" only if no
    transfer (posted, held or rejected) is stored under the key; else ALREADY_EXISTS."""
    own, foreign = (BOB_CNY, ALICE_CNY) if customer == BOB else (ALICE_CNY, BOB_CNY)
    probe = ledger_pb2.CreateTransferRequest(
        customer=customer,
        idempotency_key=key,
        from_account=foreign,
        to_account=own,
        amount_minor=1,
        currency="CNY",
    )
    outcome, _ = create_transfer(stack, stack.svid(GATEWAY.name), probe)
    return outcome


def assert_engine_key_unused(stack: E2EStack, customer: str, key: str) -> None:
    foreign = ALICE_CNY if customer == BOB else BOB_CNY
    outcome = engine_key_probe(stack, customer, key)
    assert (outcome.code, outcome.details) == (
        grpc.StatusCode.PERMISSION_DENIED,
        f"account {foreign} does not belong to customer {customer}",
    ), outcome


def gateway_key_probe(stack: E2EStack, customer: str, key: str) -> HttpsReply:
    """The same through the gateway, as the teller: 403 "not yours" while the key is unused,
    409 once it is taken."""
    foreign = ALICE_SAVINGS if customer == BOB else BOB_CNY
    token = stack.teller().token(customer)
    body = {**GATEWAY_ORDER, "from_account": foreign, "to_account": ALICE_CNY}
    reply, _ = post_transfer(stack, stack.svid(TELLER.name), token, key, body)
    return reply


def assert_gateway_key_unused(stack: E2EStack, customer: str, key: str) -> None:
    foreign = ALICE_SAVINGS if customer == BOB else BOB_CNY
    reply = gateway_key_probe(stack, customer, key)
    assert (reply.status, problem_body(reply)) == (
        403,
        {
            "type": f"{PROBLEM_PREFIX}forbidden",
            "title": "Not allowed",
            "status": 403,
            "detail": f"account {foreign!r} is not one of your accounts",
            "instance": TRANSFERS,
        },
    )


# -- audit ---------------------------------------------------------------------------------------


def in_trace(stack: E2EStack, service: str, trace_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.audit(service) if r["trace_id"] == trace_id]


def the_record(stack: E2EStack, service: str, trace_id: str, method: str) -> dict[str, Any]:
    """The one record ``service`` wrote for the request of ``trace_id``."""
    stack.wait_for_audit(
        service,
        lambda r: r["trace_id"] == trace_id and r["method"] == method,
        f"{method} in trace {trace_id}",
    )
    records = in_trace(stack, service, trace_id)
    assert len(records) == 1, records
    return records[0]


def assert_denied(
    record: dict[str, Any], credentials: AnyCredentials, spiffe_id: str, reason: str
) -> None:
    leaf = as_credentials(credentials).leaf
    assert {
        k: record[k]
        for k in ("caller_spiffe_id", "cert_serial", "cert_sha256", "decision", "reason", "event")
    } == {
        "caller_spiffe_id": spiffe_id,
        "cert_serial": as_credentials(credentials).serial,
        "cert_sha256": fingerprint_sha256(leaf),
        "decision": "deny",
        "reason": reason,
        "event": "authz",
    }, record


def assert_allowed(stack: E2EStack, service: str, trace_id: str, method: str, caller: str) -> None:
    record = the_record(stack, service, trace_id, method)
    assert (record["caller_spiffe_id"], record["decision"], record["reason"]) == (
        stack.spiffe_id(caller),
        "allow",
        f"allowed by policy rule for {service}",
    ), record


def assert_allowed_then_refused(
    stack: E2EStack, service: str, trace_id: str, method: str, caller: str, refusal: str
) -> None:
    """The policy allowed the call and the service refused it itself: two records, the allow
    and the refusal with its reason (event ``request_refused``)."""
    stack.wait_for_audit(
        service,
        lambda r: r["trace_id"] == trace_id and r["event"] == "request_refused",
        f"the refusal of {method} in trace {trace_id}",
    )
    records = in_trace(stack, service, trace_id)
    seen = [
        (r["event"], r["decision"], r["caller_spiffe_id"], r["method"], r["reason"])
        for r in records
    ]
    caller_id = stack.spiffe_id(caller)
    assert seen == [
        ("authz", "allow", caller_id, method, f"allowed by policy rule for {service}"),
        ("request_refused", "deny", caller_id, method, f"refused by the service: {refusal}"),
    ], seen


def policy_denial(caller_id: str, service: str, method: str) -> str:
    return f"no policy rule allows {caller_id} to call {service} {method}"


# -- revocation ----------------------------------------------------------------------------------


def revoke(stack: E2EStack, victim: Credentials) -> str:
    """``ztbank revoke`` as an operator runs it; the reason the services will give: built from
    the issuer's CRL entry, as a service reads it."""
    result = stack.cli("revoke", "--serial", victim.serial, "--reason", "keyCompromise")
    assert result.returncode == 0, result.stderr
    with urllib.request.urlopen(f"http://{stack.settings.issuer_http}/crls", timeout=5) as reply:
        text = reply.read()
    end = b"-----END X509 CRL-----"
    crls = [x509.load_pem_x509_crl(block + end) for block in text.split(end) if block.strip()]
    serial = victim.leaf.serial_number
    (crl, entry), *others = [(crl, e) for crl in crls for e in crl if e.serial_number == serial]
    assert not others, others
    flag = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert flag is x509.ReasonFlags.key_compromise
    return (
        f"certificate revoked: serial {victim.serial} revoked at "
        f"{entry.revocation_date_utc.isoformat()} by {crl.issuer.rfc4514_string()}, "
        f"reason {flag.name}"
    )


# -- fixtures ----------------------------------------------------------------------------------


def attacker(stack: E2EStack, kind: str) -> Credentials:
    """A client by kind, valid now (SVIDs live 20 s on the test stacks): an ID of the trust
    domain that no policy rule names, minted; or a workload's own current SVID."""
    if kind == "intruder":
        return stack.mint(f"spiffe://{stack.trust_domain}{INTRUDER_PATH}")
    return as_credentials(stack.svid(kind))


def spiffe_id_of(stack: E2EStack, kind: str) -> str:
    if kind == "intruder":
        return f"spiffe://{stack.trust_domain}{INTRUDER_PATH}"
    return stack.spiffe_id(kind)


@pytest.fixture
def unchanged(stack: E2EStack) -> Callable[[], BankState]:
    """The bank's state before the test; the test asserts it unchanged where it says so."""
    before = bank_state(stack)

    def check() -> BankState:
        after = bank_state(stack)
        assert after.balances == before.balances
        assert after.transactions == before.transactions
        assert after.velocity == before.velocity
        return after

    return check


# -- 1. CreateTransfer at the transfer-engine, called directly ----------------------------------


@pytest.mark.parametrize("kind", ["intruder", RISK.name, OPS.name])
def test_create_transfer_from_outside_the_chain_is_refused(
    stack: E2EStack,
    kind: str,
    unchanged: Callable[[], BankState],
) -> None:
    """Only the gateway may ask the transfer-engine for a transfer: an SVID of the trust domain
    is not enough, nor is being one of the bank's own workloads.  The interceptor refuses before
    the servicer runs, so risk is never asked and the velocity store stays as it was."""
    client = attacker(stack, kind)
    caller_id = spiffe_id_of(stack, kind)
    key = new_key()

    outcome, trace_id = create_transfer(stack, client, engine_order(key))

    reason = policy_denial(caller_id, TRANSFER_ENGINE.name, CREATE_TRANSFER)
    assert (outcome.code, outcome.details, outcome.reply) == (
        grpc.StatusCode.PERMISSION_DENIED,
        reason,
        None,
    )
    record = the_record(stack, TRANSFER_ENGINE.name, trace_id, CREATE_TRANSFER)
    assert_denied(record, client, caller_id, reason)
    assert in_trace(stack, RISK.name, trace_id) == []
    unchanged()
    assert_engine_key_unused(stack, ENGINE_CUSTOMER, key)


def test_create_transfer_with_a_revoked_gateway_certificate_is_refused(
    stack: E2EStack,
) -> None:
    """The gateway's own SPIFFE ID on a revoked certificate (a stolen key) moves nothing: once
    the transfer-engine has the CRL, every call is refused before the policy is even asked."""
    victim = stack.mint(stack.spiffe_id(GATEWAY.name), ttl_seconds=VICTIM_TTL_SECONDS)
    listing = ledger_pb2.ListAccountsRequest(customer=ENGINE_CUSTOMER)
    served = rpc(
        stack, TRANSFER_ENGINE.name, victim, LIST_ACCOUNTS, listing, ledger_pb2.ListAccountsResponse
    )
    assert served.code == grpc.StatusCode.OK, served  # the certificate alone was good

    reason = revoke(stack, victim)

    # Evidence that the transfer-engine enforces it: a read with the certificate is refused.
    def read_refused() -> RpcOutcome | None:
        outcome = rpc(
            stack,
            TRANSFER_ENGINE.name,
            victim,
            LIST_ACCOUNTS,
            listing,
            ledger_pb2.ListAccountsResponse,
        )
        return outcome if outcome.code != grpc.StatusCode.OK else None

    refused_read = wait_until(
        read_refused,
        timeout=REVOCATION_TIMEOUT,
        message="the transfer-engine still serves the revoked certificate",
    )
    assert (refused_read.code, refused_read.details) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "certificate revoked",
    )
    before = bank_state(stack)
    key = new_key()

    outcome, trace_id = create_transfer(stack, victim, engine_order(key))

    assert (outcome.code, outcome.details, outcome.reply) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "certificate revoked",
        None,
    )
    record = the_record(stack, TRANSFER_ENGINE.name, trace_id, CREATE_TRANSFER)
    assert_denied(record, victim, stack.spiffe_id(GATEWAY.name), reason)
    assert in_trace(stack, RISK.name, trace_id) == []
    assert bank_state(stack) == before
    assert_engine_key_unused(stack, ENGINE_CUSTOMER, key)


# -- 2. POST /v1/transfers at the gateway --------------------------------------------------------


@pytest.mark.parametrize("kind", ["intruder", RISK.name, OPS.name])
def test_post_transfer_from_outside_the_chain_is_refused(
    stack: E2EStack,
    kind: str,
    unchanged: Callable[[], BankState],
) -> None:
    """A valid customer token does not make any client a teller: the gateway's policy refuses
    the request before the app reads it, so the transfer-engine never hears of it."""
    client = attacker(stack, kind)
    caller_id = spiffe_id_of(stack, kind)
    token = stack.teller().token(GATEWAY_CUSTOMER)
    key = new_key()

    reply, trace_id = post_transfer(stack, client, token, key, GATEWAY_ORDER)

    reason = policy_denial(caller_id, GATEWAY.name, POST_TRANSFERS)
    assert (reply.status, problem_body(reply)) == (
        403,
        {"type": "about:blank", "title": "Forbidden", "status": 403, "detail": reason},
    )
    record = the_record(stack, GATEWAY.name, trace_id, POST_TRANSFERS)
    assert_denied(record, client, caller_id, reason)
    assert record["source_port"] == reply.local_port, record
    assert in_trace(stack, TRANSFER_ENGINE.name, trace_id) == []
    assert in_trace(stack, RISK.name, trace_id) == []
    unchanged()
    assert_gateway_key_unused(stack, GATEWAY_CUSTOMER, key)


def test_post_transfer_with_a_revoked_teller_certificate_is_refused(stack: E2EStack) -> None:
    """The teller's ID on a revoked certificate gets no HTTP answer at all: the gateway checks
    revocation right after the TLS handshake and closes the connection, so no request on it is
    ever read, let alone authorized."""
    victim = stack.mint(stack.spiffe_id(TELLER.name), ttl_seconds=VICTIM_TTL_SECONDS)
    token = stack.teller().token(GATEWAY_CUSTOMER)
    auth = {"Authorization": f"Bearer {token}"}
    served = stack.https(victim, "GET", "/v1/accounts", headers=auth)
    assert served.status == 200, served  # the certificate alone was good

    reason = revoke(stack, victim)

    # Evidence that the gateway enforces it: a read with the certificate is refused.
    def read_refused() -> GatewayRefusedError | None:
        try:
            reply = stack.https(victim, "GET", "/v1/accounts", headers=auth)
        except GatewayRefusedError as refused:
            return refused
        assert reply.status == 200, reply
        return None

    wait_until(
        read_refused,
        timeout=REVOCATION_TIMEOUT,
        message="the gateway still serves the revoked certificate",
    )
    before = bank_state(stack)
    key = new_key()

    with pytest.raises(GatewayRefusedError) as refused:
        post_transfer(stack, victim, token, key, GATEWAY_ORDER)

    # The client's handshake completed; the gateway then aborted the connection, sending no
    # TLS alert and no status line.
    assert refused.value.stage == "request", refused.value
    assert isinstance(refused.value.error, CLOSED_WITHOUT_ANSWER), refused.value
    record = stack.wait_for_audit(
        GATEWAY.name,
        lambda r: (
            r["source_port"] == refused.value.local_port and r["cert_serial"] == victim.serial
        ),
        "the revoked teller's connection",
    )
    assert {
        k: record[k]
        for k in ("caller_spiffe_id", "cert_serial", "method", "decision", "reason", "event")
    } == {
        "caller_spiffe_id": stack.spiffe_id(TELLER.name),
        "cert_serial": victim.serial,
        "method": "TLS handshake",
        "decision": "deny",
        "reason": reason,
        "event": "tls_handshake",
    }, record
    assert record["handshake"] == "fail", record
    # Nor did a transfer request of this certificate ever reach the policy.
    after_revocation = [r for r in stack.audit(GATEWAY.name) if r["cert_serial"] == victim.serial]
    assert not [r for r in after_revocation if r["method"] == POST_TRANSFERS], after_revocation
    assert bank_state(stack) == before
    assert_gateway_key_unused(stack, GATEWAY_CUSTOMER, key)


def test_replayed_key_with_another_body_is_a_conflict(stack: E2EStack) -> None:
    """A retry must never become a second transfer: the same key with another body is a 409,
    the first transfer stays as it was and risk is not asked again.  The refusal is the
    transfer-engine's, after the policy allowed the teller: both hops audit the allow, then
    the refusal with its reason."""
    token = stack.teller().token(BOB)
    key = new_key()
    first_order = {**GATEWAY_ORDER, "to_account": ALICE_CNY, "amount": "0.03"}
    wait_for_velocity_room(stack, BOB_CNY)
    teller_svid = stack.svid(TELLER.name)
    first, _ = post_transfer(stack, teller_svid, token, key, first_order)
    assert first.status == 201, first
    assert first.body["status"] == "posted", first
    state = bank_state(stack)

    conflict, trace_id = post_transfer(
        stack, teller_svid, token, key, {**first_order, "amount": "300.00"}
    )

    assert (conflict.status, problem_body(conflict)) == (
        409,
        {
            "type": f"{PROBLEM_PREFIX}conflict",
            "title": "Conflicts with an earlier request",
            "status": 409,
            "detail": f"idempotency key {key!r} was already used for another request",
            "instance": TRANSFERS,
        },
    )
    assert "location" not in conflict.headers
    reused = f"idempotency key {key!r} was already used for another request"
    assert_allowed_then_refused(
        stack,
        GATEWAY.name,
        trace_id,
        POST_TRANSFERS,
        TELLER.name,
        f"409 Conflicts with an earlier request: {reused}",
    )
    assert_allowed_then_refused(
        stack,
        TRANSFER_ENGINE.name,
        trace_id,
        CREATE_TRANSFER,
        GATEWAY.name,
        f"ALREADY_EXISTS {reused}",
    )
    assert in_trace(stack, RISK.name, trace_id) == []
    assert bank_state(stack) == state
    for account in (ALICE_CNY, BOB_CNY):
        ids = [line["transfer_id"] for line in state.transactions[account]]
        assert ids.count(first.body["id"]) == 1, ids
    fetched = stack.teller().as_customer(BOB, "GET", f"{TRANSFERS}/{first.body['id']}")
    assert (fetched.status, fetched.body) == (200, first.body)


def test_transfer_with_another_customers_token_is_refused(
    stack: E2EStack, unchanged: Callable[[], BankState]
) -> None:
    """The teller acting for bob cannot draw on alice's account: the transfer-engine checks
    that the source is the token's customer's before risk is asked, and the gateway words the
    refusal so that it tells nothing about the account.  As for the conflict, each hop audits
    the policy's allow, then its own refusal with the reason."""
    token = stack.teller().token(BOB)
    key = new_key()
    stolen = {**GATEWAY_ORDER, "from_account": ALICE_CNY}

    reply, trace_id = post_transfer(stack, stack.svid(TELLER.name), token, key, stolen)

    assert (reply.status, problem_body(reply)) == (
        403,
        {
            "type": f"{PROBLEM_PREFIX}forbidden",
            "title": "Not allowed",
            "status": 403,
            "detail": f"account {ALICE_CNY!r} is not one of your accounts",
            "instance": TRANSFERS,
        },
    )
    assert_allowed_then_refused(
        stack,
        GATEWAY.name,
        trace_id,
        POST_TRANSFERS,
        TELLER.name,
        f"403 Not allowed: account {ALICE_CNY!r} is not one of your accounts",
    )
    assert_allowed_then_refused(
        stack,
        TRANSFER_ENGINE.name,
        trace_id,
        CREATE_TRANSFER,
        GATEWAY.name,
        f"PERMISSION_DENIED account {ALICE_CNY} does not belong to customer {BOB}",
    )
    assert in_trace(stack, RISK.name, trace_id) == []
    unchanged()
    assert_gateway_key_unused(stack, BOB, key)


# -- 3. Assess at risk, called directly ----------------------------------------------------------


@pytest.mark.parametrize("kind", [GATEWAY.name, TELLER.name])
def test_assess_from_outside_its_caller_is_refused(
    stack: E2EStack,
    kind: str,
    unchanged: Callable[[], BankState],
) -> None:
    """Every assessment is written to the velocity history: a client other than the
    transfer-engine could fill it and get a customer's transfers held.  The policy refuses
    before the servicer runs, so nothing is recorded."""
    client = attacker(stack, kind)
    trace_id, traceparent = new_trace()

    outcome = rpc(
        stack, RISK.name, client, ASSESS, probe_assessment(), risk_pb2.Assessment, traceparent
    )

    reason = policy_denial(stack.spiffe_id(kind), RISK.name, ASSESS)
    assert (outcome.code, outcome.details, outcome.reply) == (
        grpc.StatusCode.PERMISSION_DENIED,
        reason,
        None,
    )
    record = the_record(stack, RISK.name, trace_id, ASSESS)
    assert_denied(record, client, stack.spiffe_id(kind), reason)
    unchanged()


# -- 4. the controls: the legitimate caller's identical request is served ---------------------


def test_control_gateway_identity_creates_the_identical_transfer(stack: E2EStack) -> None:
    """The request the attackers sent to the transfer-engine, from the gateway's own SVID:
    served, money moved, velocity counted, and the key then taken. So the comparisons above
    (state, risk's audit, the key probe) can see a transfer."""
    wait_for_velocity_room(stack, ENGINE_FROM)
    before = bank_state(stack)
    key = new_key()

    outcome, trace_id = create_transfer(stack, stack.svid(GATEWAY.name), engine_order(key))

    assert outcome.code == grpc.StatusCode.OK, outcome
    transfer = outcome.reply
    assert (transfer.status, transfer.replayed, transfer.idempotency_key) == ("posted", False, key)
    after = bank_state(stack)
    assert after.balances == {
        **before.balances,
        ENGINE_FROM: before.balances[ENGINE_FROM] - ENGINE_AMOUNT,
        ENGINE_TO: before.balances[ENGINE_TO] + ENGINE_AMOUNT,
    }
    assert new_lines(before, after, transfer.id) == {ENGINE_FROM: "-0.07", ENGINE_TO: "0.07"}
    assert [e.account for e in after.velocity - before.velocity] == [ENGINE_FROM]
    assert before.velocity < after.velocity
    assert_allowed(stack, TRANSFER_ENGINE.name, trace_id, CREATE_TRANSFER, GATEWAY.name)
    assert_allowed(stack, RISK.name, trace_id, ASSESS, TRANSFER_ENGINE.name)
    taken = engine_key_probe(stack, ENGINE_CUSTOMER, key)
    assert (taken.code, taken.details) == (
        grpc.StatusCode.ALREADY_EXISTS,
        f"idempotency key {key!r} was already used for another request",
    )


def test_control_teller_posts_the_identical_transfer(stack: E2EStack) -> None:
    """The request the attackers sent to the gateway, from the teller's own SVID: served,
    money moved, velocity counted, the key then taken."""
    token = stack.teller().token(GATEWAY_CUSTOMER)
    wait_for_velocity_room(stack, GATEWAY_ORDER["from_account"])
    before = bank_state(stack)
    key = new_key()

    reply, trace_id = post_transfer(stack, stack.svid(TELLER.name), token, key, GATEWAY_ORDER)

    assert reply.status == 201, reply
    assert reply.body["status"] == "posted", reply
    assert "idempotent-replayed" not in reply.headers
    after = bank_state(stack)
    amount = Decimal(GATEWAY_ORDER["amount"])
    source, target = GATEWAY_ORDER["from_account"], GATEWAY_ORDER["to_account"]
    assert after.balances == {
        **before.balances,
        source: before.balances[source] - amount,
        target: before.balances[target] + amount,
    }
    assert new_lines(before, after, reply.body["id"]) == {source: "-0.05", target: "0.05"}
    assert [e.account for e in after.velocity - before.velocity] == [source]
    assert_allowed(stack, GATEWAY.name, trace_id, POST_TRANSFERS, TELLER.name)
    assert_allowed(stack, TRANSFER_ENGINE.name, trace_id, CREATE_TRANSFER, GATEWAY.name)
    assert_allowed(stack, RISK.name, trace_id, ASSESS, TRANSFER_ENGINE.name)
    taken = gateway_key_probe(stack, GATEWAY_CUSTOMER, key)
    assert (taken.status, problem_body(taken)["type"]) == (409, f"{PROBLEM_PREFIX}conflict")


def test_control_transfer_engine_identity_counts_velocity(stack: E2EStack) -> None:
    """The assessment the attackers asked for, from the transfer-engine's own SVID: answered,
    and one event lands in the velocity history."""
    before = velocity_events(stack)
    trace_id, traceparent = new_trace()

    outcome = rpc(
        stack,
        RISK.name,
        stack.svid(TRANSFER_ENGINE.name),
        ASSESS,
        probe_assessment(),
        risk_pb2.Assessment,
        traceparent,
    )

    assert outcome.code == grpc.StatusCode.OK, outcome
    after = velocity_events(stack)
    assert [e.account for e in after - before] == [PROBE_FROM]
    assert_allowed(stack, RISK.name, trace_id, ASSESS, TRANSFER_ENGINE.name)
