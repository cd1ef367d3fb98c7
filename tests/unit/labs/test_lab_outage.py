"""What the outage lab counts as failing closed: a 503 problem+json or a TLS/revocation refusal,
never a 500 or a gateway that does not answer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.labs.errors import FailedClosedError, LabError
from services.labs.outage import Observation, _observe
from services.labs.teller import Reply
from services.stack.native import StackSettings
from services.stack.sandbox import free_port

PROBLEM = {"content-type": "application/problem+json"}


class Answers:
    """A teller client whose one request answers ``outcome`` (a Reply, or raises it)."""

    def __init__(self, outcome: Reply | LabError) -> None:
        self._outcome = outcome

    def request(self, *_: Any, **__: Any) -> Reply:
        if isinstance(self._outcome, LabError):
            raise self._outcome
        return self._outcome


@pytest.fixture
def settings(tmp_path: Path) -> StackSettings:
    registry = tmp_path / "registry.json"
    gateway = {"host": "127.0.0.1", "port": free_port(), "metrics_port": free_port()}
    registry.write_text(json.dumps({"services": {"gateway": gateway}}))
    return StackSettings(home=tmp_path / "var", registry=registry)


@pytest.mark.parametrize(
    ("outcome", "served", "closed", "why"),
    [
        (Reply(200, {}, []), True, False, "HTTP 200"),
        (
            Reply(503, PROBLEM, {"detail": "the transfer-engine is unavailable"}),
            False,
            True,
            "HTTP 503: the transfer-engine is unavailable",
        ),
        (FailedClosedError("cannot check the gateway's revocation status: stale"), False, True,
         "cannot check the gateway's revocation status: stale"),
        (Reply(500, {"content-type": "text/plain"}, "Internal Server Error"), False, False,
         "HTTP 500"),
        (Reply(503, {"content-type": "text/plain"}, "busy"), False, False, "HTTP 503"),
        (LabError("cannot reach the gateway at 127.0.0.1:8443: connection refused"), False,
         False, "cannot reach the gateway at 127.0.0.1:8443: connection refused"),
    ],
)  # fmt: skip
def test_only_a_refusal_for_stale_or_missing_data_counts_as_failing_closed(
    settings: StackSettings, outcome: Reply | LabError, served: bool, closed: bool, why: str
) -> None:
    client: Any = Answers(outcome)
    seen = _observe(settings, client, "token")
    assert seen == Observation(served, closed, why, None)
