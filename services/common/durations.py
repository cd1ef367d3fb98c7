"""Human durations (``500ms``, ``20s``, ``5m``, ``1h``, ``2d``) as used in settings and the CLI."""

import re
from datetime import timedelta

from services.common.errors import InvalidDurationError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(text: str) -> timedelta:
    """Parse ``text`` into a positive timedelta; a bare number is refused to avoid unit mistakes."""
    match = _PATTERN.match(text)
    if match is None:
        raise InvalidDurationError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 20s, 5m, 1h"
        )
    value = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if value <= timedelta(0):
        raise InvalidDurationError(f"invalid duration {text!r}: must be greater than zero")
    return value


def format_duration(value: timedelta) -> str:
    """Render a timedelta the way ``parse_duration`` reads it back."""
    seconds = value.total_seconds()
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"
