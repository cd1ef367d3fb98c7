"""``ztbank lab expiry``: a client SVID that nobody renews runs out; the gateway refuses it from
its notAfter on, and serves the client again once it holds a valid SVID.

Against the running native stack (``make up``), in about 15 s whatever the stack's SVID TTL:

1. mint a teller SVID of SHORT_TTL_SECONDS through the issuer's admin API, as ``ztbank svid
   mint`` does: nothing renews it (a workload's SVID is renewed by its Workload API stream);
2. ask the gateway on a new connection every POLL_SECONDS until after its notAfter: served
   before, refused from then on (fail closed), at most EXPIRY_BUDGET_SECONDS late;
3. find the refusals in the gateway's audit (the records of those connections): a handshake
   refused with the rule that failed (a connection whose handshake came just before notAfter is
   closed at notAfter instead, and audited so);
4. a keep-alive connection opened before the expiry is closed at the expiry too (the handshake
   checked validity once; the gateway closes a connection when its certificate runs out);
5. hand the client a fresh SVID: served again, on the next connection;
6. the stack's own teller was served throughout.

Nothing of the stack is changed; the minted SVIDs expire by themselves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.discovery.registry import FileRegistry
from services.common.identity.source import SvidMaterial
from services.common.identity.workloads import GATEWAY
from services.labs.support import (
    Outcome,
    Say,
    accounts_served,
    last_gateway_denial,
    mint_teller_svid,
    present,
    verdict,
)
from services.labs.teller import TellerClient
from services.stack.native import StackSettings

CUSTOMER = "alice"
SHORT_TTL_SECONDS = 8  # the issuer mints no shorter than 5 s
RENEWED_TTL_SECONDS = 60
POLL_SECONDS = 0.25
# How late after notAfter the first refusal may come: the gateway reads the clock with a
# second's resolution, and a poll takes a moment.
EXPIRY_BUDGET_SECONDS = 3.0
# A refusal earlier than this before notAfter would be a premature one (clock rounding aside).
EARLY_TOLERANCE_SECONDS = 1.0
HANDSHAKE_REFUSAL = "TLS handshake failed"


@dataclass
class Timeline:
    """What the client saw, in seconds relative to its SVID's notAfter (negative: before)."""

    last_served: float | None = None
    refusals: list[tuple[float, Outcome]] = field(default_factory=list)
    kept_alive_served: float | None = None  # the open connection's last answer
    kept_alive_closed: float | None = None

    @property
    def first_refused(self) -> float | None:
        return self.refusals[0][0] if self.refusals else None


def _watch(
    settings: StackSettings, svid: SvidMaterial, client: TellerClient, token: str
) -> Timeline:
    gateway = FileRegistry(settings.registry).lookup(GATEWAY.name)
    address = (gateway.host, gateway.port)
    kept = client.connect()
    seen = Timeline()
    try:
        # Used on every poll, so that the gateway's idle timeout does not close it first.
        while (now := -svid.seconds_left()) < EXPIRY_BUDGET_SECONDS:
            outcome = present(address, svid.chain_pem, svid.key_pem, svid.bundle_pem, token)
            if outcome.answer == "HTTP 200":
                seen.last_served = now
            else:
                seen.refusals.append((now, outcome))
            if seen.kept_alive_closed is None:
                if accounts_served(client, token, kept):
                    seen.kept_alive_served = now
                else:
                    seen.kept_alive_closed = now
            first_refused = seen.first_refused
            if first_refused is not None and now > 0 and first_refused <= now - 1:
                break  # refused for a second past the expiry: the open connection is seen too
            time.sleep(POLL_SECONDS)
    finally:
        kept.close()
    return seen


def run_expiry_lab(settings: StackSettings, say: Say) -> bool:
    say("lab expiry: a client SVID nobody renews runs out; refused, then served with a new one")
    bystander = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    token = bystander.token(CUSTOMER)
    svid = mint_teller_svid(settings, SHORT_TTL_SECONDS)
    not_after = svid.not_after.isoformat(timespec="seconds")
    say(f"  1 minted a teller SVID, serial {svid.serial[:12]}…, valid until {not_after}")
    say(f"    ({svid.seconds_left():.0f} s from now); no Workload API stream renews it")

    seen = _watch(settings, svid, TellerClient(settings, svid), token)
    checks: list[bool] = []
    refused = seen.first_refused
    checks.append(
        seen.last_served is not None
        and refused is not None
        and -EARLY_TOLERANCE_SECONDS <= refused <= EXPIRY_BUDGET_SECONDS
    )
    say(f"  2 {_timeline(seen)}")
    if seen.refusals:
        say(f"    as the client saw it: {seen.refusals[0][1].answer}")

    reasons = [
        last_gateway_denial(settings, source_port=outcome.local_port)
        for _, outcome in seen.refusals
    ]
    checks.append(audited_refusals(reasons, say))

    closed = seen.kept_alive_closed
    checks.append(
        closed is not None and -EARLY_TOLERANCE_SECONDS <= closed <= EXPIRY_BUDGET_SECONDS
    )
    say(_kept_alive(seen))

    renewed = mint_teller_svid(settings, RENEWED_TTL_SECONDS)
    again = accounts_served(TellerClient(settings, renewed), token)
    checks.append(again)
    say(
        f"  5 with a new SVID ({renewed.serial[:12]}…) the client is"
        f" {'served again' if again else 'NOT served'} on a new connection"
    )
    bystander_served = accounts_served(bystander, token)
    checks.append(bystander_served)
    say(f"  6 the stack's own teller {'is' if bystander_served else 'is NOT'} still served")

    return verdict(
        say,
        checks,
        [
            f"lab passed: refused {seen.first_refused or 0:+.1f} s from notAfter (fail closed),",
            "  its open connection closed, the refusal audited, served again with a valid SVID",
        ],
    )


def audited_refusals(reasons: Sequence[str | None], say: Say) -> bool:
    """Step 3 on the gateway's deny reasons for the refused connections, in order (None: no
    record): True when each is audited and one is a refused handshake naming its rule."""
    handshake = next((r for r in reasons if r and r.startswith(HANDSHAKE_REFUSAL)), None)
    audited = f"a deny: {handshake!r}" if handshake else "NO refused handshake"
    say(f"  3 the gateway audited {audited}")
    if reasons and reasons[0] is not None and reasons[0] != handshake:
        # The handshake came just before notAfter; the gateway closed the connection at notAfter.
        say(f"    (the first refused connection, opened before notAfter: {reasons[0]!r})")
    unaudited = reasons.count(None)
    if unaudited:
        say(f"    {unaudited} of {len(reasons)} refused connections have NO audit record")
    return handshake is not None and unaudited == 0


def _timeline(seen: Timeline) -> str:
    served = (
        f"served until {seen.last_served:+.1f} s from notAfter"
        if seen.last_served is not None
        else "NEVER served"
    )
    if seen.first_refused is None:
        return f"{served}, NOT refused by {EXPIRY_BUDGET_SECONDS:+.0f} s (fail OPEN)"
    early = " (too EARLY)" if seen.first_refused < -EARLY_TOLERANCE_SECONDS else ""
    return f"{served}; refused from {seen.first_refused:+.1f} s{early}"


def _kept_alive(seen: Timeline) -> str:
    opened = "  4 a keep-alive connection opened before the expiry"
    if seen.kept_alive_closed is not None:
        return f"{opened} was closed {seen.kept_alive_closed:+.1f} s from notAfter"
    served = seen.kept_alive_served or 0
    return f"{opened} was still served {served:+.1f} s from notAfter (fail OPEN)"
