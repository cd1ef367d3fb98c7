"""tests/compose_run.py (``make test-compose``) against a scripted ``docker``: the suites in the
network, then always a teardown with the volumes, whatever happened before it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from services.stack.compose import ComposeStack
from tests import compose_run
from tests.compose_run import E2E_PROJECT, E2E_SETTINGS, run_e2e_suites
from tests.support.fake_docker import HEALTHY, FakeDocker, stack_with


def e2e_stack(fake: FakeDocker, tmp_path: Path) -> ComposeStack:
    fake.on("volume", "ls", out="ztbank-test_ca\n")
    stack = stack_with(fake, tmp_path, HEALTHY)
    stack.images = lambda: None  # type: ignore[method-assign]
    return stack


def test_suites_run_in_the_network_then_everything_is_torn_down(tmp_path: Path) -> None:
    fake = FakeDocker(stream_rc=3)
    assert run_e2e_suites(e2e_stack(fake, tmp_path), ["-k", "revocation"]) == 3
    suites, host_checks = fake.streamed
    assert suites[suites.index("run") :][:5] == ["run", "--rm", "--no-deps", "-T", "e2e"]
    assert suites[-2:] == ["-k", "revocation"]
    assert "tests/compose" in host_checks
    up, down = fake.called("up")[0], fake.called("down")[-1]
    assert up < down
    assert fake.called("volume", "rm")  # the volumes go too


def test_anything_left_after_down_fails_the_run(tmp_path: Path) -> None:
    fake = FakeDocker().on("docker", "ps", "--all", out="ztbank-test_gateway_1\n")
    lines: list[str] = []
    stack = e2e_stack(fake, tmp_path)
    stack.say = lines.append
    assert run_e2e_suites(stack, []) == 1
    left = "test-compose: left behind after down: container ztbank-test_gateway_1, volume"
    assert any(line.startswith(left) for line in lines), lines


def test_a_stack_that_never_gets_healthy_fails_the_run_and_is_torn_down(tmp_path: Path) -> None:
    fake = FakeDocker().on("up", rc=1)
    assert run_e2e_suites(e2e_stack(fake, tmp_path), []) == 1
    assert not fake.streamed
    assert fake.called("down")


def test_an_interrupt_tears_down_and_exits_130(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = e2e_stack(fake, tmp_path)

    def interrupted(_argv: Sequence[str], _env: Mapping[str, str]) -> int:
        raise KeyboardInterrupt

    stack.docker.stream = interrupted
    assert run_e2e_suites(stack, []) == 130
    assert fake.called("down")


def test_pytest_options_reach_the_suites_on_a_stack_of_the_e2e_project(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ran: list[tuple[ComposeStack, Sequence[str]]] = []

    def record(stack: ComposeStack, pytest_args: Sequence[str]) -> int:
        ran.append((stack, pytest_args))
        return 0

    monkeypatch.setattr(compose_run, "Docker", FakeDocker().docker)
    monkeypatch.setattr(compose_run, "run_e2e_suites", record)
    # `make test-compose OFFLINE=0 PYTEST_ARGS="-p no:cacheprovider -k policy"`
    assert compose_run.main(["--offline", "0", "-p", "no:cacheprovider", "-k", "policy"]) == 0
    ((stack, pytest_args),) = ran
    assert pytest_args == ["-p", "no:cacheprovider", "-k", "policy"]
    assert (stack.project, stack.offline) == (E2E_PROJECT, False)
    assert stack.overrides == E2E_SETTINGS
