"""What every command group shares: the parser class, the handler type and the settings a
handler starts from."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn, TypeAlias

from services.common.settings import ZtbankSettings
from services.stack.native import StackSettings, locate_settings

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """Bad usage is one line on stderr and exit 2, never a wall of text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# What each group's ``register`` adds its commands to: the ``ztbank`` parser's sub-parsers.
Groups: TypeAlias = "argparse._SubParsersAction[Parser]"


def base_settings(args: argparse.Namespace) -> ZtbankSettings:
    overrides = {k: v for k, v in (("trust_domain", getattr(args, "trust_domain", None)),) if v}
    return locate_settings(ZtbankSettings, **overrides)


def stack_settings(args: argparse.Namespace) -> StackSettings:
    overrides: dict[str, Any] = {"trust_domain": args.trust_domain} if args.trust_domain else {}
    if upstream := getattr(args, "upstream", None):
        overrides["upstream"] = upstream
    return locate_settings(StackSettings, **overrides)


def with_stack_settings(handler: Callable[[argparse.Namespace, StackSettings], int]) -> Handler:
    """A handler that is given the stack's settings (found from ``args``) besides ``args``."""

    def run(args: argparse.Namespace) -> int:
        return handler(args, stack_settings(args))

    return run
