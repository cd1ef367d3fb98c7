"""``ztbank login|accounts|transfer``: banking through the gateway as the teller channel
(services/labs/teller.py), for a customer; a refusal is one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import json

from services.cli.commands.common import Groups, stack_settings
from services.labs.teller import Reply, TellerClient, refusal


def _print_reply(reply: Reply) -> None:
    print(json.dumps(reply.body, indent=2))


def cmd_login(args: argparse.Namespace) -> int:
    print(TellerClient(stack_settings(args)).token(args.customer))
    return 0


def cmd_accounts(args: argparse.Namespace) -> int:
    reply = TellerClient(stack_settings(args)).as_customer(args.customer, "GET", "/v1/accounts")
    if reply.status != 200:
        raise refusal(reply)
    _print_reply(reply)
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    reply = TellerClient(stack_settings(args)).transfer(
        args.customer, args.source, args.target, args.amount, args.currency
    )
    if reply.status not in (201, 202):
        raise refusal(reply)
    _print_reply(reply)
    return 0


def register(groups: Groups) -> None:
    """``login``, ``accounts`` and ``transfer`` on the ``ztbank`` parser."""
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
