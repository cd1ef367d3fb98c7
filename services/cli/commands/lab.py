"""``ztbank lab [NAME]``: the training labs against the running stack, one sub-command each,
built from services/labs/registry.py (the one list of them, which the console offers too), so a
new lab needs no change here.  One lab at a time: each holds the stack's lab lock
(services/labs/support.py ``LabLock``), which the console takes too."""

from __future__ import annotations

import argparse
import logging
import os

from services.cli.commands.common import Groups, Handler, Parser, stack_settings
from services.labs.registry import LABS, Lab
from services.labs.support import LAB_LOCK_FD, LabLock, check_stack_running
from services.stack.native import StackSettings


def lab_handler(lab: Lab) -> Handler:
    """``ztbank lab NAME``: its options checked, the stack's one lab lock taken (a lab already
    running refuses this one at once), the stack checked to be running, then the lab
    narrating on stdout; exit 0 when it passed, 1 when it failed, 2 (one line on stderr,
    nothing changed) when it cannot start.  ``--check``: whether it could start now, but for
    the stack (``make lab-NAME`` asks before its ``make up``)."""

    def cmd_lab(args: argparse.Namespace) -> int:
        options = {option.name: getattr(args, option.name) for option in lab.options}
        for option in lab.options:
            option.check(options[option.name])
        settings = stack_settings(args)
        if args.check:
            if settings.stack_kind == "compose" or settings.run_dir.is_dir():
                LabLock.take(settings, lab.name, "cli").release()
            return 0
        with _lab_lock(settings, lab.name):
            check_stack_running(settings)
            # The lab narrates what happens; the libraries' own warnings (a revoked serial seen
            # in the CRLs) would only repeat it.
            logging.basicConfig(level=logging.ERROR)
            return 0 if lab.run(settings, print, **options) else 1

    return cmd_lab


def _lab_lock(settings: StackSettings, lab: str) -> LabLock:
    """The lab lock for ``lab``: the one the console handed over (LAB_LOCK_FD) to the lab it
    started, else taken here.  A native home without a run directory had no stack yet: refused
    as a stopped stack, before anything is created there."""
    if handed := os.environ.pop(LAB_LOCK_FD, None):
        return LabLock.handed_over(settings, handed, lab)
    if settings.stack_kind == "native" and not settings.run_dir.is_dir():
        check_stack_running(settings)
    return LabLock.take(settings, lab, "cli")


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
        parser.add_argument(
            "--check",
            action="store_true",
            help="only check that the lab could start now (no other lab running) and exit",
        )
        parser.set_defaults(handler=lab_handler(lab))
