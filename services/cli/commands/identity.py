"""``ztbank certs|issuer|entry|svid|revoke``: the trust domain's identity plane from the
operator's side: its root CA, the issuer serving it in the foreground, registration entries,
SVIDs minted by the admin, revocation.  All but ``certs init`` and ``issuer run`` are the
issuer's admin RPCs over its admin socket; input is checked here first, so bad input never
reaches the issuer."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from services._proto import issuer_admin_pb2 as pb
from services.cli.commands.common import Groups, Parser, base_settings
from services.cli.errors import UsageError
from services.common.durations import parse_duration
from services.common.errors import CommonError
from services.common.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic
from services.common.settings import ZtbankSettings, load_settings
from services.issuer.admin_client import call_admin
from services.issuer.domain.entries import Selector, parse_workload_id
from services.issuer.domain.revocation import parse_reason, parse_serial
from services.issuer.errors import IssuerError


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


def _check_workload_id(text: str, settings: ZtbankSettings) -> None:
    try:
        parse_workload_id(text, settings.trust_domain)
    except IssuerError as error:
        raise UsageError(str(error)) from None


# -- certs ------------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from services.issuer.adapters.upstream.disk import init_root_ca

    settings = base_settings(args)
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
    settings = base_settings(args)
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
    settings = base_settings(args)
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
    settings = base_settings(args)
    call_admin(
        settings.admin_socket, lambda s: s.DeleteEntry(pb.DeleteEntryRequest(id=args.entry_id))
    )
    print(f"deleted entry {args.entry_id}")
    return 0


# -- svid -------------------------------------------------------------------------------------


def cmd_svid_mint(args: argparse.Namespace) -> int:
    settings = base_settings(args)
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
    settings = base_settings(args)
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


# -- the parser -------------------------------------------------------------------------------


def register(groups: Groups) -> None:
    """``certs``, ``issuer``, ``entry``, ``svid`` and ``revoke`` on the ``ztbank`` parser."""
    certs = groups.add_parser("certs", help="trust domain root CA").add_subparsers(
        dest="command", required=True, parser_class=Parser
    )
    certs.add_parser("init", help="create the root CA in ZTBANK_CERTS_DIR if absent").set_defaults(
        handler=cmd_certs_init
    )

    issuer = groups.add_parser("issuer", help="the SPIFFE issuer").add_subparsers(
        dest="command", required=True, parser_class=Parser
    )
    run = issuer.add_parser("run", help="run the issuer in the foreground")
    run.add_argument("--svid-ttl", help="ZTBANK_SVID_TTL, e.g. 20s or 5m (max 10m)")
    run.add_argument("--upstream", choices=["disk", "vault"], help="ZTBANK_UPSTREAM")
    run.add_argument("--socket", help="SPIFFE_ENDPOINT_SOCKET, e.g. unix:///tmp/agent.sock")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(handler=cmd_issuer_run)

    entry = groups.add_parser("entry", help="registration entries").add_subparsers(
        dest="command", required=True, parser_class=Parser
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
        dest="command", required=True, parser_class=Parser
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
