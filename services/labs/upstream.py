"""``ztbank lab upstream``: the issuer's upstream fails just when the issuer asks it for its next
signing CA; the bank serves on, the cause is named in one line, nothing is issued unverified,
and the issuer recovers by itself once the upstream is back.

The issuer asks its upstream only for its next signing CA, normally half-way through the active
one's life; the lab asks it to do so now (the admin API's ``RenewCA``), so it runs on a stack
with the default day-long CAs.  For each fault the lab

1. makes the fault, then asks the issuer to renew its CA;
2. reads the issuer's log for its failed attempt and ``ztbank status`` for the cause, each one
   line naming it, while requests go on being served with the teller's current SVID and the
   trust bundle stays as it was (no CA the upstream did not sign, verified, reaches anyone);
3. undoes the fault: the issuer's next retry (backoff 1, 2, 4 ... s) gets the CA, which must
   chain to the pinned root.

On a Vault upstream (``make up UPSTREAM=vault``) the faults are: an AppRole secret Vault does not
know, a TLS CA that did not sign Vault's certificate, Vault sealed, Vault stopped.  On the disk
upstream: the root CA's key moved aside.  Every fault is undone also on failure, Ctrl-C, SIGTERM
or SIGHUP; a run killed outright leaves its files' originals beside the stack's state, which the
next run restores first, and ``make up`` starts and unseals Vault.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from services._proto import issuer_admin_pb2 as pb
from services.common.errors import CommonError
from services.common.identity.source import SvidMaterial
from services.common.identity.workloads import TELLER
from services.common.identity.x509svid import issued_directly_by
from services.common.polling import poll_until
from services.issuer.adapters.upstream.disk import ROOT_CERT_FILE, ROOT_KEY_FILE
from services.issuer.admin_client import AdminCallError, call_admin
from services.labs.errors import LabError
from services.labs.support import (
    FileBackup,
    Say,
    interrupted_by_termination,
    issuer_started,
    mint_teller_svid,
    service_starts,
    verdict,
)
from services.labs.teller import TellerClient
from services.stack.native import NativeStack, StackSettings, workload_svid
from services.stack.vault_tls import VaultTls, ensure_vault_tls

CUSTOMER = "alice"
MINTED_TTL_SECONDS = 30
OFFLINE_SUFFIX = ".lab-offline"
FAILURE_BUDGET_SECONDS = 10.0  # from the renewal request to the issuer's first logged failure
OUTAGE_SECONDS = 3.0  # how long a fault stays once the issuer has failed: two attempts or more
# After OUTAGE_SECONDS the issuer's next retry is at most 4 s away; Vault's restart and unseal
# come on top for the stopped fault.
RECOVERY_BUDGET_SECONDS = 30.0
VAULT_START_SECONDS = 30.0
POLL_SECONDS = 0.5
FAILURE_MESSAGE = "CA maintenance failed"  # what services.issuer.server logs for each attempt
_SHA256 = hashes.SHA256()


@dataclass(frozen=True)
class Fault:
    what: str  # "Vault sealed"
    how: str  # how the lab makes it
    cause: str  # what the issuer's one line must name
    make: Callable[[], None]
    undo: Callable[[], str]  # returns how it was undone


@dataclass
class IssuerLog:
    """The issuer's log from ``offset`` on: its failed CA renewals."""

    path: Path
    offset: int = 0
    failures: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self.failures = []

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
            raise LabError(f"cannot take the root key offline: {error}") from None

    def put_back(self) -> str:
        # Also called when the lab was interrupted before the key went aside: nothing to do.
        if self.path.exists() and not self.aside.exists():
            return f"the root key stayed at {self.path}"
        # rename(2) replaces nothing here: the issuer never writes the root key.
        try:
            os.rename(self.aside, self.path)
        except OSError as error:
            raise LabError(f"cannot put the root key back from {self.aside}: {error}") from None
        return f"put the root key back at {self.path}"

    def left_offline(self) -> bool:
        """True if an earlier run was killed with the key aside (it is then put back)."""
        if not self.aside.exists():
            return False
        if self.path.exists():
            raise LabError(
                f"both {self.path} and {self.aside} exist: keep the right one and remove the other"
            )
        self.put_back()
        return True


def _refused(settings: StackSettings, token: str, svid: SvidMaterial | None = None) -> str | None:
    """None if GET /v1/accounts is served on a new connection, else what the client saw."""
    try:
        client = TellerClient(settings, svid)
        reply = client.request("GET", "/v1/accounts", headers={"Authorization": f"Bearer {token}"})
    except LabError as error:
        return str(error)
    return None if reply.status == 200 else f"HTTP {reply.status}"


