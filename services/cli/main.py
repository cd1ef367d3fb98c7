"""``ztbank``: the operator's and trainee's command line.

Each command group lives in its own module under services/cli/commands/, with its sub-parsers
and handlers; this module only builds the parser from them, runs the handler the arguments
chose, and turns an error into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services.cli.commands import bank, env, identity, lab, stack, vault, workload
from services.cli.commands.common import Handler, Parser
from services.cli.errors import CliError
from services.common.errors import CommonError
from services.issuer.admin_client import AdminCallError
from services.issuer.errors import IssuerError
from services.labs.errors import LabError, LabUsageError

# In the order ``ztbank --help`` lists them.
GROUPS = (identity, stack, lab, bank, workload, env, vault)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ztbank", description="ztbank operator and lab CLI")
    parser.add_argument("--trust-domain", help="override ZTBANK_TRUST_DOMAIN")
    groups = parser.add_subparsers(dest="group", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(groups)
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
