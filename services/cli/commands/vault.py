"""``ztbank vault tls``: Vault's own TLS material (a CA for its listener, and the server
certificate it signs), made or renewed; compose's one-shot ``vault-tls`` job runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.commands.common import Groups, Parser
from services.cli.errors import CliError
from services.stack.vault_tls import VaultTls, VaultTlsError, ensure_vault_tls


def cmd_vault_tls(args: argparse.Namespace) -> int:
    tls = VaultTls(args.dir, args.ca_dir or args.dir)
    try:
        made = ensure_vault_tls(tls, dns_names=args.dns, ip_addresses=args.ip, owner=args.owner)
    except VaultTlsError as error:
        raise CliError(str(error)) from None
    print(f"made {'; '.join(made)}" if made else f"Vault's TLS material in {args.dir} is current")
    return 0


def register(groups: Groups) -> None:
    """``vault`` on the ``ztbank`` parser."""
    vault = groups.add_parser("vault", help="Vault, the issuer's upstream").add_subparsers(
        dest="vault_command", required=True, parser_class=Parser
    )
    tls = vault.add_parser(
        "tls",
        help="make or renew Vault's TLS CA and server certificate (kept while current)",
    )
    tls.add_argument("--dir", type=Path, required=True, help="where Vault reads its certificate")
    tls.add_argument("--ca-dir", type=Path, help="where the CA's key is kept (default: --dir)")
    tls.add_argument("--dns", action="append", default=[], help="a DNS name of Vault's (repeat)")
    tls.add_argument("--ip", action="append", default=[], help="an IP address of Vault's (repeat)")
    tls.add_argument("--owner", type=int, help="uid that gets the server key (Vault's user)")
    tls.set_defaults(handler=cmd_vault_tls)
