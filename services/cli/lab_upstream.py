"""``ztbank lab upstream``: the issuer's upstream CA goes offline while the issuer needs it; the
bank keeps serving, the failed CA renewal is visible, and the issuer recovers by itself once the
upstream is back.

The issuer calls its upstream only to get its next signing CA, at half of the active one's
lifetime (``services.issuer.domain.authority``); nothing on a running issuer makes it call
sooner.  With the default 24 h CA that is hours away, so the lab needs a stack whose signing CAs
are short-lived (``make reset && ZTBANK_CA_TTL=2m ZTBANK_SVID_TTL=20s make up``): then the next
call is at most a minute away, and the lab says when it comes and waits for it.

On the native stack the upstream is ``disk``: the root CA's key in ``ZTBANK_CERTS_DIR``, read
each time the issuer asks.  The lab

1. reads when the issuer next asks its upstream (its CA state under ``ZTBANK_HOME``);
2. moves the root key aside (a rename: the root key is never copied nor rewritten);
3. waits for that moment: the issuer logs its failed renewals and retries;
4. meanwhile every request is served on the current SVIDs, and the current signing CA still
   issues SVIDs;
5. moves the key back (always: also on failure, Ctrl-C, SIGTERM or SIGHUP; a run killed outright
   leaves it as ``root-ca.key.lab-offline``, which the next run puts back first);
6. the issuer's next retry gets the new CA, published in the trust bundle;
7. nothing was restarted.

Native stack only: on the compose stack the upstream is Vault, which the lab does not stop.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from services._proto import issuer_admin_pb2 as pb
from services.cli.errors import CliError
from services.cli.lab_support import (
    Say,
    interrupted_by_termination,
    mint_teller_svid,
    verdict,
)
from services.cli.teller import TellerClient
from services.common.errors import CommonError
from services.common.identity.source import SvidMaterial, fetch_svid
from services.common.workloads import TELLER
from services.issuer.adapters.authority_file import AuthorityFile
from services.issuer.adapters.upstream_disk import ROOT_KEY_FILE
from services.issuer.admin_client import AdminCallError, call_admin
from services.issuer.domain.authority import PREPARE_AT, AuthorityState
from services.issuer.errors import IssuerError
from services.stack.native import NativeStack, StackSettings

CUSTOMER = "alice"
MINTED_TTL_SECONDS = 30
OFFLINE_SUFFIX = ".lab-offline"
# The longest the lab waits for the issuer's next call to its upstream; a 2-minute CA is
# renewed every minute.
WAIT_BUDGET_SECONDS = 75.0
OUTAGE_SECONDS = 5.0  # how long the key stays offline once the issuer has first failed
FAILURE_BUDGET_SECONDS = 10.0  # from the due time to the first logged failure
FAILURES_SHOWN = 2
# The issuer retries after 1, 2, 4 ... s (at most 30); after OUTAGE_SECONDS the next retry is
# at most 8 s away, and the new CA reaches the bundle right after it.
RECOVERY_BUDGET_SECONDS = 30.0
POLL_SECONDS = 0.5
FAILURE_MESSAGE = "CA maintenance failed"  # what services.issuer.server logs for each attempt
SHORT_CA_HINT = "make reset && ZTBANK_CA_TTL=2m ZTBANK_SVID_TTL=20s make up"
_SHA256 = hashes.SHA256()


def next_upstream_call(state: AuthorityState) -> datetime:
    """When the issuer next asks its upstream: the prepare point of its active CA, or of the
    prepared one that activates before then."""
    slot = state.prepared or state.active
    if slot is None:
        raise CliError("the issuer has no signing CA yet; is the stack up? (make up)")
    return slot.at_fraction(PREPARE_AT)


@dataclass
class IssuerLog:
    """The issuer's log from ``offset`` on: its failed CA renewals."""

    path: Path
    offset: int = 0
    failures: list[str] = field(default_factory=list)
    first_failure: float | None = None  # monotonic

    def start(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def read(self) -> None:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line may be half written
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            try:
                message = str(json.loads(line).get("message", ""))
            except (ValueError, AttributeError):
                message = line
            if FAILURE_MESSAGE in message:
                self.failures.append(message)
                if self.first_failure is None:
                    self.first_failure = time.monotonic()


@dataclass(frozen=True)
class RootKey:
    """The disk upstream's root key, and where the lab keeps it while it is offline."""

    path: Path

    @property
    def aside(self) -> Path:
        return self.path.with_name(self.path.name + OFFLINE_SUFFIX)

    def take_offline(self) -> None:
        try:
            os.rename(self.path, self.aside)
        except OSError as error:
            raise CliError(f"cannot take the root key offline: {error}") from None

    def put_back(self) -> None:
        # rename(2) replaces nothing here: the issuer never writes the root key.
        try:
            os.rename(self.aside, self.path)
        except OSError as error:
            raise CliError(f"cannot put the root key back from {self.aside}: {error}") from None

    def left_offline(self) -> bool:
        """True if an earlier run was killed with the key aside (it is then put back)."""
        if not self.aside.exists():
            return False
        if self.path.exists():
            raise CliError(
                f"both {self.path} and {self.aside} exist: keep the right one and remove the other"
            )
        self.put_back()
        return True


def _refused(settings: StackSettings, token: str, svid: SvidMaterial | None = None) -> str | None:
    """None if GET /v1/accounts is served on a new connection, else what the client saw.

    The client presents ``svid``, or the teller's current SVID fetched from its Workload API
    socket as a workload would: a short-lived CA takes the SVIDs it signed with it when it
    expires, and only the issuer's stream hands out the next ones in time.
    """
    try:
        client = TellerClient(settings, svid)
        reply = client.request("GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"})
    except CliError as error:
        return str(error)
    return None if reply.status == 200 else f"HTTP {reply.status}"