def _bundle(settings: StackSettings) -> dict[bytes, x509.Certificate]:
    """The trust bundle as the Workload API hands it out now, by fingerprint."""
    try:
        material = workload_svid(settings, TELLER.name)
    except CommonError:
        return {}
    return {cert.fingerprint(_SHA256): cert for cert in material.bundle}


def _status(settings: StackSettings) -> pb.StatusResponse:
    try:
        return call_admin(settings.admin_socket, lambda stub: stub.Status(pb.StatusRequest()))
    except AdminCallError as error:
        raise LabError(f"cannot ask the issuer: {error}; is the stack up? (make up)") from None


def _renew(settings: StackSettings) -> None:
    try:
        call_admin(settings.admin_socket, lambda stub: stub.RenewCA(pb.RenewCARequest()))
    except AdminCallError as error:
        raise LabError(f"cannot ask the issuer to renew its CA: {error}") from None


def chains_to(
    certificate: x509.Certificate, pool: list[x509.Certificate], root: x509.Certificate
) -> bool:
    """True if signatures lead from ``certificate`` through ``pool`` up to ``root``."""
    current = certificate
    for _ in range(len(pool) + 1):
        if issued_directly_by(current, root):
            return True
        parent = next((c for c in pool if c != current and issued_directly_by(current, c)), None)
        if parent is None:
            return False
        current = parent
    return False


def _short(serial: int) -> str:
    return f"{serial:x}"[:8] + "…"


def _starts(settings: StackSettings) -> dict[str, object]:
    return {"issuer": issuer_started(settings), **service_starts(settings)}


# -- the faults ---------------------------------------------------------------------------------


