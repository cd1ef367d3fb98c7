"""``ztbank lab rotation``: every service renews its SVID while requests keep flowing.

Against the running native stack: the lab probes each service's served certificate (over mTLS
as ``ztbank status`` does) and, all the while, sends GET /v1/accounts as the teller on a new
TLS connection each time, so every request meets the certificate served at that moment.  It
passes when every service served ``rotations`` new certificates, each first seen by 55 % of the
previous one's lifetime (renewal is due at 40-50 %; the rest is probing slack), and not one
request failed.  With the default 5-minute SVIDs a lab of two rotations takes about 5 minutes;
``ZTBANK_SVID_TTL=20s make up`` makes it take 20 seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.common.identity.workloads import SERVICES
from services.labs.errors import LabError, LabUsageError
from services.labs.support import Say, accounts_served
from services.labs.teller import TellerClient
from services.stack.native import NativeStack, StackSettings

LATEST_ROTATION = 0.55
DEFAULT_ROTATIONS = 2
MAX_ROTATIONS = 5
PROBE_SECONDS = 0.5
SLACK_SECONDS = 10.0
CUSTOMER = "alice"
TOKEN_RENEWAL_SECONDS = 60.0  # customer tokens live 10 minutes by default


@dataclass
class Served:
    """The certificates one service served, in order, with when each was first seen."""

    serials: list[str] = field(default_factory=list)
    not_afters: list[datetime] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)  # of the previous one's lifetime

    def note(self, serial: str, not_after: datetime, lifetime: float, now: datetime) -> bool:
        """Record ``serial`` if new; True if it is a rotation (not the first one seen)."""
        if self.serials and serial == self.serials[-1]:
            return False
        if self.serials:
            previous_start = self.not_afters[-1].timestamp() - lifetime
            self.fractions.append((now.timestamp() - previous_start) / lifetime)
        self.serials.append(serial)
        self.not_afters.append(not_after)
        return len(self.serials) > 1


def _probe(stack: NativeStack) -> dict[str, tuple[str, datetime]]:
    served = {}
    for name, probe in stack.probes().items():
        if not probe.healthy or probe.svid_serial is None or probe.svid_not_after is None:
            raise LabError(f"{name} is not healthy ({probe.error}); is the stack up? (make up)")
        served[name] = (probe.svid_serial, datetime.fromisoformat(probe.svid_not_after))
    return served


def check_rotations(rotations: int) -> None:
    """Refuse, before anything runs, a number of rotations the lab does not wait for."""
    if not 1 <= rotations <= MAX_ROTATIONS:
        raise LabUsageError(f"--rotations must be between 1 and {MAX_ROTATIONS} (got {rotations})")


def run_rotation_lab(settings: StackSettings, say: Say, *, rotations: int) -> bool:
    say("lab rotation: every service renews its SVID while requests keep flowing")
    stack = NativeStack(settings)
    teller = TellerClient(settings)  # no teller identity: "is the stack up? (make up)"
    token, token_renewal = teller.token(CUSTOMER), time.monotonic() + TOKEN_RENEWAL_SECONDS
    lifetime = round(teller.material.lifetime.total_seconds())
    budget = rotations * LATEST_ROTATION * lifetime + lifetime / 2 + SLACK_SECONDS
    say(
        f"  SVIDs live {lifetime} s here and are renewed at 40-50 % of that; waiting for"
        f" {rotations} rotation(s) of each service (at most {budget:.0f} s)"
    )
    served = {w.name: Served() for w in SERVICES}
    sent = failed = 0
    started = time.monotonic()
    while time.monotonic() < started + budget:
        now = datetime.now(UTC)
        for name, (serial, not_after) in _probe(stack).items():
            if served[name].note(serial, not_after, lifetime, now):
                seen_at = served[name].fractions[-1]
                say(f"  {name:<16} now serves {serial[:12]}…, seen at {seen_at:.0%} of the last")
        if teller.material.seconds_left() < lifetime / 4:
            teller = TellerClient(settings)  # the lab's own client renews too
        if time.monotonic() >= token_renewal:
            token, token_renewal = teller.token(CUSTOMER), time.monotonic() + TOKEN_RENEWAL_SECONDS
        sent += 1
        failed += not accounts_served(teller, token)
        if all(len(s.fractions) >= rotations for s in served.values()):
            break
        time.sleep(PROBE_SECONDS)
    elapsed = time.monotonic() - started
    say(f"  requests during the lab: {sent} sent on new connections, {failed} failed")

    short = [n for n, s in served.items() if len(s.fractions) < rotations]
    late = [n for n, s in served.items() if any(f > LATEST_ROTATION for f in s.fractions)]
    if short:
        say(f"  NOT rotated {rotations} time(s) within {elapsed:.0f} s: {', '.join(short)}")
    if late:
        say(f"  renewed later than {LATEST_ROTATION:.0%} of the lifetime: {', '.join(late)}")
    if short or late or failed:
        say("lab failed: see above")
        return False
    worst = max(f for s in served.values() for f in s.fractions)
    say(
        f"lab passed: {rotations} rotation(s) of every service in {elapsed:.0f} s, each by"
        f" {worst:.0%} of the lifetime, and no request failed"
    )
    return True
