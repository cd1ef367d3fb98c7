"""The class profile (`make class`, issue 21 item 1) without a stack: lifetimes the issuer accepts,
each said with its reason, and the refusals that change nothing (beside the compose stack,
another upstream than the stack's, a lab running)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.settings import load_settings
from services.issuer.settings import IssuerSettings
from services.labs.class_profile import (
    CLASS_PROFILE,
    CLASS_SVID_TTL,
    describe_profile,
    profile_settings,
    start_class_stack,
)
from services.labs.errors import LabUsageError
from services.labs.support import LabLock, LabRunningError
from services.stack.native import RECORDED_DURATIONS, NativeStack, StackSettings


def test_the_issuer_accepts_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in CLASS_PROFILE:
        monkeypatch.setenv(setting.variable, setting.value)
    issuer = load_settings(IssuerSettings)
    assert issuer.svid_ttl == CLASS_SVID_TTL
    assert issuer.crl_validity <= issuer.svid_ttl
    assert issuer.ca_ttl >= 6 * issuer.svid_ttl


def test_the_profile_sets_every_recorded_lifetime() -> None:
    """Each lifetime `make up` records is the profile's: none is left to the running stack."""
    assert {s.variable for s in CLASS_PROFILE} == {v for _, v, _ in RECORDED_DURATIONS}
    settings = profile_settings(StackSettings())
    assert {s.field: getattr(settings, s.field) for s in CLASS_PROFILE} == {
        s.field: s.value for s in CLASS_PROFILE
    }


def test_each_value_is_said_with_its_reason() -> None:
    said: list[str] = []
    describe_profile(said.append)
    for setting in CLASS_PROFILE:
        [line] = [line for line in said if f"{setting.variable}={setting.value}" in line]
        assert line.endswith(setting.why[0])
    assert len(said) == sum(len(s.why) for s in CLASS_PROFILE)


@pytest.fixture
def stopped(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records whether the stack was stopped (it must not be, when refused)."""
    calls: list[str] = []

    def down(stack: NativeStack) -> list[str]:
        calls.append("down")
        return []

    monkeypatch.setattr(NativeStack, "down", down)
    return calls


def test_refused_while_a_lab_runs_and_nothing_is_stopped(
    tmp_path: Path, stopped: list[str]
) -> None:
    settings = StackSettings(home=tmp_path / "var", certs_dir=tmp_path / "certs")
    said: list[str] = []
    with (
        LabLock.take(settings, "outage", "cli"),
        pytest.raises(LabRunningError, match="lab 'outage' is running"),
    ):
        start_class_stack(settings, said.append)
    assert stopped == []
    assert said == []


def test_refused_beside_the_compose_stack(tmp_path: Path, stopped: list[str]) -> None:
    settings = StackSettings(home=tmp_path / "var", stack_kind="compose")
    with pytest.raises(LabUsageError, match="make class restarts the native stack"):
        start_class_stack(settings, print)
    assert stopped == []


def test_another_upstream_than_the_stacks_is_refused(tmp_path: Path, stopped: list[str]) -> None:
    home = tmp_path / "var"
    home.mkdir()
    (home / "upstream.json").write_text('{"upstream": "disk"}\n')
    settings = StackSettings(home=home, certs_dir=tmp_path / "certs", upstream="vault")
    with pytest.raises(LabUsageError, match=r"set up with the disk upstream.*make reset"):
        start_class_stack(settings, print)
    assert stopped == []
