"""``ztbank``: the operator's and trainee's command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from services._proto import issuer_admin_pb2 as pb
from services.cli.errors import CliError, UsageError
from services.cli.vault_cmd import register as register_vault_commands
from services.cli.workload_cmd import register as register_workload_commands
from services.common.durations import parse_duration
from services.common.errors import CommonError
from services.common.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic
from services.common.settings import ZtbankSettings, load_settings
from services.issuer.admin_client import AdminCallError, call_admin
from services.issuer.domain.entries import Selector, parse_workload_id
from services.issuer.domain.revocation import parse_reason, parse_serial
from services.issuer.errors import IssuerError
from services.labs.errors import LabError, LabUsageError
from services.labs.registry import LABS, Lab
from services.labs.teller import Reply, TellerClient, refusal
from services.stack.native import (
    NativeStack,
    StackError,
    StackSettings,
    StackStatus,
    locate_settings,
    stack_healthy,
    status_document,
)

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2, never a wall of text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _ttl_seconds(text: str | None) -> int:
    if text is None:
        return 0
    try:
        seconds = parse_duration(text).total_seconds()
    except CommonError as error:
        raise UsageError(str(error)) from None
    if seconds < 1:
        raise UsageError(f"--ttl {text}: must be at least 1s")
    return int(seconds)


def _base_settings(args: argparse.Namespace) -> ZtbankSettings:
    overrides = {k: v for k, v in (("trust_domain", getattr(args, "trust_domain", None)),) if v}
    return locate_settings(ZtbankSettings, **overrides)


def _check_workload_id(text: str, settings: ZtbankSettings) -> None:
    try:
        parse_workload_id(text, settings.trust_domain)
    except IssuerError as error:
        raise UsageError(str(error)) from None


# -- certs ------------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from services.issuer.adapters.upstream.disk import init_root_ca

    settings = _base_settings(args)
    result = init_root_ca(settings.certs_dir, settings.trust_domain)
    verb = "created" if result.created else "kept existing"
    print(f"{verb} root CA for {settings.trust_domain}: {result.cert_path} (key {result.key_path})")
    return 0


# -- issuer -----------------------------------------------------------------------------------


def cmd_issuer_run(args: argparse.Namespace) -> int:
    from services.common.observability.logs import configure_json_logging
    from services.issuer.server import serve
    from services.issuer.settings import IssuerSettings

    flags = {
        "trust_domain": args.trust_domain,
        "svid_ttl": args.svid_ttl,
        "upstream": args.upstream,
        "SPIFFE_ENDPOINT_SOCKET": args.socket,
    }
    settings = load_settings(IssuerSettings, **{k: v for k, v in flags.items() if v})
    configure_json_logging("issuer", args.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
    return 0


# -- entries ----------------------------------------------------------------------------------


def _entry_dict(entry: pb.Entry) -> dict[str, object]:
    return {
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "selectors": list(entry.selectors),
        "ttl_seconds": entry.ttl_seconds or None,
        "dns_names": list(entry.dns_names),
        "created_at": entry.created_at,
    }


def cmd_entry_create(args: argparse.Namespace) -> int:
    settings = _base_settings(args)
    _check_workload_id(args.spiffe_id, settings)
    for text in args.selector:
        try:
            Selector.parse(text)
        except IssuerError as error:
            raise UsageError(str(error)) from None
    request = pb.CreateEntryRequest(
        spiffe_id=args.spiffe_id,
        selectors=args.selector,
        ttl_seconds=_ttl_seconds(args.ttl),
        dns_names=args.dns_name or [],
    )
    entry = call_admin(settings.admin_socket, lambda stub: stub.CreateEntry(request))
    if args.json:
        print(json.dumps(_entry_dict(entry)))
    else:
        print(f"created entry {entry.id} for {entry.spiffe_id}")
    return 0


def cmd_entry_list(args: argparse.Namespace) -> int:
    settings = _base_settings(args)
    response = call_admin(settings.admin_socket, lambda s: s.ListEntries(pb.ListEntriesRequest()))
    if args.json:
        print(json.dumps([_entry_dict(e) for e in response.entries], indent=2))
        return 0
    if not response.entries:
        print("no entries")
    for entry in response.entries:
        ttl = f"{entry.ttl_seconds}s" if entry.ttl_seconds else "default"
        dns = f"  dns={','.join(entry.dns_names)}" if entry.dns_names else ""
        print(f"{entry.id}  {entry.spiffe_id}  ttl={ttl}{dns}")
        for selector in entry.selectors:
            print(f"    {selector}")
    return 0


def cmd_entry_delete(args: argparse.Namespace) -> int:
    settings = _base_settings(args)
    call_admin(
        settings.admin_socket, lambda s: s.DeleteEntry(pb.DeleteEntryRequest(id=args.entry_id))
    )
    print(f"deleted entry {args.entry_id}")
    return 0


# -- svid -------------------------------------------------------------------------------------


def cmd_svid_mint(args: argparse.Namespace) -> int:
    settings = _base_settings(args)
    _check_workload_id(args.spiffe_id, settings)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    request = pb.MintX509SVIDRequest(
        spiffe_id=args.spiffe_id, ttl_seconds=_ttl_seconds(args.ttl), dns_names=args.dns_name or []
    )
    response = call_admin(settings.admin_socket, lambda s: s.MintX509SVID(request))
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "svid.key", response.key_pem, PRIVATE_MODE)
    write_atomic(out / "svid.pem", response.chain_pem, PUBLIC_MODE)
    write_atomic(out / "bundle.pem", response.bundle_pem, PUBLIC_MODE)
    summary = {
        "spiffe_id": args.spiffe_id,
        "serial": response.serial,
        "not_after": response.not_after,
        "svid": str(out / "svid.pem"),
        "key": str(out / "svid.key"),
        "bundle": str(out / "bundle.pem"),
    }
    print(
        json.dumps(summary)
        if args.json
        else f"minted {args.spiffe_id} serial {response.serial}"
        f" valid until {response.not_after} -> {out}"
    )
    return 0


# -- revoke -----------------------------------------------------------------------------------


def _revoke_request(args: argparse.Namespace, settings: ZtbankSettings) -> pb.RevokeRequest:
    """Check what can be checked here, so bad input never reaches the issuer."""
    try:
        if args.undo:
            if args.serial:
                raise UsageError("--undo lifts a SPIFFE ID's revocation; a serial stays revoked")
            if args.reason:
                raise UsageError("--undo takes no --reason")
            _check_workload_id(args.spiffe_id, settings)
            return pb.RevokeRequest(spiffe_id=args.spiffe_id, undo=True)
        reason = parse_reason(args.reason or "")
        if args.serial:
            return pb.RevokeRequest(serial=parse_serial(args.serial), reason=reason)
        _check_workload_id(args.spiffe_id, settings)
        return pb.RevokeRequest(spiffe_id=args.spiffe_id, reason=reason)
    except IssuerError as error:
        raise UsageError(str(error)) from None


def _revoke_dict(response: pb.RevokeResponse) -> dict[str, object]:
    return {
        "serials": list(response.serials),
        "spiffe_id": response.spiffe_id,
        "reason": response.reason,
        "revoked_at": response.revoked_at,
        "replaced": list(response.replaced),
        "crl_number": response.crl_number or None,
        "undone": response.undone,
    }


def cmd_revoke(args: argparse.Namespace) -> int:
    settings = _base_settings(args)
    request = _revoke_request(args, settings)
    response = call_admin(settings.admin_socket, lambda s: s.Revoke(request))
    if args.json:
        print(json.dumps(_revoke_dict(response)))
    elif response.undone:
        print(
            f"lifted the revocation of {response.spiffe_id} ({response.reason} since"
            f" {response.revoked_at}): it gets SVIDs again; its revoked certificates stay revoked"
        )
    elif request.serial:
        renewed = "; its workloads get a fresh SVID now" if response.replaced else ""
        print(
            f"revoked serial {response.serials[0]} of {response.spiffe_id} ({response.reason})"
            f" at {response.revoked_at}; CRL number {response.crl_number}{renewed}"
        )
    else:
        serials = ", ".join(response.serials) if response.serials else "none unexpired"
        print(
            f"revoked {response.spiffe_id} ({response.reason}) at {response.revoked_at}:"
            f" no new SVIDs until `ztbank revoke --undo --spiffe-id {response.spiffe_id}`;"
            f" certificates revoked: {serials}; CRL number {response.crl_number}"
        )
    return 0


# -- the native stack ---------------------------------------------------------------------------


def _stack_settings(args: argparse.Namespace) -> StackSettings:
    overrides: dict[str, Any] = {"trust_domain": args.trust_domain} if args.trust_domain else {}
    if upstream := getattr(args, "upstream", None):
        overrides["upstream"] = upstream
    return locate_settings(StackSettings, **overrides)


def _print_status(status: StackStatus) -> None:
    print(f"trust domain {status.trust_domain}  root CA {status.root_ca}")
    running = "running" if status.issuer_running else "stopped"
    print(f"{'issuer':<16} {running}, Workload API {status.issuer_socket}")
    print(f"{'':<16} CRLs {status.issuer_crl_url}  OCSP {status.issuer_ocsp_url}")
    if (authority := status.issuer_authority) is not None:
        print(
            f"{'':<16} signing CA {authority.active_ca_serial} until"
            f" {authority.active_ca_not_after} ({authority.upstream} upstream),"
            f" {authority.entries} entries, CRL #{authority.crl_number},"
            f" {authority.revoked_certificates} certificates and"
            f" {len(authority.revoked_spiffe_ids)} SPIFFE IDs revoked"
        )
        if authority.ca_chain:
            chain = " <- ".join(f"{c['subject']} ({c['serial'][:8]}…)" for c in authority.ca_chain)
            print(f"{'':<16} chain {chain}")
        if authority.upstream_error:
            print(f"{'':<16} UPSTREAM FAILING: {authority.upstream_error}")
    if (vault := status.vault) is not None:
        version = f" ({vault.version})" if vault.version else ""
        process = "" if vault.running else ", not running"
        print(f"{'vault':<16} {vault.address:<24} {vault.state}{version}{process}  log {vault.log}")
    for name, probe in status.services.items():
        health = "healthy" if probe.healthy else f"DOWN ({probe.error})"
        serial = (
            f"svid {probe.svid_serial} until {probe.svid_not_after}" if probe.svid_serial else ""
        )
        print(f"{name:<16} {probe.url:<24} {health}  {probe.spiffe_id}  {serial}")


def cmd_up(args: argparse.Namespace) -> int:
    stack = NativeStack(_stack_settings(args))
    try:
        status = stack.up()
    except StackError as error:
        raise CliError(str(error)) from None
    _print_status(status)
    print(f"logs in {stack.settings.home / 'log'}; `make down` stops everything")
    print(f"lab console: `make console`, then open {stack.settings.console_url}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from services.console.server import serve_console  # FastAPI: only for this command
    from services.console.settings import CONSOLE_HOST, ConsoleSettings

    overrides = {"trust_domain": args.trust_domain} if args.trust_domain else {}
    settings = locate_settings(ConsoleSettings, **overrides)
    with socket.socket() as probe:
        # As uvicorn binds: connections of a console just stopped (TIME_WAIT) are no console.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((CONSOLE_HOST, settings.console_port))
        except OSError as error:
            raise CliError(
                f"cannot listen on {CONSOLE_HOST}:{settings.console_port} ({error.strerror});"
                " is a console already running? (ZTBANK_CONSOLE_PORT picks another port)"
            ) from None
    print(
        f"lab console on {settings.console_url} for the stack in {settings.home} (Ctrl-C stops it)",
        flush=True,
    )
    serve_console(settings)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stopped = NativeStack(_stack_settings(args)).down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    stack = NativeStack(_stack_settings(args))
    stack.reset()
    print(f"stopped everything and wiped {stack.settings.home} (certs kept)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = NativeStack(_stack_settings(args)).status()
    if args.json:
        print(json.dumps(status_document(status), indent=2))
    else:
        _print_status(status)
    return 0 if stack_healthy(status) else 1


# -- labs -------------------------------------------------------------------------------------


def lab_handler(lab: Lab) -> Handler:
    """``ztbank lab NAME``: its options checked, then the lab narrating on stdout; exit 0 when
    it passed, 1 when it failed."""

    def cmd_lab(args: argparse.Namespace) -> int:
        options = {option.name: getattr(args, option.name) for option in lab.options}
        for option in lab.options:
            option.check(options[option.name])
        # The lab narrates what happens; the libraries' own warnings (a revoked serial seen in
        # the CRLs) would only repeat it.
        logging.basicConfig(level=logging.ERROR)
        return 0 if lab.run(_stack_settings(args), print, **options) else 1

    return cmd_lab


def cmd_lab_list(args: argparse.Namespace) -> int:
    """``ztbank lab`` without a name: every lab, one line each."""
    width = max(len(lab.name) for lab in LABS)
    print("labs against the running native stack (`make up`); run one with")
    print("`ztbank lab NAME` or `make lab-NAME`:")
    for lab in LABS:
        print(f"  {lab.name:<{width}}  {lab.summary}")
    return 0


def add_lab_parsers(groups: argparse._SubParsersAction[_Parser]) -> None:
    lab_parser = groups.add_parser("lab", help="training labs against the running stack (a list)")
    lab_parser.set_defaults(handler=cmd_lab_list)
    labs = lab_parser.add_subparsers(dest="lab", parser_class=_Parser, metavar="NAME")
    for lab in LABS:
        parser = labs.add_parser(lab.name, help=lab.summary)
        for option in lab.options:
            parser.add_argument(
                option.flag, type=option.parse, default=option.default, help=option.help
            )
        parser.set_defaults(handler=lab_handler(lab))


# -- banking as the teller ----------------------------------------------------------------------


def _print_reply(reply: Reply) -> None:
    print(json.dumps(reply.body, indent=2))


def cmd_login(args: argparse.Namespace) -> int:
    print(TellerClient(_stack_settings(args)).token(args.customer))
    return 0


def cmd_accounts(args: argparse.Namespace) -> int:
    reply = TellerClient(_stack_settings(args)).as_customer(args.customer, "GET", "/v1/accounts")
    if reply.status != 200:
        raise refusal(reply)
    _print_reply(reply)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    reply = TellerClient(_stack_settings(args)).transfer(
        args.customer, args.source, args.target, args.amount, args.currency
    )
    if reply.status not in (201, 202):
        raise refusal(reply)
    _print_reply(reply)
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ztbank", description="ztbank operator and lab CLI")
    parser.add_argument("--trust-domain", help="override ZTBANK_TRUST_DOMAIN")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=_Parser)

    certs = groups.add_parser("certs", help="trust domain root CA").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    certs.add_parser("init", help="create the root CA in ZTBANK_CERTS_DIR if absent").set_defaults(
        handler=cmd_certs_init
    )

    issuer = groups.add_parser("issuer", help="the SPIFFE issuer").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    run = issuer.add_parser("run", help="run the issuer in the foreground")
    run.add_argument("--svid-ttl", help="ZTBANK_SVID_TTL, e.g. 20s or 5m (max 10m)")
    run.add_argument("--upstream", choices=["disk", "vault"], help="ZTBANK_UPSTREAM")
    run.add_argument("--socket", help="SPIFFE_ENDPOINT_SOCKET, e.g. unix:///tmp/agent.sock")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=cmd_issuer_run)

    entry = groups.add_parser("entry", help="registration entries").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    create = entry.add_parser("create", help="register a workload")
    create.add_argument("--spiffe-id", required=True)
    create.add_argument(
        "--selector", action="append", required=True, help="TYPE:KEY:VALUE (repeatable)"
    )
    create.add_argument("--ttl", help="SVID TTL for this entry, e.g. 30s (max 10m)")
    create.add_argument("--dns-name", action="append", help="extra DNS SAN (repeatable)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=cmd_entry_create)
    listing = entry.add_parser("list", help="list entries")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_entry_list)
    delete = entry.add_parser("delete", help="delete an entry")
    delete.add_argument("entry_id")
    delete.set_defaults(handler=cmd_entry_delete)

    svid = groups.add_parser("svid", help="X509-SVIDs").add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    mint = svid.add_parser("mint", help="admin: mint an SVID for any workload ID into a directory")
    mint.add_argument("--spiffe-id", required=True)
    mint.add_argument("--out", required=True, help="directory for svid.pem, svid.key, bundle.pem")
    mint.add_argument("--ttl", help="lifetime, e.g. 1m (max 10m)")
    mint.add_argument("--dns-name", action="append", help="extra DNS SAN (repeatable)")
    mint.add_argument("--json", action="store_true")
    mint.set_defaults(handler=cmd_svid_mint)

    revoke = groups.add_parser(
        "revoke",
        help="revoke a certificate by serial, or a SPIFFE ID (its certificates and new SVIDs)",
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--serial", help="hex serial, as `svid mint` or openssl print it")
    target.add_argument("--spiffe-id", help="revoke every certificate of this ID; refuse new ones")
    revoke.add_argument(
        "--reason",
        help="RFC 5280 reason: unspecified (default), keyCompromise, superseded,"
        " cessationOfOperation, affiliationChanged, privilegeWithdrawn",
    )
    revoke.add_argument(
        "--undo", action="store_true", help="with --spiffe-id: let the ID be issued SVIDs again"
    )
    revoke.add_argument("--json", action="store_true")
    revoke.set_defaults(handler=cmd_revoke)
    for name, handler, text in (
        ("up", cmd_up, "start the native stack in the background and wait until healthy"),
        ("console", cmd_console, "serve the live lab console on 127.0.0.1 (ZTBANK_CONSOLE_PORT)"),
        ("down", cmd_down, "stop every process `up` started (state is kept)"),
        ("reset", cmd_reset, "stop everything and wipe ZTBANK_HOME (balances, history, entries)"),
    ):
        groups.add_parser(name, help=text).set_defaults(handler=handler)
    up = groups.choices["up"]
    up.add_argument(
        "--upstream",
        choices=("disk", "vault"),
        help="who signs the issuer's CA: the root in certs/ (default) or a local Vault (OpenBao)",
    )
    status = groups.add_parser("status", help="trust domain, issuer and each service's SVID/health")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    add_lab_parsers(groups)

    login = groups.add_parser("login", help="print a short-lived bearer token for a customer")
    login.add_argument("customer")
    login.set_defaults(handler=cmd_login)
    accounts = groups.add_parser("accounts", help="a customer's accounts, as the teller")
    accounts.add_argument("--customer", default="alice")
    accounts.set_defaults(handler=cmd_accounts)
    transfer = groups.add_parser("transfer", help="move money between accounts, as the teller")
    transfer.add_argument("--from", dest="source", required=True, metavar="ACCOUNT")
    transfer.add_argument("--to", dest="target", required=True, metavar="ACCOUNT")
    transfer.add_argument("--amount", required=True, help="decimal string, e.g. 12.34")
    transfer.add_argument("--currency", default="CNY")
    transfer.add_argument("--customer", default="alice")
    transfer.set_defaults(handler=cmd_transfer)
    register_workload_commands(groups, _Parser, _stack_settings)
    register_vault_commands(groups, _Parser)
    return parser


def exit_code(error: CliError | LabError | CommonError | IssuerError) -> int:
    """2 when the user's input is to blame (theirs to fix), 1 when an operation was refused or
    failed."""
    if isinstance(error, CliError):
        return error.exit_code
    if isinstance(error, AdminCallError):
        return 2 if error.bad_input else 1
    # Settings and input validation errors from the shared library are the user's to fix.
    return 2 if isinstance(error, LabUsageError | CommonError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except (CliError, LabError, CommonError, IssuerError) as error:
        print(f"ztbank: {error}", file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        return 130
