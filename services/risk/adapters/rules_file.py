"""Rules from a JSON file, picked up without a restart when the file changes."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.risk.domain.rules import Rules, parse_rules
from services.risk.errors import RulesError

logger = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL = 1.0

# (mtime, size): size as well because a writer that is not atomic can leave a truncated file
# and finish within the same mtime tick; without it the finished file would never be read.
_Stamp = tuple[int, int]


class RulesFile:
    """The rules in ``path``, re-read when its mtime changes (checked at most once per
    ``check_interval`` seconds, so a busy service does not stat on every request).

    A file that cannot be read or is invalid at startup raises RulesError; later, the last
    good rules stay in force and the problem is logged once per version of the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        self._path = path
        self._clock = clock
        self._check_interval = check_interval
        self._lock = threading.Lock()
        try:
            self._stamp: _Stamp | None = self._read_stamp()
            self._rules = self._load()
        except RulesError as error:
            raise RulesError(
                f"{error}; the risk service cannot start without valid rules (ZTBANK_RISK_RULES)"
            ) from None
        self._checked_at = clock()

    def current(self) -> Rules:
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= self._check_interval:
                self._checked_at = now
                self._refresh()
            return self._rules

    def _refresh(self) -> None:
        try:
            stamp = self._read_stamp()
        except RulesError as error:
            if self._stamp is not None:
                logger.error("%s; keeping the last good risk rules", error)
            self._stamp = None
            return
        if stamp == self._stamp:
            return
        # Recorded before loading, so a bad version is reported once, not every second.
        self._stamp = stamp
        try:
            self._rules = self._load()
        except RulesError as error:
            logger.error("%s; keeping the last good risk rules", error)
            return
        logger.info("reloaded risk rules from %s", self._path)

    def _read_stamp(self) -> _Stamp:
        try:
            status = os.stat(self._path)
        except OSError as error:
            raise self._unreadable(error) from None
        return status.st_mtime_ns, status.st_size

    def _load(self) -> Rules:
        try:
            data = self._path.read_bytes()
        except OSError as error:
            raise self._unreadable(error) from None
        return parse_rules(data, source=str(self._path))

    def _unreadable(self, error: OSError) -> RulesError:
        return RulesError(f"cannot read risk rules file {self._path}: {error.strerror}")
