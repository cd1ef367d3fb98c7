"""``ztbank lab breaker``: the gateway's circuit breaker to the transfer-engine trips when the
engine's SPIFFE ID namespace is made low-trust, answers at once while open, and closes again.

Against the running stack (``make up``).  The gateway's breaker scores its callee as
``0.6 x trust + 0.4 x lifetime left`` of the callee's certificate (docs/breaker.md); below 0.75 it
opens.  The lab

1. finds the trust table the running gateway watches (its ``ZTBANK_TRUST_LEVELS``) and checks
   that a read is served and the breaker is closed (``breaker_state`` 0);
2. replaces the table, atomically, with a copy in which the engine's team namespace
   (``env/prod/zone/az1/team/payments``) has trust LOW_TRUST: its score falls below 0.75;
3. shows reads and a transfer answered at once with 503 ``application/problem+json`` naming
   the open breaker (no call reaches the engine, so no money moves), ``breaker_state`` 2, and the
   transition counted by the gateway's ``breaker_transitions_total``;
4. puts the original table back (always: also on failure, Ctrl-C, SIGTERM or SIGHUP);
5. after the breaker's cool-down, one probe call goes through (half-open) and closes it: reads are
   served again, the balance is unchanged, ``breaker_state`` is 0;
6. no service was restarted.

The original is also kept under ``ZTBANK_HOME/run`` while the edit is in place (a run killed
outright leaves it there; the next run restores it first).  On the compose stack the lab runs in
its compose job, which shares the table with the gateway (docs/compose.md).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

from services.common.discovery.registry import FileRegistry, ServiceAddress
from services.common.identity.workloads import GATEWAY, TRANSFER_ENGINE
from services.labs.errors import LabError
from services.labs.support import (
    FileBackup,
    Say,
    interrupted_by_termination,
    seconds_until,
    service_starts,
    unrestarted,
    verdict,
    watched_file,
)
from services.labs.teller import Reply, TellerClient
from services.stack.native import NativeStack, StackSettings
from services.stack.probe import metric_sample, metric_samples

CUSTOMER = "alice"
ACCOUNT = "acc-alice-cny"
OTHER = "acc-alice-savings"
LOW_TRUST = 0.3  # 0.6 x 0.3 + 0.4 x 1.0 = 0.58 < 0.75 even with a brand-new certificate
BACKUP_NAME = "trust-levels"
# The gateway checks the table at most every 0.5 s; the breaker's cool-down is 10 s by default.
READY_BUDGET_SECONDS = 15.0  # serving with the breaker closed takes no longer on a stack that is up
TRIP_BUDGET_SECONDS = 5.0
RECOVERY_BUDGET_SECONDS = 40.0
AT_ONCE_SECONDS = 0.25  # an open breaker answers without the network
POLL_SECONDS = 0.2
OPEN_STATE, CLOSED_STATE = 2.0, 0.0


def lower_trust(text: str, namespace: str) -> str:
    """The trust table ``text`` with ``namespace`` (a SPIFFE ID path prefix) at LOW_TRUST."""
    try:
        table: dict[str, Any] = json.loads(text)
        levels = table["levels"]
        if not isinstance(levels, dict):
            raise TypeError("'levels' is not an object")
    except (ValueError, KeyError, TypeError) as error:
        raise LabError(f"the trust table is not a trust table: {error}") from None
    levels[namespace] = LOW_TRUST
    return json.dumps(table, indent=2) + "\n"


def engine_namespace(settings: StackSettings) -> str:
    """The engine's SPIFFE ID path down to its team: ``env/prod/zone/az1/team/payments``."""
    path = TRANSFER_ENGINE.spiffe_id(settings.trust_domain).path.strip("/")
    return path.rsplit("/svc/", 1)[0]


class Bank:
    """alice's reads and transfers through the gateway, timed."""

    def __init__(self, settings: StackSettings) -> None:
        self.client = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
        self.headers = {"Authorization": f"Bearer {self.client.token(CUSTOMER)}"}

    def read(self) -> tuple[Reply, float]:
        started = time.monotonic()
        reply = self.client.request("GET", f"/v1/accounts/{ACCOUNT}", headers=self.headers)
        return reply, time.monotonic() - started

    def transfer(self) -> Reply:
        body = {"from_account": ACCOUNT, "to_account": OTHER, "amount": "1.00", "currency": "CNY"}
        key = {"Idempotency-Key": f"lab-breaker-{uuid.uuid4()}"}
        return self.client.request(
            "POST", "/v1/transfers", body=body, headers={**self.headers, **key}
        )

    def balance(self) -> Decimal | None:
        reply, _ = self.read()
        return Decimal(reply.body["balance"]) if reply.status == 200 else None


