"""``ztbank lab [NAME]``: the training labs against the running stack, one sub-command each,
built from services/labs/registry.py (the one list of them, which the console offers too), so a
new lab needs no change here."""

from __future__ import annotations

import argparse
import logging

from services.cli.commands.common import Groups, Handler, Parser, stack_settings
from services.labs.registry import LABS, Lab


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
        return 0 if lab.run(stack_settings(args), print, **options) else 1

    return cmd_lab


def cmd_lab_list(args: argparse.Namespace) -> int:
    """``ztbank lab`` without a name: every lab, one line each."""
    width = max(len(lab.name) for lab in LABS)
    print("labs against the running native stack (`make up`); run one with")
    print("`ztbank lab NAME` or `make lab-NAME`:")
    for lab in LABS:
        print(f"  {lab.name:<{width}}  {lab.summary}")
    return 0


def register(groups: Groups) -> None:
    """``lab`` on the ``ztbank`` parser, with a sub-command and its options per lab."""
    lab_parser = groups.add_parser("lab", help="training labs against the running stack (a list)")
    lab_parser.set_defaults(handler=cmd_lab_list)
    labs = lab_parser.add_subparsers(dest="lab", parser_class=Parser, metavar="NAME")
    for lab in LABS:
        parser = labs.add_parser(lab.name, help=lab.summary)
        for option in lab.options:
            parser.add_argument(
                option.flag, type=option.parse, default=option.default, help=option.help
            )
        parser.set_defaults(handler=lab_handler(lab))
