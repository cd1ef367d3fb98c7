"""Helpers every suite shares: polling with a deadline, one-line stderr, a clean environment."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

import pytest

from services.common.polling import poll_until

POLL_INTERVAL = 0.05
# Variables of the developer's shell that would reconfigure a ztbank process.  Settings read the
# environment case-insensitively, so names are compared in upper case.
LEAKY_PREFIXES = ("ZTBANK_", "SPIFFE_", "VAULT_", "OTEL_", "CONSUL_")

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    message: str | Callable[[], str],
    interval: float = POLL_INTERVAL,
) -> T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` passes
    (an AssertionError with ``message``): the product's ``poll_until``, failing a test."""
    result = poll_until(predicate, timeout=timeout, interval=interval)
    if not result:
        raise AssertionError(message() if callable(message) else message)
    return result


def one_line(stderr: str) -> str:
    """The single line of ``stderr``; fail (showing it) if it has more, none, or a traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    return lines[0]


def _leaky(name: str) -> bool:
    return name.upper().startswith(LEAKY_PREFIXES)


def clean_environment() -> dict[str, str]:
    """A copy of this process's environment without any variable that configures ztbank."""
    return {name: value for name, value in os.environ.items() if not _leaky(name)}


def scrub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove those variables from this process's environment (and so its children's) until
    ``monkeypatch`` is undone."""
    for name in list(os.environ):
        if _leaky(name):
            monkeypatch.delenv(name)


# What `make` itself adds to stderr around a command: the stack-mode line the Makefile prints
# and make's error line, at any nesting depth (`make[1]: ***` when make runs make, as in CI).
_MAKE_OWN = re.compile(r"native stack \(MODE=|make(\[\d+\])?: \*\*\* ")


def without_make_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that the command under ``make`` wrote."""
    return [line for line in stderr.splitlines() if not _MAKE_OWN.match(line)]
