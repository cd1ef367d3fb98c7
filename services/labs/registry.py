"""The one list of labs: what each is called, says of itself in a line, runs, and takes as
options.  ``ztbank lab`` builds its sub-commands and its list from it, the console its lab
buttons, and ``make lab-NAME`` runs ``ztbank lab NAME``: a lab added here is offered everywhere,
and ``ztbank lab all`` (``make lab-all``) runs it with the others, in this order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from services.labs.breaker import run_breaker_lab
from services.labs.expiry import run_expiry_lab
from services.labs.misissued import run_misissued_lab
from services.labs.outage import run_outage_lab
from services.labs.policy import run_policy_lab
from services.labs.revocation import DEFAULT_BUDGET_SECONDS, check_budget, run_revocation_lab
from services.labs.rotation import (
    DEFAULT_ROTATIONS,
    MAX_ROTATIONS,
    check_rotations,
    run_rotation_lab,
)
from services.labs.upstream import run_upstream_lab

T = TypeVar("T", int, float)


@dataclass(frozen=True)
class LabOption(Generic[T]):
    """``--NAME VALUE`` on the lab's command line; its run gets the value as keyword ``NAME``."""

    name: str
    parse: Callable[[str], T]  # int or float: argparse names it in "invalid int value"
    default: T
    help: str
    check: Callable[[T], None]  # raises LabUsageError for a value the lab cannot run with

    @property
    def flag(self) -> str:
        return f"--{self.name}"


@dataclass(frozen=True)
class Lab:
    name: str  # ``ztbank lab NAME``, ``make lab-NAME``
    summary: str  # one line: its help, its line in ``ztbank lab`` and in the console
    # run(settings, say, **options) narrates through ``say``; True when the lab passed.
    run: Callable[..., bool]
    options: tuple[LabOption[Any], ...] = ()


LABS: tuple[Lab, ...] = (
    Lab(
        "revocation",
        "revoke a connected client and watch it being cut off",
        run_revocation_lab,
        (
            LabOption(
                "budget",
                float,
                DEFAULT_BUDGET_SECONDS,
                f"seconds the cut-off may take (default {DEFAULT_BUDGET_SECONDS:g})",
                check_budget,
            ),
        ),
    ),
    Lab(
        "mis-issued",
        "present certificates a correct CA never issues to the gateway",
        run_misissued_lab,
    ),
    Lab(
        "rotation",
        "watch every service renew its SVID while requests keep flowing",
        run_rotation_lab,
        (
            LabOption(
                "rotations",
                int,
                DEFAULT_ROTATIONS,
                f"rotations to wait for per service (1-{MAX_ROTATIONS})",
                check_rotations,
            ),
        ),
    ),
    Lab(
        "outage",
        "stop the issuer: watch the bank serve, fail closed, and recover",
        run_outage_lab,
    ),
    Lab(
        "policy",
        "deny a route by a live policy edit: refused, audited, then restored",
        run_policy_lab,
    ),
    Lab(
        "expiry",
        "a client SVID runs out: refused at expiry, served again with a new one",
        run_expiry_lab,
    ),
    Lab(
        "upstream",
        "the upstream (Vault, or the disk root) fails as the issuer renews its CA: the bank"
        " serves on, the cause is named, the issuer recovers",
        run_upstream_lab,
    ),
    Lab(
        "breaker",
        "make the engine's namespace low-trust: the gateway's breaker opens, answers at once,"
        " and closes again",
        run_breaker_lab,
    ),
)

# ``ztbank lab`` sub-commands beside the labs, which no lab may be named: ``all`` runs every lab
# above in turn (``make lab-all``, services/labs/run_all.py), ``class`` restarts the stack with
# lifetimes under which each runs in seconds (``make class``, services/labs/class_profile.py).
ALL = "all"
CLASS = "class"
