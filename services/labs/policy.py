"""``ztbank lab policy``: a route is withdrawn from the teller by editing the policy live, then
given back.

Against the running stack (``make up``): the gateway re-reads its policy file when it
changes, without a restart (``services.common.authz.policy``).  The lab

1. finds the file the running gateway watches (its ``ZTBANK_POLICY``) and checks that the teller
   is served ``GET /v1/accounts``;
2. replaces the file, atomically (temp file + rename), with a copy in which the gateway rules
   that allowed the teller that route no longer do: their patterns that match it are withdrawn
   from the teller, which keeps their others and ``POST /v1/tokens``;
3. shows the caller's refusal (403, ``application/problem+json``) while tokens are still issued,
   so the refusal comes from the edit, not from a broken policy;
4. finds the deny in the gateway's audit;
5. puts the original bytes back (always: also on failure, Ctrl-C, SIGTERM or SIGHUP) and shows
   the route served again.

The original is also kept under ``ZTBANK_HOME/run`` while the edit is in place: a run that was
killed outright leaves it there, and the next run restores it first.  On the compose stack the
lab runs in its compose job, which shares the policy file with the services (docs/compose.md);
with the consul profile the policy is in Consul KV, and the lab says so.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from typing import Any

from services.common.identity.workloads import GATEWAY, TELLER
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.labs.errors import LabError
from services.labs.support import (
    FileBackup,
    Say,
    interrupted_by_termination,
    last_gateway_denial,
    mint_teller_svid,
    policy_lock,
    seconds_until,
    service_starts,
    unrestarted,
    verdict,
    watched_file,
)
from services.labs.teller import Reply, TellerClient
from services.stack.native import NativeStack, StackSettings

CUSTOMER = "alice"
ROUTE = "GET /v1/accounts"
KEPT = "POST /v1/tokens"  # what the teller keeps: the control that the gateway still serves it
CLIENT_TTL_SECONDS = 300
# The gateway checks the file at most every 0.5 s (services.common.authz.policy), on a request.
RELOAD_BUDGET_SECONDS = 5.0
POLL_SECONDS = 0.1
BACKUP_NAME = "policy"


def withdraw_route(text: str, trust_domain: str, caller: str) -> tuple[str, list[str]]:
    """The policy ``text`` with ``caller`` taken out of every gateway rule that allows it
    ROUTE, and given back KEPT and those rules' other method patterns; also the patterns it
    lost (those that match ROUTE).

    Callers may be written with ``{trust_domain}``, as in infra/policy.json.
    """
    try:
        document: dict[str, Any] = json.loads(text)
        rules: list[dict[str, Any]] = document["rules"]
    except (ValueError, KeyError, TypeError) as error:
        raise LabError(f"the policy is not a policy document: {error}") from None
    lost: list[str] = []
    kept = [KEPT]
    for rule in rules:
        callers = rule.get("callers", [])
        mine = [c for c in callers if c.replace("{trust_domain}", trust_domain) == caller]
        methods = rule.get("methods", [])
        matching = [m for m in methods if fnmatch.fnmatchcase(ROUTE, m)]
        if rule.get("service") != GATEWAY.name or not mine or not matching:
            continue
        rule["callers"] = [c for c in callers if c not in mine]
        lost += matching
        kept += [m for m in methods if m not in matching and m not in kept]
    if not lost:
        raise LabError(f"no gateway rule of the policy allows the teller {ROUTE}: nothing to deny")
    document["rules"] = [r for r in rules if r.get("callers")] + [
        {"service": GATEWAY.name, "methods": kept, "callers": [caller]}
    ]
    return json.dumps(document, indent=2) + "\n", lost


@dataclass(frozen=True)
class Attempt:
    """A token asked for (KEPT), then the route with it, as the lab's client."""

    token_status: int
    route: Reply | None  # None: no token, the route was not asked

    @property
    def route_status(self) -> int | None:
        return self.route.status if self.route is not None else None


def _attempt(client: TellerClient) -> Attempt:
    token = client.request("POST", "/v1/tokens", body={"customer": CUSTOMER})
    if token.status != 201:
        return Attempt(token.status, None)
    bearer = {"Authorization": f"Bearer {token.body['access_token']}"}
    return Attempt(token.status, client.request("GET", "/v1/accounts", headers=bearer))


