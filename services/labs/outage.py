"""``ztbank lab outage``: the issuer goes away; the bank keeps serving, then fails closed, then
recovers by itself once the issuer is back.

Against the running native stack: a client SVID that outlives the outage is minted first, then
the issuer is stopped.  Every half second the client asks the gateway on a new connection, and
the gateway's ``revocation_fresh`` metric is read.  The services must keep serving on their
current SVIDs and CRLs, then fail closed once either lapses (an expired SVID is refused in the
handshake; a CRL past its nextUpdate refuses every peer; the CRL TTL equals the SVID TTL), and
raise the alert; never serve unverified.  The lab shows how the client saw the refusal, and why
each service refused, in its own words (its readiness reasons).  The
issuer is started again (always, even if the lab is interrupted) and the services must recover
without a restart of their own.  With the default 5-minute SVIDs this takes up to about 10 minutes;
``ZTBANK_SVID_TTL=20s make up`` makes it take under a minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.common.discovery.registry import FileRegistry
from services.common.identity.workloads import GATEWAY, SERVICES
from services.common.problem import PROBLEM_MEDIA_TYPE
from services.common.runtime.health import HealthUnavailableError, health_socket, read_health
from services.labs.errors import FailedClosedError, LabError, LabUsageError
from services.labs.support import (
    Say,
    mint_teller_svid,
    seconds_until,
    service_starts,
    unrestarted,
)
from services.labs.teller import TellerClient
from services.stack.native import NativeStack, StackSettings
from services.stack.probe import metric_sample

CLIENT_TTL_SECONDS = 600  # the longest the issuer mints: outlives any outage of the lab
POLL_SECONDS = 0.5
RECOVERY_BUDGET_SECONDS = 30.0
CUSTOMER = "alice"


@dataclass(frozen=True)
class Observation:
    served: bool
    # Refused for want of fresh identity or revocation data: a 503 problem+json (the gateway
    # failing closed towards the engine) or a TLS refusal. A 500, a crash or a connection
    # refused is not failing closed, and does not count as such.
    closed: bool
    why: str  # what the client saw when not served
    fresh: float | None  # the gateway's revocation_fresh gauge (1 fresh, 0 stale)


def gateway_metric(settings: StackSettings, name: str) -> float | None:
    return metric_sample(FileRegistry(settings.registry).lookup(GATEWAY.name), name)


def _observe(settings: StackSettings, client: TellerClient, token: str) -> Observation:
    try:
        reply = client.request("GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"})
        problem = reply.headers.get("content-type", "").startswith(PROBLEM_MEDIA_TYPE)
        served, closed = reply.status == 200, reply.status == 503 and problem
        detail = reply.body.get("detail") if isinstance(reply.body, dict) else None
        why = f"HTTP {reply.status}" + (f": {detail}" if detail else "")
    except FailedClosedError as error:
        served, closed, why = False, True, str(error)
    except LabError as error:
        served, closed, why = False, False, str(error)
    return Observation(served, closed, why, gateway_metric(settings, "revocation_fresh"))


def own_words(settings: StackSettings) -> list[str]:
    """Each service that is not ready, in its own words (its health socket): the cause of a
    refusal as the service knows it, where the client only sees that it was refused."""
    words = []
    for workload in SERVICES:
        path = health_socket(settings.home_of(workload.name), workload.name)
        try:
            answer = read_health(path)
        except HealthUnavailableError as error:
            words.append(f"{workload.name}: {error}")
            continue
        words += [f"{workload.name}: {reason}" for reason in answer.reasons]
    return words


def run_outage_lab(settings: StackSettings, say: Say) -> bool:
    say("lab outage: the issuer stops; the bank serves, then fails closed, then recovers")
    if settings.stack_kind == "compose":
        raise LabUsageError(
            "the outage lab stops and starts the issuer's process: native stack only"
            " (on compose: docker-compose stop issuer, then start issuer)"
        )
    stack = NativeStack(settings)
    teller = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    token = teller.token(CUSTOMER)
    lifetime = round(teller.material.lifetime.total_seconds())  # as every workload's SVID
    client = TellerClient(settings, mint_teller_svid(settings, CLIENT_TTL_SECONDS))
    starts = service_starts(settings)
    if not _observe(settings, client, token).served:
        raise LabError("the gateway does not serve even before the outage; is the stack up?")
    deadline_closed = 2 * lifetime + 5
    say(f"  SVIDs and CRLs live {lifetime} s here: fail-closed is due within {deadline_closed} s")

    # Started again later exactly as it runs now (its TTLs, upstream, sockets), not as this
    # shell's environment would start it.
    issuer_env = stack.issuer.environment() or stack.env
    stack.issuer.stop()
    stopped = time.monotonic()
    checks: list[bool] = []
    try:
        say("  1 stopped the issuer")
        first = _observe(settings, client, token)
        left = gateway_metric(settings, "svid_expiry_seconds")
        checks += [first.served, left is not None and 0 < left <= lifetime]
        say(
            f"  2 right after: {'still served' if first.served else 'NOT served'};"
            f" the gateway's SVID has {left if left is None else round(left)} s left"
        )
        closed_after = alert_after = None
        why = unexpected = ""
        causes: list[str] = []
        while time.monotonic() < stopped + deadline_closed and (
            closed_after is None or alert_after is None
        ):
            seen = _observe(settings, client, token)
            if closed_after is None and seen.closed:
                closed_after, why = time.monotonic() - stopped, seen.why
                causes = own_words(settings)
            elif not seen.served and not seen.closed:
                unexpected = unexpected or seen.why
            if alert_after is None and seen.fresh == 0.0:
                alert_after = time.monotonic() - stopped
            time.sleep(POLL_SECONDS)
        checks += [closed_after is not None, alert_after is not None, not unexpected]
        say(f"  3 {_when('refused (fail closed)', closed_after, deadline_closed)}")
        if why:
            say(f"    as the client saw it: {why}")
        for cause in causes:
            say(f"    why, in the service's own words: {cause}")
        if unexpected:
            say(f"    ALSO refused otherwise, which is not failing closed: {unexpected}")
        say(f"  4 {_when('revocation_fresh dropped to 0', alert_after, deadline_closed)}")
    finally:
        stack.issuer.start(issuer_env)
    say("  5 started the issuer again")

    recovered_after = seconds_until(
        lambda: (
            all(p.healthy for p in stack.probes().values())
            and _observe(settings, client, token).served
        ),
        RECOVERY_BUDGET_SECONDS,
        POLL_SECONDS,
    )
    checks.append(recovered_after is not None)
    recovery = "served again, every service healthy"
    say(f"  6 {_when(recovery, recovered_after, RECOVERY_BUDGET_SECONDS)}")
    checks.append(unrestarted(starts, service_starts(settings), say, 7))

    if all(checks):
        say("lab passed: served through the outage, failed closed on stale data, recovered")
        return True
    say("lab failed: see above")
    return False


def _when(what: str, seconds: float | None, budget: float) -> str:
    return f"{what} after {seconds:.1f} s" if seconds is not None else f"NOT {what} in {budget:g} s"