def _root_client(stack: NativeStack) -> hvac.Client:
    """The demo init file's root token (DEMO ONLY: a real Vault is sealed by an operator)."""
    try:
        token = json.loads(stack.vault.init_file.read_text())["root_token"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LabError(f"cannot read Vault's demo init file {stack.vault.init_file}") from None
    return hvac.Client(url=stack.vault.address, token=token, verify=str(stack.vault.tls.ca_cert))


def _seal(stack: NativeStack) -> None:
    try:
        _root_client(stack).sys.seal()
    except (hvac.exceptions.VaultError, requests.RequestException) as error:
        raise LabError(f"cannot seal Vault: {type(error).__name__}") from None


def _unseal(stack: NativeStack) -> str:
    """Unseal Vault with the demo init file's key, as ``make up`` does."""
    try:
        keys = json.loads(stack.vault.init_file.read_text())["unseal_keys_b64"]
        _root_client(stack).sys.submit_unseal_keys(keys)
    except (OSError, ValueError, KeyError, TypeError):
        raise LabError(f"cannot read Vault's demo init file {stack.vault.init_file}") from None
    except (hvac.exceptions.VaultError, requests.RequestException) as error:
        raise LabError(f"cannot unseal Vault: {type(error).__name__}") from None
    return "unsealed Vault"


def _bring_vault_back(stack: NativeStack) -> str:
    """Start Vault if it is down and unseal it from the demo init file, as ``make up`` does."""
    try:
        started = stack.vault.start(stack.env, time.monotonic() + VAULT_START_SECONDS)
        stack.vault.bootstrap()
    except CommonError as error:
        raise LabError(f"cannot bring Vault back: {error}") from None
    return "started Vault and unsealed it" if started else "unsealed Vault"


def _stop_vault(stack: NativeStack) -> None:
    stack.vault.stop()


def _replace(backup: FileBackup, settings: StackSettings, content: bytes) -> None:
    backup.save(settings)
    try:
        backup.replace(content)
    except OSError as error:
        backup.restore(settings)
        raise LabError(f"cannot change {backup.path}: {error}") from None


def _restored(backup: FileBackup, settings: StackSettings) -> str:
    backup.restore(settings)
    return f"restored {backup.path}"


def _wrong_secret(backup: FileBackup, settings: StackSettings) -> None:
    try:
        credentials = json.loads(backup.content)
        credentials["secret_id"] = secrets.token_hex(18)  # no secret Vault ever issued
    except (ValueError, TypeError):
        raise LabError(f"{backup.path} is not the AppRole file bootstrap.py writes") from None
    _replace(backup, settings, json.dumps(credentials, indent=2).encode() + b"\n")


def _foreign_ca(backup: FileBackup, settings: StackSettings) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        other = VaultTls(Path(scratch) / "tls", Path(scratch) / "ca")
        ensure_vault_tls(other, ip_addresses=["127.0.0.1"])
        _replace(backup, settings, other.ca_cert.read_bytes())


def vault_faults(stack: NativeStack) -> list[Fault]:
    """The faults a lab can make of the stack's Vault; beside the compose stack it cannot stop
    Vault's container (no Docker there), and sealing it stands for that outage."""
    settings, vault = stack.settings, stack.vault
    approle = FileBackup.of(vault.approle_file, "upstream-approle")
    pinned_ca = FileBackup.of(vault.tls.ca_cert, "upstream-vault-ca")
    faults = [
        Fault(
            "an AppRole secret Vault does not know",
            f"the issuer's {vault.approle_file} now holds a random secret_id",
            "AppRole login",
            lambda: _wrong_secret(approle, settings),
            lambda: _restored(approle, settings),
        ),
        Fault(
            "Vault's TLS certificate not signed by the pinned CA",
            f"{vault.tls.ca_cert} (VAULT_CACERT) now holds another CA",
            "not trusted",
            lambda: _foreign_ca(pinned_ca, settings),
            lambda: _restored(pinned_ca, settings),
        ),
        Fault(
            "Vault sealed",
            "sealed with the demo init file's root token",
            "sealed",
            lambda: _seal(stack),
            lambda: _unseal(stack),
        ),
    ]
    if settings.stack_kind == "native":
        faults.append(
            Fault(
                "Vault stopped",
                "its server process got SIGTERM",
                "unreachable",
                lambda: _stop_vault(stack),
                lambda: _bring_vault_back(stack),
            )
        )
    return faults


def disk_faults(key: RootKey) -> list[Fault]:
    return [
        Fault(
            "the root CA's key offline",
            f"{key.path} moved aside",
            str(key.path.parent),
            key.take_offline,
            key.put_back,
        )
    ]


# -- the lab ------------------------------------------------------------------------------------


def _restore_leftovers(stack: NativeStack, say: Say) -> None:
    """Put back what an earlier run, killed outright, left changed."""
    for name in ("upstream-approle", "upstream-vault-ca"):
        if (kept := FileBackup.load(stack.settings, name)) is not None:
            kept.restore(stack.settings)
            say(f"  0 restored {kept.path}, left changed by an earlier run that was killed")


def _pinned_root(stack: NativeStack, upstream: str) -> tuple[Path, x509.Certificate]:
    if upstream == "vault":
        path = stack.vault.root_ca
    else:
        env = stack.issuer.environment() or {}
        path = Path(env.get("ZTBANK_CERTS_DIR") or stack.settings.certs_dir) / ROOT_CERT_FILE
    try:
        return path, x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as error:
        raise LabError(f"cannot read the pinned root {path}: {error}") from None


@dataclass(frozen=True)
class LabRun:
    """What every fault of one run shares."""

    settings: StackSettings
    token: str  # the lab customer's, for the teller's requests
    root: x509.Certificate  # the pinned root every new CA must chain to
    say: Say
    log: IssuerLog | None  # the issuer's log file, natively (compose: `docker-compose logs`)


def run_fault(number: int, fault: Fault, run: LabRun) -> list[bool]:
    """One fault, made and always undone; the checks it passed."""
    settings, token, say, log = run.settings, run.token, run.say, run.log
    before = _bundle(settings)
    checks: list[bool] = []
    requests_sent, refusals = 0, []
    if log is not None:
        log.start()
    with interrupted_by_termination():
        say(f"  {number} fault: {fault.what} ({fault.how})")
        # Made inside the try: an interrupt that lands while it is being made (just after the
        # rename, say) still undoes it. Every undo copes with a fault never made.
        try:
            fault.make()
            _renew(settings)
            say("    asked the issuer to renew its signing CA now (admin RenewCA)")
            deadline = time.monotonic() + FAILURE_BUDGET_SECONDS
            first: float | None = None
            while True:
                requests_sent += 1
                if (refusal := _refused(settings, token)) is not None:
                    refusals.append(refusal)
                if _status(settings).upstream_failures and first is None:
                    first = time.monotonic()
                if first is not None and time.monotonic() >= first + OUTAGE_SECONDS:
                    break
                if first is None and time.monotonic() > deadline:
                    break
                time.sleep(POLL_SECONDS)
            status = _status(settings)
            reported, failures = status.upstream_error, status.upstream_failures
            unchanged = _bundle(settings).keys() == before.keys()
        finally:
            undone = fault.undo()
    named = failures > 0 and fault.cause in reported
    checks += [failures > 0, "\n" not in reported, not refusals, unchanged]
    say(f"    the issuer failed {failures} attempt(s) in a row (admin Status)")
    if log is not None:
        log.read()
        named = named and bool(log.failures) and fault.cause in log.failures[0]
        say("    its log, the first:")
        say(f"    {log.failures[0]!r}" if log.failures else "    (none)")
    checks.append(named)
    say(
        f"    ztbank status: UPSTREAM FAILING: {reported}"
        if reported
        else "    ztbank status: no upstream error"
    )
    if not named:
        say(f"    the cause is NOT named as expected ({fault.cause!r})")
    bundle = "is unchanged: nothing unverified was issued" if unchanged else "CHANGED"
    say(
        f"    meanwhile {requests_sent} requests with the teller's current SVID,"
        f" {len(refusals)} refused; the trust bundle {bundle}"
    )
    if refusals:
        say(f"    the first refusal as the client saw it: {refusals[0]}")
    say(f"    undone: {undone}")
    restored = time.monotonic()

    def new_cas() -> tuple[list[x509.Certificate], list[x509.Certificate]] | None:
        """The CAs the bundle gained since the fault, and the whole bundle; None: none yet."""
        now = _bundle(settings)
        if added := [cert for fingerprint, cert in now.items() if fingerprint not in before]:
            return added, list(now.values())
        return None

    found = poll_until(new_cas, timeout=RECOVERY_BUDGET_SECONDS, interval=POLL_SECONDS)
    added, pool = found or ([], [])
    verified = bool(added) and all(chains_to(cert, pool, run.root) for cert in added)
    checks.append(verified)
    if not added:
        say(f"    NO new signing CA in the bundle within {RECOVERY_BUDGET_SECONDS:g} s")
    else:
        serials = ", ".join(_short(c.serial_number) for c in added)
        say(
            f"    the issuer's retry got its next signing CA after"
            f" {time.monotonic() - restored:.1f} s: {serials},"
            f" {'chains' if verified else 'does NOT chain'} to the pinned root"
        )
    return checks


def run_upstream_lab(settings: StackSettings, say: Say) -> bool:
    say("lab upstream: the issuer's upstream fails just when the issuer asks it for its next")
    say("  signing CA; the bank serves on, the cause is named, nothing unverified is issued,")
    say("  and the issuer recovers by itself once the upstream is back")
    stack = NativeStack(settings)
    token = TellerClient(settings).token(CUSTOMER)  # no teller identity: "is the stack up?"
    status = _status(settings)
    upstream = status.upstream
    if upstream == "vault":
        _restore_leftovers(stack, say)
        if (health := stack.vault.health()).state != "active":
            raise LabError(
                f"Vault at {stack.vault.address} is {health.state}: `make up` starts and unseals it"
            )
        faults = vault_faults(stack)
    else:
        env = stack.issuer.environment() or {}
        key = RootKey(Path(env.get("ZTBANK_CERTS_DIR") or settings.certs_dir) / ROOT_KEY_FILE)
        if key.left_offline():
            say(f"  0 put back {key.path}, left offline by an earlier run that was killed")
        faults = disk_faults(key)
    root_path, root = _pinned_root(stack, upstream)
    chain = " <- ".join(f"{c.subject} ({c.serial[:8]}…)" for c in status.ca_chain)
    say(f"  1 upstream {upstream}: the issuer's CA chain is {chain};")
    say(f"    the pinned root is {root_path}")
    if upstream == "vault" and settings.stack_kind == "compose":
        say("    (no Docker beside the compose stack to stop Vault's container: sealed stands")
        say("    for that outage; `docker-compose stop vault` on the host makes it)")
    starts = _starts(settings)
    log = IssuerLog(stack.issuer.log_file) if settings.stack_kind == "native" else None
    checks: list[bool] = []
    run = LabRun(settings, token, root, say, log)
    for number, fault in enumerate(faults, start=2):
        checks += run_fault(number, fault, run)
    step = len(faults) + 2
    minted = mint_teller_svid(settings, MINTED_TTL_SECONDS)
    minted_served = _refused(settings, token, minted) is None
    checks.append(minted_served)
    say(
        f"  {step} the current signing CA signs: an SVID minted now ({minted.serial[:12]}…) is"
        f" {'served' if minted_served else 'NOT served'}"
    )
    after = _starts(settings)
    same = after == starts and None not in starts.values()
    checks.append(same)
    restarts = "no process of the bank was restarted" if same else "a bank process was RESTARTED"
    say(f"  {step + 1} {restarts}")
    return verdict(
        say,
        checks,
        [
            f"lab passed: the bank served through {len(faults)} upstream fault(s), each named in",
            "  one line, nothing unverified was issued, and the issuer renewed its CA by itself",
        ],
    )
