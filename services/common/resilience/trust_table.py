"""The trust a breaker gives each peer: a table of SPIFFE ID path prefixes to a trust from 0 to
1 (``infra/trust-levels.json``), hot-reloaded like the policy but never denying on a bad edit.

It is its own module because the table is data an operator edits while the services run: its
format, its validation and its reload rules change for reasons of their own, apart from how a
breaker decides.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.authz.policy import (
    FilePolicySource,
    PolicySource,
    ReloadThrottle,
)
from services.common.errors import CommonError
from services.common.identity.spiffe_id import SpiffeId

logger = logging.getLogger(__name__)


class TrustTableError(CommonError):
    """The trust-level table is malformed."""


@dataclass(frozen=True)
class TrustLevels:
    """One loaded table.  ``generation`` changes with every table applied."""

    default: float
    # (path prefix segments, trust), longest prefix first.
    prefixes: tuple[tuple[tuple[str, ...], float], ...]
    generation: int

    def trust(self, spiffe_id: SpiffeId) -> float:
        segments = tuple(spiffe_id.path.strip("/").split("/"))
        for prefix, trust in self.prefixes:
            if segments[: len(prefix)] == prefix:
                return trust
        return self.default


def _level(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise TrustTableError(
            f"invalid trust table: {where} must be a number from 0 to 1, got {value!r}"
        )
    return float(value)


def parse_trust_levels(text: str, *, generation: int) -> TrustLevels:
    """``{"default": 0.5, "levels": {"env/prod": 0.95, ...}}``: path prefixes of SPIFFE IDs
    (whole segments, without the trust domain) to a trust from 0 to 1."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise TrustTableError(f"invalid trust table: not JSON: {error}") from None
    if not isinstance(document, dict) or set(document) != {"default", "levels"}:
        raise TrustTableError('invalid trust table: expected {"default": ..., "levels": {...}}')
    levels = document["levels"]
    if not isinstance(levels, dict):
        raise TrustTableError("invalid trust table: levels must be an object")
    prefixes = []
    for prefix, value in levels.items():
        segments = tuple(prefix.split("/"))
        if not prefix or not all(segments) or prefix.startswith("spiffe:"):
            raise TrustTableError(
                f"invalid trust table: {prefix!r} is not a SPIFFE ID path prefix like env/prod"
            )
        prefixes.append((segments, _level(value, f"trust of {prefix!r}")))
    prefixes.sort(key=lambda item: len(item[0]), reverse=True)
    return TrustLevels(_level(document["default"], "default trust"), tuple(prefixes), generation)


class TrustTable:
    """The trust levels from a ``PolicySource`` (the policy's stamp-and-read file source),
    re-checked at most every ``RELOAD_CHECK_SECONDS`` like the policy.

    Unlike the policy, a bad edit does not deny anything: a malformed table is refused with
    one log line and the previous one stays.  A missing table gives every peer
    ``trust_without_table``.  At start a malformed table raises ``TrustTableError``.
    """

    def __init__(
        self,
        source: Path | PolicySource,
        *,
        trust_without_table: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = FilePolicySource(source) if isinstance(source, Path) else source
        self._without = trust_without_table
        self._throttle = ReloadThrottle(clock, checked=clock())
        self._stamp: object = None
        self._refused: str | None = None
        self._levels = self._missing(0)
        error = self._reload()
        if error is not None:
            raise TrustTableError(f"{self._source.describe()}: {error}")

    def _missing(self, generation: int) -> TrustLevels:
        return TrustLevels(self._without, (), generation)

    def _reload(self) -> str | None:
        """Applies a changed table; returns why a changed one was refused."""
        try:
            stamp = self._source.stamp()
        except FileNotFoundError:
            if self._stamp is not None or self._levels.generation == 0:
                logger.warning(
                    "trust table %s missing: every peer has trust %.2f",
                    self._source.describe(),
                    self._without,
                )
                self._levels = self._missing(self._levels.generation + 1)
                self._stamp = None
            return None
        except OSError as error:
            return f"unreadable: {error}"
        if stamp == self._stamp:
            return None
        # Refused or not, this version is judged once: the next edit changes the stamp.
        self._stamp = stamp
        try:
            levels = parse_trust_levels(self._source.read(), generation=self._levels.generation + 1)
        except (OSError, TrustTableError) as error:
            return str(error)
        self._levels = levels
        logger.info(
            "trust table loaded from %s: %d prefixes, default %.2f",
            self._source.describe(),
            len(levels.prefixes),
            levels.default,
        )
        return None

    def current(self) -> TrustLevels:
        self._throttle.run_if_due(self._look)
        return self._levels

    def _look(self) -> None:
        error = self._reload()
        if error is not None and error != self._refused:
            logger.error(
                "trust table %s refused, keeping the previous one: %s",
                self._source.describe(),
                error,
            )
        self._refused = error
