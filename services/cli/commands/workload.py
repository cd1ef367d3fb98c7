"""``ztbank workload add|list|remove``: a team's workload onboarded onto the running stack
(docs/ci.md); ``ztbank env`` (services/cli/commands/env.py) then prints what its client needs.

A workload is a registration entry at the issuer, under the project's ID scheme
(``spiffe://<td>/env/<env>/zone/az1/team/<team>/svc/<name>``).  On the native stack it is
attested by its own Workload API socket (``ZTBANK_HOME/run/<name>/agent.sock``, which the issuer
opens for every ``ztbank:socket:NAME`` selector) and our uid, like the stack's own services; with
``--uid`` by that uid alone on the shared socket (the compose stack, real deployments).

``--may-call SERVICE:PATTERN`` adds a policy rule to the file the running services watch; they
re-read it within 0.5 s, without a restart.  Every change of entries and rules is written to
``ZTBANK_HOME/audit/ops.jsonl`` with the operator's uid.  An add that fails part-way undoes
what it did; a removal revokes the workload's SPIFFE ID first, so no certificate of it outlives
its entry.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import pwd
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from services._proto import issuer_admin_pb2 as pb
from services._proto import ledger_pb2, risk_pb2
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.cli.commands.common import Groups, Parser, with_stack_settings
from services.cli.errors import CliError, UsageError
from services.common.authz.audit import AuditLog, AuditRecord
from services.common.authz.policy import RELOAD_CHECK_SECONDS, PolicyError, parse_policy
from services.common.files import write_atomic
from services.common.identity.spiffe_id import SpiffeId
from services.common.identity.workloads import CONSOLE, GATEWAY, OPS, RISK, SERVICES, TELLER, ZONE
from services.common.identity.workloads import ENV as DEFAULT_ENV
from services.common.settings import MAX_SOCKET_PATH
from services.gateway.route_table import GATEWAY_ROUTES
from services.issuer.admin_client import AdminCallError, call_admin
from services.issuer.domain.revocation import parse_reason
from services.labs.support import policy_lock, watched_file
from services.stack.native import NativeStack, StackSettings, stack_hint

# One label for the socket name, the SPIFFE ID's path segment and a DNS name alike.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# The stack's own identities, and the names its run directory already uses.
RESERVED = frozenset({w.name for w in (*SERVICES, TELLER, OPS, CONSOLE)} | {"issuer", "pids"})
_SCHEME = re.compile(
    r"/env/(?P<env>[^/]+)/zone/(?P<zone>[^/]+)/team/(?P<team>[^/]+)/svc/(?P<name>[^/]+)"
)
AUDIT_NAME = "ops"
REVOKE_REASON = "cessationOfOperation"
# A rule written at T decides every request that arrives after T + RELOAD_CHECK_SECONDS (each
# service re-checks the file at most that often, on a request); the margin covers a slow stat.
RELOAD_WAIT_SECONDS = RELOAD_CHECK_SECONDS + 0.2
UID_SELECTOR = "unix:uid:"


def _grpc_methods(*files: Any) -> tuple[str, ...]:
    return tuple(
        f"/{service.full_name}/{method.name}"
        for descriptor in files
        for service in descriptor.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    )


def served_methods() -> dict[str, tuple[str, ...]]:
    """Each service of the stack and the methods it serves, as its policy rules name them."""
    return {
        GATEWAY.name: GATEWAY_ROUTES,
        "transfer-engine": _grpc_methods(ledger_pb2),
        RISK.name: _grpc_methods(risk_pb2),
    }


# -- validation (before anything changes) -----------------------------------------------------


def check_label(what: str, value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise UsageError(
            f"{what} {value!r} must be 1-63 lowercase letters, digits and inner '-'"
            " (it is a SPIFFE ID segment, a socket name and a DNS label)"
        )
    return value


@dataclass(frozen=True)
class Target:
    """A rule to add: ``caller`` may call ``service`` methods matching ``method``."""

    service: str
    method: str

    def __str__(self) -> str:
        return f"{self.service} {self.method}"


def parse_target(text: str) -> Target:
    """``gateway:/v1/*`` (any HTTP method on those paths), ``gateway:GET /v1/accounts*`` or
    ``transfer-engine:/ztbank.ledger.v1.TransferEngine/*``; it must name something served."""
    service, colon, pattern = text.partition(":")
    served = served_methods()
    if not colon or service not in served:
        raise UsageError(
            f"--may-call {text!r}: unknown target; use SERVICE:PATTERN with SERVICE one of"
            f" {', '.join(served)} (e.g. gateway:/v1/*)"
        )
    method = f"* {pattern}" if service == GATEWAY.name and pattern.startswith("/") else pattern
    if not any(fnmatch.fnmatchcase(m, method) for m in served[service]):
        raise UsageError(f"--may-call {text!r}: {service} serves nothing that matches {method!r}")
    return Target(service, method)


def workload_id(trust_domain: str, name: str, team: str, env: str) -> SpiffeId:
    for what, value in (("name", name), ("--team", team), ("--env", env)):
        check_label(what, value)
    return SpiffeId.for_workload(trust_domain, env=env, zone=ZONE, team=team, service=name)


def scheme_name(spiffe_id: str) -> str | None:
    """The workload name of an ID under the project's scheme, else None."""
    path = spiffe_id.partition("://")[2].partition("/")[1:]
    match = _SCHEME.fullmatch("".join(path))
    return match["name"] if match else None


# -- the policy file ---------------------------------------------------------------------------


def _dump_policy(document: dict[str, Any]) -> str:
    """The layout of infra/policy.json (a rule's keys one a line, each list on one line), so an
    edit shows as the lines it changed; anything else as plain indented JSON."""
    rules = document.get("rules")
    if set(document) != {"rules"} or not isinstance(rules, list) or not rules:
        return json.dumps(document, indent=2) + "\n"
    blocks = []
    for rule in rules:
        lines = [f"      {json.dumps(key)}: {json.dumps(value)}" for key, value in rule.items()]
        blocks.append("    {\n" + ",\n".join(lines) + "\n    }")
    return '{\n  "rules": [\n' + ",\n".join(blocks) + "\n  ]\n}\n"


def _template(trust_domain: str, caller: SpiffeId) -> str:
    """``caller`` as infra/policy.json writes callers: with ``{trust_domain}``."""
    return str(caller).replace(f"spiffe://{trust_domain}/", "spiffe://{trust_domain}/", 1)


def _caller_forms(trust_domain: str, caller: SpiffeId) -> set[str]:
    return {str(caller), _template(trust_domain, caller)}


def _load_policy(text: str, trust_domain: str) -> dict[str, Any]:
    try:
        parse_policy(text, trust_domain)
    except PolicyError as error:
        raise CliError(f"the policy file is unusable, nothing was changed: {error}") from None
    document: dict[str, Any] = json.loads(text)
    return document


def grant(
    text: str, trust_domain: str, caller: SpiffeId, targets: Sequence[Target]
) -> tuple[str, list[Target]]:
    """The policy ``text`` with a rule per target not already granted to ``caller``; and the
    targets added."""
    document = _load_policy(text, trust_domain)
    forms = _caller_forms(trust_domain, caller)
    added = []
    for target in targets:
        if any(
            rule["service"] == target.service
            and target.method in rule["methods"]
            and forms & set(rule["callers"])
            for rule in document["rules"]
        ):
            continue
        document["rules"].append(
            {
                "service": target.service,
                "methods": [target.method],
                "callers": [_template(trust_domain, caller)],
            }
        )
        added.append(target)
    new_text = _dump_policy(document)
    parse_policy(new_text, trust_domain)  # what we write must load
    return new_text, added


def withdraw(text: str, trust_domain: str, caller: SpiffeId) -> tuple[str, list[Target]]:
    """The policy ``text`` with ``caller`` taken out of every rule (a rule left with no caller
    goes); and what it could call."""
    document = _load_policy(text, trust_domain)
    forms = _caller_forms(trust_domain, caller)
    removed: list[Target] = []
    kept = []
    for rule in document["rules"]:
        if forms & set(rule["callers"]):
            removed += [Target(rule["service"], m) for m in rule["methods"]]
            rule["callers"] = [c for c in rule["callers"] if c not in forms]
            if not rule["callers"]:
                continue
        kept.append(rule)
    document["rules"] = kept
    return _dump_policy(document), removed


def granted(text: str, trust_domain: str, caller: str) -> list[str]:
    """What ``caller`` may call under the policy ``text``."""
    try:
        rules = parse_policy(text, trust_domain)
    except PolicyError:
        return []
    return [f"{r.service} {m}" for r in rules if caller in r.callers for m in r.methods]


# -- the stack ---------------------------------------------------------------------------------


class OpsAudit:
    """Changes to entries and rules, one record each in ``ZTBANK_HOME/audit/ops.jsonl``."""

    def __init__(self, settings: StackSettings) -> None:
        self._path = settings.home / "audit" / f"{AUDIT_NAME}.jsonl"
        uid = os.getuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = "?"
        self._who = f"uid {uid} ({user})"

    def record(self, method: str, target: str, what: str) -> None:
        """Write one record; a change that cannot be audited is undone by the caller."""
        try:
            log = AuditLog(self._path)
        except OSError as error:
            raise CliError(f"cannot write the audit record to {self._path}: {error}") from None
        try:
            log.record(
                AuditRecord(
                    caller_spiffe_id=None,  # the operator acts by uid, with no SVID of theirs
                    cert_serial=None,
                    cert_sha256=None,
                    source_addr="local",
                    source_port=None,
                    dest_addr=target,
                    dest_port=None,
                    tls_version=None,
                    cipher=None,
                    service=AUDIT_NAME,
                    method=method,
                    decision="allow",
                    reason=f"{self._who}: {what}",
                    trace_id=None,
                    event="ops",
                )
            )
        except OSError as error:
            raise CliError(f"cannot write the audit record to {self._path}: {error}") from None
        finally:
            log.close()


def list_entries(settings: StackSettings) -> list[pb.Entry]:
    """Every registration entry at the running issuer; no issuer is a failure that says how to
    start the stack."""
    try:
        reply = call_admin(settings.admin_socket, lambda s: s.ListEntries(pb.ListEntriesRequest()))
    except AdminCallError as error:
        raise CliError(f"{error}; {stack_hint(settings.home)}") from None
    return list(reply.entries)


def entries_of(entries: list[pb.Entry], name: str) -> list[pb.Entry]:
    """The entries of workload ``name``: by its SPIFFE ID under the scheme, or its own socket."""
    socket = f"ztbank:socket:{name}"
    return [e for e in entries if scheme_name(e.spiffe_id) == name or socket in e.selectors]


def _policy_path(settings: StackSettings) -> Path:
    return watched_file(NativeStack(settings), "ZTBANK_POLICY", settings.policy, "policy")


def _read(path: Path) -> tuple[str, int]:
    try:
        return path.read_text(), os.stat(path).st_mode & 0o7777
    except (OSError, UnicodeDecodeError) as error:
        raise CliError(f"cannot read the policy {path}: {error}") from None


@dataclass(frozen=True)
class AddRequest:
    name: str
    spiffe_id: SpiffeId
    selectors: list[str]
    targets: list[Target]


def _add_request(args: argparse.Namespace, settings: StackSettings) -> AddRequest:
    name = check_label("name", args.name)
    if name in RESERVED:
        raise UsageError(f"{name!r} is one of the stack's own names; choose another")
    spiffe_id = workload_id(settings.trust_domain, name, args.team, args.env)
    if args.uid is not None:
        if args.uid < 0:
            raise UsageError(f"--uid {args.uid}: must be a uid (0 or more)")
        selectors = [f"{UID_SELECTOR}{args.uid}"]
    else:
        socket = settings.workload_socket_for(name)
        if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
            raise UsageError(
                f"name {name!r}: its socket {socket} would be longer than {MAX_SOCKET_PATH}"
                " bytes; choose a shorter name or ZTBANK_HOME"
            )
        selectors = sorted([f"ztbank:socket:{name}", f"{UID_SELECTOR}{os.getuid()}"])
    targets = [parse_target(text) for text in args.may_call or []]
    return AddRequest(name, spiffe_id, selectors, targets)


@dataclass
class PolicyEdit:
    """A rule to add to the watched policy: its original to put back if the add fails."""

    path: Path
    original: str
    mode: int
    edited: str
    added: list[Target]
    written: bool = False

    @classmethod
    def of(cls, settings: StackSettings, request: AddRequest) -> PolicyEdit:
        path = _policy_path(settings)
        text, mode = _read(path)
        edited, added = grant(text, settings.trust_domain, request.spiffe_id, request.targets)
        return cls(path, text, mode, edited, added)

    def write(self) -> None:
        self.written = True  # before: a write cut short is put back too
        write_atomic(self.path, self.edited.encode(), self.mode)

    def undo(self) -> None:
        if self.written:
            write_atomic(self.path, self.original.encode(), self.mode)


def cmd_workload_add(args: argparse.Namespace, settings: StackSettings) -> int:
    with policy_lock(settings):
        return _add(args, settings)


def _add(args: argparse.Namespace, settings: StackSettings) -> int:
    request = _add_request(args, settings)
    spiffe_id = str(request.spiffe_id)
    existing = entries_of(list_entries(settings), request.name)
    other = [e for e in existing if e.spiffe_id != spiffe_id]
    if other:
        raise UsageError(
            f"{request.name} is already onboarded as {other[0].spiffe_id};"
            f" `ztbank workload remove {request.name}` first"
        )
    policy = PolicyEdit.of(settings, request) if request.targets else None
    audit = OpsAudit(settings)
    created: pb.Entry | None = None
    done: list[str] = []
    try:
        if not any(sorted(e.selectors) == request.selectors for e in existing):
            create = pb.CreateEntryRequest(spiffe_id=spiffe_id, selectors=request.selectors)
            created = call_admin(settings.admin_socket, lambda s: s.CreateEntry(create))
            audit.record(
                "workload add",
                spiffe_id,
                f"created entry {created.id} for {spiffe_id} ({', '.join(request.selectors)})",
            )
            done.append(f"registered {spiffe_id} ({', '.join(request.selectors)})")
        done += _lift_revocation(settings, audit, spiffe_id)
        if policy is not None and policy.added:
            policy.write()
            rules = "; ".join(str(t) for t in policy.added)
            audit.record("policy grant", str(policy.path), f"{spiffe_id} may call {rules}")
            done.append(f"may call {rules} (rule added to {policy.path})")
    except BaseException:
        _undo_add(settings, audit, created, policy)
        raise
    if policy is not None and policy.added:
        time.sleep(RELOAD_WAIT_SECONDS)  # when we return, the services decide by the new rule
    print(f"{request.name}: " + ("; ".join(done) if done else f"already onboarded as {spiffe_id}"))
    if args.uid is None:
        print(f"SPIFFE_ENDPOINT_SOCKET=unix://{settings.workload_socket_for(request.name)}")
    return 0


def _lift_revocation(settings: StackSettings, audit: OpsAudit, spiffe_id: str) -> list[str]:
    """A name removed earlier (its ID revoked) is issued SVIDs again once added back; its old
    certificates stay revoked."""
    status = call_admin(settings.admin_socket, lambda s: s.Status(pb.StatusRequest()))
    if spiffe_id not in status.revoked_spiffe_ids:
        return []
    undo = pb.RevokeRequest(spiffe_id=spiffe_id, undo=True)
    call_admin(settings.admin_socket, lambda s: s.Revoke(undo))
    audit.record("workload add", spiffe_id, f"lifted the revocation of {spiffe_id}")
    return ["lifted its earlier revocation (its old certificates stay revoked)"]


def _undo_add(
    settings: StackSettings, audit: OpsAudit, created: pb.Entry | None, policy: PolicyEdit | None
) -> None:
    """Put back what a failed add changed: nothing is half-added."""
    if policy is not None:
        policy.undo()
    if created is None:
        return
    delete = pb.DeleteEntryRequest(id=created.id)
    call_admin(settings.admin_socket, lambda s: s.DeleteEntry(delete))
    # The entry's creation may be on record: so is its removal, if the audit can still be written.
    with contextlib.suppress(CliError):
        audit.record("workload add", created.spiffe_id, f"failed: deleted entry {created.id}")


async def _revoke(stub: IssuerAdminStub, *, request: pb.RevokeRequest) -> pb.RevokeResponse:
    return await stub.Revoke(request)


async def _delete(
    stub: IssuerAdminStub, *, request: pb.DeleteEntryRequest
) -> pb.DeleteEntryResponse:
    return await stub.DeleteEntry(request)


def cmd_workload_remove(args: argparse.Namespace, settings: StackSettings) -> int:
    with policy_lock(settings):
        return _remove(args, settings)


def _remove(args: argparse.Namespace, settings: StackSettings) -> int:
    name = check_label("name", args.name)
    if name in RESERVED:
        raise UsageError(f"{name!r} is one of the stack's own workloads; it cannot be removed")
    entries = entries_of(list_entries(settings), name)
    if not entries:
        raise UsageError(f"no workload {name!r} (see `ztbank workload list`)")
    audit = OpsAudit(settings)
    done = []
    for spiffe_id in sorted({e.spiffe_id for e in entries}):
        # Revoked first: a failure later leaves the ID unusable, never a live certificate of a
        # workload that is gone.
        revoke = pb.RevokeRequest(spiffe_id=spiffe_id, reason=parse_reason(REVOKE_REASON))
        reply = call_admin(settings.admin_socket, partial(_revoke, request=revoke))
        serials = ", ".join(reply.serials) or "none unexpired"
        audit.record("workload remove", spiffe_id, f"revoked {spiffe_id}: {serials}")
        done.append(f"revoked {spiffe_id} (certificates: {serials})")
    for entry in entries:
        delete = pb.DeleteEntryRequest(id=entry.id)
        call_admin(settings.admin_socket, partial(_delete, request=delete))
        audit.record("workload remove", entry.spiffe_id, f"deleted entry {entry.id}")
    done.append(f"deleted {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    running = NativeStack(settings).services[GATEWAY.name].running()
    if running:
        path = _policy_path(settings)
        text, mode = _read(path)
        for spiffe_id in sorted({e.spiffe_id for e in entries}):
            text, removed = withdraw(text, settings.trust_domain, SpiffeId.parse(spiffe_id))
            if removed:
                write_atomic(path, text.encode(), mode)
                rules = "; ".join(str(t) for t in removed)
                audit.record(
                    "policy withdraw", str(path), f"{spiffe_id} may no longer call {rules}"
                )
                done.append(f"its rules withdrawn ({rules})")
    else:
        done.append("the gateway is not running here: the policy file was not checked")
    print(f"{name}: " + "; ".join(done))
    return 0


@dataclass(frozen=True)
class Listed:
    name: str
    spiffe_id: str
    selectors: list[str]
    stack: bool  # one of the stack's own workloads
    may_call: list[str] | None  # None: the policy the gateway reads is not known here


def cmd_workload_list(args: argparse.Namespace, settings: StackSettings) -> int:
    running = NativeStack(settings).services[GATEWAY.name].running()
    text = _read(_policy_path(settings))[0] if running else None
    rows = [
        Listed(
            name,
            entry.spiffe_id,
            sorted(entry.selectors),
            name in RESERVED,
            None if text is None else granted(text, settings.trust_domain, entry.spiffe_id),
        )
        for entry in list_entries(settings)
        if (name := scheme_name(entry.spiffe_id)) is not None
    ]
    if args.json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    for row in rows:
        calls = "?" if row.may_call is None else ("; ".join(row.may_call) or "nothing")
        own = "  (the stack's own)" if row.stack else ""
        print(f"{row.name:<16} {row.spiffe_id}{own}")
        print(f"{'':<16} selectors {', '.join(row.selectors)}; may call {calls}")
    return 0


# -- the parser --------------------------------------------------------------------------------


def register(groups: Groups) -> None:
    """``workload`` on the ``ztbank`` parser; its handlers get the stack's settings."""
    workload = groups.add_parser(
        "workload", help="onboard a team's workload onto the running stack (docs/ci.md)"
    ).add_subparsers(dest="command", required=True, parser_class=Parser)
    add = workload.add_parser(
        "add", help="register a workload and, if asked, let it call a service"
    )
    add.add_argument("name", help="the workload's name: the svc segment of its SPIFFE ID")
    add.add_argument("--team", required=True, help="the team segment of its SPIFFE ID")
    add.add_argument("--env", default=DEFAULT_ENV, help=f"the env segment (default {DEFAULT_ENV})")
    add.add_argument(
        "--may-call",
        action="append",
        metavar="SERVICE:PATTERN",
        help="let it call these methods, e.g. gateway:/v1/* (repeatable; live policy edit)",
    )
    add.add_argument(
        "--uid",
        type=int,
        help="attest it by this uid on the shared socket (compose), not by a socket of its own",
    )
    add.set_defaults(handler=with_stack_settings(cmd_workload_add))
    listing = workload.add_parser("list", help="the workloads registered and what they may call")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=with_stack_settings(cmd_workload_list))
    remove = workload.add_parser(
        "remove", help="revoke a workload's SPIFFE ID, delete its entry and withdraw its rules"
    )
    remove.add_argument("name")
    remove.set_defaults(handler=with_stack_settings(cmd_workload_remove))