def transitions(gateway: ServiceAddress) -> Counter[tuple[str, str]]:
    """The gateway's breaker transitions to the engine so far, by (from, to), as its metrics
    count them (``breaker_transitions_total``)."""
    return Counter(
        {
            (labels.get("from", ""), labels.get("to", "")): round(value)
            for labels, value in metric_samples(gateway, "breaker_transitions_total")
            if labels.get("target") == TRANSFER_ENGINE.name
        }
    )


def _moves(counted: Counter[tuple[str, str]]) -> str:
    moves = [f"{before} -> {after} x{n}" for (before, after), n in counted.items()]
    return ", ".join(moves) or "none"


def _open_refusal(reply: Reply) -> bool:
    body = reply.body if isinstance(reply.body, dict) else {}
    return (
        reply.status == 503
        and reply.headers.get("content-type", "").startswith("application/problem+json")
        and "circuit breaker" in str(body.get("detail", ""))
        and int(reply.headers.get("retry-after", "0")) >= 1
    )


def run_breaker_lab(settings: StackSettings, say: Say) -> bool:
    say("lab breaker: the engine's namespace is made low-trust; the gateway's breaker to it")
    say("  opens, answers at once, and closes again once trust is back")
    stack = NativeStack(settings)
    bank = Bank(settings)
    table = watched_file(stack, "ZTBANK_TRUST_LEVELS", settings.trust_levels, "trust table")
    gateway = FileRegistry(settings.registry).lookup(GATEWAY.name)
    starts = service_starts(settings)

    def state() -> float | None:
        return metric_sample(gateway, "breaker_state")

    leftover = FileBackup.load(settings, BACKUP_NAME)
    if leftover is not None:
        leftover.restore(settings)
        say(f"  0 restored {leftover.path}, left edited by an earlier run that was killed")
    ready = seconds_until(
        lambda: bank.read()[0].status == 200 and state() == CLOSED_STATE,
        READY_BUDGET_SECONDS,
        POLL_SECONDS,
    )
    if ready is None:
        raise LabError("the gateway does not serve reads with its breaker closed; is the stack up?")
    before = bank.balance()
    seen = transitions(gateway)
    namespace = engine_namespace(settings)
    say(f"  1 the gateway watches {table}; reads are served, breaker_state 0 (closed)")

    backup = FileBackup.of(table, BACKUP_NAME)
    checks: list[bool] = []
    with interrupted_by_termination():
        backup.save(settings)
        try:
            edited = lower_trust(backup.content.decode(), namespace)
            backup.replace(edited.encode())
            say(f"  2 replaced the trust table (temp file + rename): {namespace} -> {LOW_TRUST}")
            tripped = seconds_until(
                lambda: _open_refusal(bank.read()[0]), TRIP_BUDGET_SECONDS, POLL_SECONDS
            )
            checks.append(tripped is not None)
            reply, took = bank.read()
            refused_at_once = _open_refusal(reply) and took < AT_ONCE_SECONDS
            checks.append(refused_at_once)
            detail = reply.body.get("detail") if isinstance(reply.body, dict) else reply.body
            say(
                f"  3 {'tripped' if tripped is not None else 'did NOT trip'}; a read is answered"
                f" in {took * 1000:.0f} ms: HTTP {reply.status}, {detail!r}"
            )
            posted = bank.transfer()
            checks.append(_open_refusal(posted))
            say(f"    a transfer: HTTP {posted.status} (no call reached the engine)")
            gauge = state()
            checks.append(gauge == OPEN_STATE)
            say(f"    breaker_state {gauge if gauge is None else f'{gauge:g}'}")
            opened = transitions(gateway) - seen
            checks.append(any(to == "open" for _, to in opened))
            say(f"    breaker_transitions_total counted {_moves(opened)}")
        finally:
            backup.restore(settings)
    restored = table.read_bytes() == backup.content
    checks.append(restored)
    say(f"  4 {'restored' if restored else 'could NOT restore'} the original trust table")

    recovered = seconds_until(
        lambda: bank.read()[0].status == 200, RECOVERY_BUDGET_SECONDS, POLL_SECONDS
    )
    checks.append(recovered is not None)
    since = transitions(gateway) - seen
    closed_again = Counter({move: n for move, n in since.items() if move[0] != "closed"})
    say(
        f"  5 served again after {recovered:.1f} s (the cool-down, then one probe):"
        f" {_moves(closed_again)}"
        if recovered is not None
        else f"  5 NOT served again within {RECOVERY_BUDGET_SECONDS:g} s"
    )
    after = bank.balance()
    checks += [after == before, state() == CLOSED_STATE]
    gauge = state()
    shown = f"{gauge:g}" if gauge is not None else "absent"
    say(f"    balance {after} (was {before}); breaker_state {shown}")
    checks.append(unrestarted(starts, service_starts(settings), say, 6))
    return verdict(
        say,
        checks,
        [
            "lab passed: a low-trust callee tripped the breaker, which refused at once and",
            "  moved no money, and closed again through one probe once trust was back",
        ],
    )
