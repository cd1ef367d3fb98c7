"""A child for ManagedProcess tests: says "ready" once its signal handling is set, then sleeps.

SIGTERM ends it, unless ``ZTBANK_TEST_IGNORE_SIGTERM=1``: then only SIGKILL does.
"""

from __future__ import annotations

import os
import signal

READY = "sleeper ready"
IGNORE_SIGTERM_ENV = "ZTBANK_TEST_IGNORE_SIGTERM"


def main() -> None:
    if os.environ.get(IGNORE_SIGTERM_ENV) == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(READY, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