def _until(client: TellerClient, want: int) -> tuple[float | None, Attempt]:
    """Seconds until the route answered ``want`` (None if not within RELOAD_BUDGET_SECONDS),
    and the last attempt."""
    attempts: list[Attempt] = []

    def answered() -> bool:
        attempts.append(_attempt(client))
        return attempts[-1].route_status == want

    return seconds_until(answered, RELOAD_BUDGET_SECONDS, POLL_SECONDS), attempts[-1]


def run_policy_lab(settings: StackSettings, say: Say) -> bool:
    say(f"lab policy: {ROUTE} is withdrawn from the teller by a live policy edit, then restored")
    stack = NativeStack(settings)
    TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    policy = watched_file(stack, "ZTBANK_POLICY", settings.policy, "policy")
    starts = service_starts(settings)
    leftover = FileBackup.load(settings, BACKUP_NAME)
    if leftover is not None:
        leftover.restore(settings)
        say(f"  0 restored {leftover.path}, left edited by an earlier run that was killed")
    # A client SVID of its own: its serial finds the lab's requests in the gateway's audit.
    client = TellerClient(settings, mint_teller_svid(settings, CLIENT_TTL_SECONDS))
    teller_id = str(TELLER.spiffe_id(settings.trust_domain))

    before = _attempt(client)
    if before.route_status != 200:
        raise LabError(
            f"{ROUTE} is not served even before the edit (token: HTTP {before.token_status},"
            f" route: HTTP {before.route_status})"
        )
    say(f"  1 the gateway watches {policy}; the teller is served {ROUTE}: HTTP 200")

    checks: list[bool] = []
    with interrupted_by_termination(), policy_lock(settings):
        backup = FileBackup.of(policy, BACKUP_NAME)
        original = backup.content
        edited, lost = withdraw_route(original.decode(), settings.trust_domain, teller_id)
        backup.save(settings)
        try:
            backup.replace(edited.encode())
            say(f"  2 replaced the policy (temp file + rename): the teller loses {lost}")
            after, refused = _until(client, 403)
            checks += [after is not None, _refusal_ok(refused.route, teller_id)]
            say(f"  3 {_refusal(refused.route, after)}")
            kept = refused.token_status == 201
            checks.append(kept)
            say(f"    {KEPT} {'still answers 201' if kept else f'answers {refused.token_status}'}")
            reason = last_gateway_denial(settings, cert_serial=client.material.serial, method=ROUTE)
            checks.append(reason is not None and ROUTE in reason)
            say(f"  4 the gateway audited {f'a deny: {reason!r}' if reason else 'NO deny for it'}")
        finally:
            backup.restore(settings)
    restored = policy.read_bytes() == original
    checks.append(restored)
    say(f"  5 {'restored' if restored else 'could NOT restore'} the original policy file")
    again, _ = _until(client, 200)
    checks.append(again is not None)
    served = f"served again after {again:.1f} s" if again is not None else "NOT served again"
    say(f"  6 {ROUTE} {served}")
    checks.append(unrestarted(starts, service_starts(settings), say, 7))
    return verdict(
        say,
        checks,
        [
            f"lab passed: a live edit denied {ROUTE}; the deny was answered and audited,",
            "  and the restored policy serves it again, without a restart",
        ],
    )


def _refusal_ok(reply: Reply | None, teller_id: str) -> bool:
    if reply is None or reply.status != 403:
        return False
    body = reply.body if isinstance(reply.body, dict) else {}
    return (
        reply.headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE)
        and body.get("status") == 403
        and f"no policy rule allows {teller_id}" in str(body.get("detail"))
    )


def _refusal(reply: Reply | None, seconds: float | None) -> str:
    if reply is None or seconds is None:
        status = "no answer" if reply is None else f"HTTP {reply.status}"
        return f"{ROUTE} was NOT refused within {RELOAD_BUDGET_SECONDS:g} s ({status})"
    body = reply.body if isinstance(reply.body, dict) else {}
    media = reply.headers.get("content-type", "?")
    return f"{ROUTE} refused after {seconds:.1f} s: HTTP 403 {media}, detail {body.get('detail')!r}"
