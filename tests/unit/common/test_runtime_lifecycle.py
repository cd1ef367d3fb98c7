"""``create_runtime`` closes what it made if it cannot finish, and ``ServiceRuntime.close``
closes everything newest first, every resource even if one fails, and only once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from services.common.discovery.registry import ServiceAddress, write_registry
from services.common.identity.workloads import TRANSFER_ENGINE
from services.common.runtime import service as runtime_module
from services.common.runtime.service import ServiceSettings, create_runtime

TD = "ztbank.example"
# Newest first: the reverse of the order create_runtime makes them in. The audit log is made
# first, so it closes last: what stops before it may still record a decision.
CLOSING_ORDER = ["telemetry", "revocation", "source", "audit"]


@dataclass
class Resources:
    """Which stand-in resources were closed, in order, and which fail when they are."""

    closed: list[str] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)

    def close(self, name: str) -> None:
        self.closed.append(name)
        if name in self.failing:
            raise OSError(f"{name} cannot close")


@pytest.fixture
def resources(monkeypatch: pytest.MonkeyPatch) -> Resources:
    """The runtime's identity source, CRL watcher, audit log and telemetry, stubbed."""
    made = Resources()

    class Source:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def current(self) -> Any:
            raise AssertionError("not used here")

        def close(self) -> None:
            made.close("source")

    class Revocation:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def start(self) -> None:
            pass

        def wait_ready(self, _timeout: float) -> None:
            pass

        def problem(self) -> str | None:
            return None

        def close(self) -> None:
            made.close("revocation")

    class Audit:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        def problem(self) -> str | None:
            return None

        def close(self) -> None:
            made.close("audit")

    class Telemetry:
        meter: Any = None

        def shutdown(self) -> None:
            made.close("telemetry")

    monkeypatch.setattr(runtime_module, "SvidSource", Source)
    monkeypatch.setattr(runtime_module, "RevocationWatcher", Revocation)
    monkeypatch.setattr(runtime_module, "AuditLog", Audit)
    monkeypatch.setattr(runtime_module, "setup_telemetry", lambda *_, **__: Telemetry())
    return made


@pytest.fixture
def settings(tmp_path: Path, settings_environment: None) -> ServiceSettings:
    registry = tmp_path / "registry.json"
    write_registry(registry, [ServiceAddress("risk", "127.0.0.1", 50052)])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"rules": []}))
    return ServiceSettings(
        home=tmp_path / "home", trust_domain=TD, registry=registry, policy=policy
    )


def test_close_closes_newest_first_and_only_once(
    resources: Resources, settings: ServiceSettings
) -> None:
    runtime = create_runtime("risk", settings)
    assert resources.closed == []
    runtime.close()
    assert resources.closed == CLOSING_ORDER
    runtime.close()
    assert resources.closed == CLOSING_ORDER


def test_a_breakers_peer_watch_stops_first(
    resources: Resources, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Breaker:
        def problem(self) -> str | None:
            return None

        def close(self) -> None:
            resources.close("breaker")

    monkeypatch.setattr(runtime_module, "watched_breaker", lambda *_, **__: Breaker())
    runtime = create_runtime("risk", settings)
    unused: Any = None
    runtime.breaker_to(TRANSFER_ENGINE, unused, unused, unused)
    runtime.close()
    assert resources.closed == ["breaker", *CLOSING_ORDER]


def test_a_resource_that_fails_to_close_does_not_keep_the_others_open(
    resources: Resources, settings: ServiceSettings
) -> None:
    resources.failing.add("audit")
    runtime = create_runtime("risk", settings)
    with pytest.raises(OSError, match="audit cannot close"):
        runtime.close()
    assert resources.closed == CLOSING_ORDER
    runtime.close()  # nothing is closed twice
    assert resources.closed == CLOSING_ORDER


def test_a_runtime_that_cannot_be_finished_closes_what_it_made(
    resources: Resources, settings: ServiceSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_metrics_port(*_: Any, **__: Any) -> None:
        raise OSError("address already in use")

    monkeypatch.setattr(runtime_module, "setup_telemetry", no_metrics_port)
    with pytest.raises(OSError, match="address already in use"):
        create_runtime("risk", settings)
    assert resources.closed == CLOSING_ORDER[1:]