def _bundle(settings: StackSettings) -> set[bytes]:
    """Fingerprints of the trust bundle as the Workload API hands it out now."""
    socket_uri = f"unix://{settings.workload_socket_for(TELLER.name)}"
    try:
        material = fetch_svid(socket_uri, settings.trust_domain, timeout=5)
    except CommonError:
        return set()
    return {cert.fingerprint(_SHA256) for cert in material.bundle}


def _authority(settings: StackSettings) -> AuthorityState:
    try:
        return AuthorityFile(settings.home / "issuer" / "authority.json").load()
    except IssuerError as error:
        raise CliError(str(error)) from None


def _upstream(settings: StackSettings) -> str:
    try:
        status = call_admin(settings.admin_socket, lambda stub: stub.Status(pb.StatusRequest()))
    except AdminCallError as error:
        raise CliError(f"cannot ask the issuer: {error}; is the stack up? (make up)") from None
    return str(status.upstream)


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _pids(stack: NativeStack) -> dict[str, int | None]:
    processes = {"issuer": stack.issuer, **stack.services}
    return {name: process.pid() for name, process in processes.items()}


def run_upstream_lab(settings: StackSettings, say: Say) -> bool:
    say("lab upstream: the root CA goes offline when the issuer needs it; the bank serves on,")
    say("  the failed renewal shows, and the issuer recovers once the root is back")
    stack = NativeStack(settings)
    token = TellerClient(settings).token(CUSTOMER)  # no teller identity: "is the stack up?"
    if (upstream := _upstream(settings)) != "disk":
        raise CliError(
            f"the issuer's upstream is {upstream}: this lab takes a disk upstream offline"
        )
    issuer_env = stack.issuer.environment() or {}
    certs_dir = Path(issuer_env.get("ZTBANK_CERTS_DIR") or settings.certs_dir)
    key = RootKey(certs_dir / ROOT_KEY_FILE)
    if key.left_offline():
        say(f"  0 put back {key.path}, left offline by an earlier run that was killed")
    state = _authority(settings)
    due = next_upstream_call(state)
    wait = (due - datetime.now(UTC)).total_seconds()
    if wait > WAIT_BUDGET_SECONDS:
        raise CliError(
            f"the issuer next asks its upstream at {due:%H:%M:%S} UTC, in {_span(wait)}"
            f" (half-way through its signing CA's life); this lab waits at most"
            f" {WAIT_BUDGET_SECONDS:g} s: start the stack with short-lived CAs: {SHORT_CA_HINT}"
        )
    pids = _pids(stack)
    log = IssuerLog(stack.issuer.log_file)
    checks: list[bool] = []
    requests = 0
    refusals: list[str] = []
    with interrupted_by_termination():
        log.start()
        key.take_offline()
        try:
            # From here on, a CA the bundle did not hold can only come from the upstream.
            before = _bundle(settings)
            say(f"  1 the issuer asks its upstream for its next signing CA at {due:%H:%M:%S} UTC,")
            say(f"    in {max(wait, 0):.0f} s")
            say(f"  2 took the root CA's key offline: {key.path} moved aside")
            deadline = time.monotonic() + max(wait, 0) + FAILURE_BUDGET_SECONDS
            while True:
                log.read()
                requests += 1
                if (refusal := _refused(settings, token)) is not None:
                    refusals.append(refusal)
                if log.first_failure is not None:
                    if (
                        len(log.failures) >= FAILURES_SHOWN
                        and time.monotonic() >= log.first_failure + OUTAGE_SECONDS
                    ):
                        break
                elif time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
            checks.append(len(log.failures) >= FAILURES_SHOWN)
            say(f"  3 the issuer logged {len(log.failures)} failed CA renewal(s), the first:")
            say(f"    {log.failures[0]!r}" if log.failures else "    (none)")
            checks.append(not refusals)
            say(
                f"  4 requests meanwhile, each with the teller's current SVID from its Workload"
                f" API: {requests}, {len(refusals)} refused"
            )
            if refusals:
                say(f"    the first as the client saw it: {refusals[0]}")
            minted = mint_teller_svid(settings, MINTED_TTL_SECONDS)
            minted_served = _refused(settings, token, minted) is None
            checks.append(minted_served)
            say(
                f"    the current signing CA still signs: an SVID minted now"
                f" ({minted.serial[:12]}…) is {'served' if minted_served else 'NOT served'}"
            )
        finally:
            key.put_back()
    restored = time.monotonic()
    say(f"  5 put the root CA's key back at {key.path}")

    new_ca = None
    while time.monotonic() < restored + RECOVERY_BUDGET_SECONDS:
        added = _bundle(settings) - before
        if added:
            new_ca = time.monotonic() - restored
            break
        time.sleep(POLL_SECONDS)
    checks.append(new_ca is not None)
    say(
        f"  6 the issuer's retry got its next signing CA: in the trust bundle after {new_ca:.1f} s"
        if new_ca is not None
        else f"  6 NO new signing CA in the bundle within {RECOVERY_BUDGET_SECONDS:g} s"
    )
    served = _refused(settings, token) is None
    same = _pids(stack) == pids
    checks += [served, same]
    say(f"  7 {'served' if served else 'NOT served'};")
    say(f"    {'no process was restarted' if same else 'a process was RESTARTED'}")

    return verdict(
        say,
        checks,
        [
            "lab passed: served through the upstream outage, the failed renewal was visible,",
            "  and the issuer renewed its CA by itself once the root was back",
        ],
    )
