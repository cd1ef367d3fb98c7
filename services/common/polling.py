"""Waiting for something to become true, by polling: the one loop the labs, the CLI and the
stack tools share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    check: Callable[[], T | None], *, timeout: float, interval: float = 0.05
) -> T | None:
    """Call ``check`` until it returns something truthy (returned), or ``timeout`` seconds have
    passed (None); it is called at least once."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)
