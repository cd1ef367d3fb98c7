"""Edits of the watched policy take turns: a workload add during the policy lab is not lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from services.labs.support import policy_lock
from services.stack.native import StackSettings


def test_a_second_policy_edit_waits_for_the_first(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path / "var")
    events: list[str] = []

    def second_edit() -> None:
        with policy_lock(settings):
            events.append("second edit")

    with policy_lock(settings):
        events.append("first edit starts")
        other = threading.Thread(target=second_edit)
        other.start()
        time.sleep(0.2)  # the second edit would have run by now without the lock
        events.append("first edit ends")
    other.join(5)
    assert events == ["first edit starts", "first edit ends", "second edit"]
    # Empty, and readable by the other uids sharing the state: flock needs no write access.
    lock = settings.run_dir / "policy.lock"
    assert lock.stat().st_mode & 0o777 == 0o644
    assert lock.stat().st_size == 0
