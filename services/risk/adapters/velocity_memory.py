"""Velocity history in process memory: a sliding window of transfer times per account.

It starts empty on every restart (infra/risk/README.md says so); that is acceptable for a
window of seconds to minutes and keeps the risk service free of state on disk.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from services.risk.domain.rules import MAX_VELOCITY_TRANSFERS

DEFAULT_MAX_ACCOUNTS = 100_000


class InMemoryVelocityHistory:
    """Thread-safe; memory is bounded by ``max_accounts`` x (MAX_VELOCITY_TRANSFERS + 1) times.

    Counts only need to tell "more than velocity_max_transfers" apart, and the rules cap that
    at MAX_VELOCITY_TRANSFERS, so older events beyond MAX_VELOCITY_TRANSFERS + 1 are dropped.
    Past ``max_accounts`` active accounts the least recently active one is forgotten.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_accounts: int = DEFAULT_MAX_ACCOUNTS,
    ) -> None:
        self._clock = clock
        self._max_accounts = max_accounts
        # Ordered by last activity (oldest first), so expired accounts are found at the front.
        self._events: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, account: str, window_seconds: float) -> int:
        with self._lock:
            # Read under the lock so that times are appended in order.
            now = self._clock()
            horizon = now - window_seconds
            events = self._events.get(account)
            if events is None:
                events = self._events[account] = deque(maxlen=MAX_VELOCITY_TRANSFERS + 1)
            else:
                self._events.move_to_end(account)
            events.append(now)
            while events[0] <= horizon:
                events.popleft()
            self._forget_idle(horizon)
            return len(events)

    def tracked_accounts(self) -> int:
        with self._lock:
            return len(self._events)

    def _forget_idle(self, horizon: float) -> None:
        while self._events:
            oldest_account, events = next(iter(self._events.items()))
            if events[-1] > horizon and len(self._events) <= self._max_accounts:
                return
            del self._events[oldest_account]
