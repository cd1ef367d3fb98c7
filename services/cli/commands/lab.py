"""``ztbank lab [NAME]``: the training labs against the running stack, one sub-command each,
built from services/labs/registry.py (the one list of them, which the console offers too), so a
new lab needs no change here.  One lab at a time: each holds the stack's lab lock
(services/labs/support.py ``LabLock``), which the console takes too.  Beside them ``ztbank lab
all`` runs every lab of the list in turn under one lab lock (``make lab-all``), and ``ztbank lab
class`` restarts the native stack with the class profile (``make class``)."""

from __future__ import annotations

import argparse
import logging
import os

from services.cli.commands.common import Groups, Handler, Parser, stack_settings
from services.labs.class_profile import start_class_stack
from services.labs.registry import ALL, CLASS, LABS, Lab
from services.labs.run_all import run_all
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


def cmd_lab_all(args: argparse.Namespace) -> int:
    """``ztbank lab all``: every lab of the registry in turn, in its order, on the running
    stack, under one lab lock for the whole run (the lock file names the lab running now), then
    a summary table; exit 0 when every lab passed and the stack is as the run found it, 1 when
    not, 2 (one line) when the run cannot start, 130 when interrupted."""
    settings = stack_settings(args)
    with _lab_lock(settings, ALL) as lock:
        logging.basicConfig(level=logging.ERROR)  # as for one lab: the narration says it all

        def starting(lab: Lab) -> None:
            lock.record(f"{ALL} ({lab.name})", "cli")

        return run_all(settings, lambda line: print(line, flush=True), LABS, starting=starting)


def cmd_lab_class(args: argparse.Namespace) -> int:
    """``ztbank lab class``: the native stack restarted with the class profile, which it says;
    exit 0 when the issuer then issues SVIDs of the profile's TTL."""
    return 0 if start_class_stack(stack_settings(args), print) else 1


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
    print(f"`ztbank lab {ALL}` (`make lab-all`) runs them all in turn; `ztbank lab {CLASS}`")
    print("(`make class`) restarts the stack with lifetimes under which each takes seconds")
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
    labs.add_parser(
        ALL,
        help="run every lab in turn on the running stack, under one lab lock, then a summary"
        " table (exit 0: all passed)",
    ).set_defaults(handler=cmd_lab_all)
    class_parser = labs.add_parser(
        CLASS,
        help="restart the native stack with the class profile (20 s SVIDs ...): every lab runs"
        " in seconds; balances are kept",
    )
    class_parser.add_argument(
        "--upstream",
        choices=("disk", "vault"),
        help="the stack's upstream (default: the one it was set up with)",
    )
    class_parser.set_defaults(handler=cmd_lab_class)
