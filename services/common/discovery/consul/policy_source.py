"""The authorization policy of the compose stack, from a Consul KV key watched with blocking
queries, so that a change published there reaches every service within one query.

Staleness: the watcher keeps the last policy Consul confirmed.  While Consul cannot be reached
(or answers with an error) that policy keeps deciding until ``max_staleness`` seconds have passed
since Consul last answered, then every request is denied until Consul answers again (fail
closed).  A key that Consul says is absent, or a document that does not parse, denies everything at
once, like a deleted or broken policy file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Self

from services.common.authz.policy import PolicyError
from services.common.discovery.consul.client import ConsulClient, ConsulError
from services.common.runtime.worker import Worker

logger = logging.getLogger(__name__)

DEFAULT_POLICY_KEY = "ztbank/policy"
DEFAULT_WATCH_WAIT = 20.0
DEFAULT_MAX_STALENESS = 60.0


def check_watch_timing(wait: float, max_staleness: float) -> None:
    """Raises ``ValueError`` unless ``max_staleness`` leaves room for a quiet blocking query."""
    # A healthy Consul confirms the policy at least every wait * (1 + 1/16): staleness must
    # leave room for that, or a quiet but healthy watch would fail closed.
    if max_staleness < 2 * wait:
        raise ValueError(
            f"policy max staleness {max_staleness:g}s must be at least twice the blocking "
            f"query wait {wait:g}s"
        )


class ConsulPolicySource(Worker):
    """``PolicySource`` over a Consul KV key, kept current by a worker of blocking queries.

    ``stamp()`` and ``read()`` never touch the network: they answer from what the watcher last
    heard, and raise ``PolicyError`` (deny everything) when there is no policy or Consul has not
    confirmed it for more than ``max_staleness`` seconds.  After a failed query the next waits
    ``retry`` seconds, doubling up to a quarter of ``max_staleness`` (at most 15 s); after an
    answer, ``min_interval``.
    """

    def __init__(
        self,
        client: ConsulClient,
        key: str = DEFAULT_POLICY_KEY,
        *,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        wait: float = DEFAULT_WATCH_WAIT,
        retry: float = 1.0,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_watch_timing(wait, max_staleness)
        # close() does not wait out a blocking query in flight: it ends on its own (a daemon).
        super().__init__("consul-policy", join_timeout=1.0)
        self._client = client
        self.key = key
        self.max_staleness = max_staleness
        self.wait = wait
        self._retry = retry
        self._max_retry = max(retry, min(15.0, max_staleness / 4))
        self._min_interval = min_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._text: str | None = None
        self._modify_index: int | None = None
        self._confirmed_at: float | None = None
        self._error: str | None = "not fetched from Consul yet"
        self._backoff = retry
        self._next_wait = min_interval

    def describe(self) -> str:
        return f"Consul KV {self.key} at {self._client.base_url}"

    # -- PolicySource ------------------------------------------------------------------------

    def stamp(self) -> object:
        with self._lock:
            self._usable()
            return self._modify_index

    def read(self) -> str:
        with self._lock:
            return self._usable()

    def _usable(self) -> str:
        if self._text is None or self._confirmed_at is None:
            raise PolicyError(self._error or f"no policy at {self.describe()}")
        age = self._clock() - self._confirmed_at
        if age > self.max_staleness:
            raise PolicyError(
                f"policy from {self.describe()} is stale: last confirmed {age:.0f}s ago, "
                f"more than the {self.max_staleness:g}s allowed ({self._error})"
            )
        return self._text

    # -- watching ----------------------------------------------------------------------------

    @property
    def index(self) -> int:
        return self._index

    @property
    def last_error(self) -> str | None:
        return self._error

    def poll(self, *, block: bool = True) -> bool:
        """One (blocking, once an index is known) query; records the outcome, never raises."""
        index = self._index if block else 0
        try:
            entry = self._client.kv_get(self.key, index=index, wait=self.wait)
        except ConsulError as error:
            with self._lock:
                if self._error != str(error):
                    logger.error("policy watch of %s failed: %s", self.describe(), error)
                self._error = str(error)
            return False
        with self._lock:
            # Consul's rules for blocking indexes: reset when it goes backwards, never below 1.
            self._index = 0 if entry.index < self._index else max(entry.index, 1)
            self._confirmed_at = self._clock()
            if entry.value is None:
                if self._text is not None or self._error is None:
                    logger.error("no policy at %s: denying everything", self.describe())
                self._text, self._modify_index = None, None
                self._error = f"no policy at {self.describe()}"
            else:
                if entry.modify_index != self._modify_index:
                    logger.info("policy %s at index %s", self.describe(), entry.modify_index)
                self._text, self._modify_index, self._error = (
                    entry.value,
                    entry.modify_index,
                    None,
                )
        return True

    def start(self) -> Self:
        """Fetch once now (without blocking), then watch in the worker's thread."""
        self.poll(block=False)
        return super().start()

    def run_once(self) -> None:
        if self.poll():
            self._backoff = self._retry
            self._next_wait = self._min_interval
        else:
            self._next_wait = self._backoff
            self._backoff = min(self._backoff * 2, self._max_retry)

    def interval(self) -> float:
        return self._next_wait
