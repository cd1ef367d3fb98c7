"""The one way a background thread lives in ztbank: started once, woken early on demand, closed
and joined.

Every service keeps a few of these beside its event loop (the CRL watcher, the peer watch of a
circuit breaker, the Consul policy watcher, a channel's discovery watcher).  Each is a
``Worker``: it says what one round does (``run_once``) and how long to wait before
the next (``interval``); the base owns the thread, the wake-up and the stop.  ``close`` is
idempotent, may be called from the worker's own thread, and joins the thread within
``join_timeout`` otherwise; a round that raises is logged and the worker goes on (a watcher
that dies would leave its service deciding on stale data).  The audit writer is not one: its
close must drain and sync every accepted record (``services.common.authz.audit`` says why).
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Self

logger = logging.getLogger(__name__)


class Worker(ABC):
    """A daemon thread that runs ``run_once`` every ``interval()`` seconds until closed."""

    def __init__(self, name: str, *, join_timeout: float = 5.0, wait_first: bool = False) -> None:
        """``wait_first``: the first round comes one interval after ``start`` rather than at
        once, for an owner that did the first round's work itself before starting the worker."""
        self.name = name
        self._join_timeout = join_timeout
        self._wait_first = wait_first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @abstractmethod
    def run_once(self) -> None:
        """One round of the work (a poll, a look, a flush)."""

    @abstractmethod
    def interval(self) -> float:
        """Seconds to wait after a round before the next (unless woken or closed)."""

    def start(self) -> Self:
        """Start the thread (once; later calls do nothing)."""
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
        return self

    def wake(self) -> None:
        """Run the next round now instead of after the interval."""
        self._wake.set()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop after the current round and join the thread (not from the thread itself)."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._join_timeout)

    def _loop(self) -> None:
        if self._wait_first:
            self._rest()
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                logger.exception("%s: a round failed; the next one runs as planned", self.name)
            self._rest()

    def _rest(self) -> None:
        """Wait out the interval, unless woken or closed."""
        if not self._stop.is_set():
            self._wake.wait(max(self.interval(), 0.0))
            self._wake.clear()
