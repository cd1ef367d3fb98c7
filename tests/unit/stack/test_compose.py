"""services/stack/compose.py against a scripted ``docker``: the choices and the failure paths.

The happy path runs for real in ``make test-compose`` (CI starts dockerd); here are what a real
engine cannot be made to do on demand: no engine, no compose tool, a job that fails, a service
that never gets healthy (an interrupted ``make test-compose``: test_compose_run.py in infra/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.stack import compose
from services.stack.compose import (
    ALL_PROFILES,
    COMPOSE_FILE,
    ComposeError,
    ComposeUsageError,
    choose_mode,
    container_state,
    run_beside,
)
from tests.support.fake_docker import HEALTHY, FakeDocker, inspected, stack_with

# -- which stack -----------------------------------------------------------------------------


def test_no_engine_means_native_and_says_why() -> None:
    fake = FakeDocker().on("info", rc=1)
    mode, why = choose_mode("", fake.docker())
    assert mode == "native"
    assert why == "native stack: no Docker engine answers (docker info failed)"


def test_an_engine_without_a_compose_tool_means_native() -> None:
    fake = FakeDocker().on("compose", "version", rc=1).on("docker-compose", "version", rc=127)
    mode, why = choose_mode("", fake.docker())
    assert mode == "native"
    assert "neither `docker compose` nor `docker-compose` works" in why


def test_compose_v1_alone_is_enough_and_v2_is_preferred() -> None:
    only_v1 = FakeDocker().on("compose", "version", rc=1)
    assert choose_mode("", only_v1.docker())[0] == "compose"
    assert only_v1.docker().compose_tool() == ["docker-compose"]
    assert FakeDocker().docker().compose_tool() == ["docker", "compose"]


def test_mode_compose_where_it_cannot_run_is_a_usage_error() -> None:
    with pytest.raises(ComposeUsageError, match="MODE=compose, but no Docker engine answers"):
        choose_mode("compose", FakeDocker().on("info", rc=1).docker())
    with pytest.raises(ComposeUsageError, match="MODE=swarm"):
        choose_mode("swarm", FakeDocker().docker())
    assert choose_mode("native", FakeDocker().docker())[0] == "native"


def test_the_command_line_answers_a_missing_engine_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeDocker().on("info", rc=1)
    monkeypatch.setattr(compose, "Docker", fake.docker)
    assert compose.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err == "ztbank compose: no Docker engine answers (docker info failed): start dockerd\n"
    assert compose.main(["mode", "--requested", "compose"]) == 2
    out, err = capsys.readouterr()
    assert (out, err.count("\n")) == ("", 1)
    assert compose.main(["mode"]) == 0
    out, err = capsys.readouterr()
    assert out == "native\n"
    assert err == "native stack: no Docker engine answers (docker info failed)\n"


def test_without_a_registry_the_images_are_built_offline_and_the_file_is_the_same(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack = compose.open_stack(FakeDocker().on("pull", rc=1).docker(), "auto")
    assert stack.offline
    assert capsys.readouterr().out == (
        "no container registry answers: images are built offline (ztbank-base:bookworm,"
        " wheelhouse/)\n"
    )
    assert stack.compose_argv("up") == ["docker", "compose", "-f", COMPOSE_FILE, "up"]
    online = compose.open_stack(FakeDocker().docker(), "auto")
    assert not online.offline
    assert online.compose_argv("up") == stack.compose_argv("up")
    assert not compose.open_stack(FakeDocker().on("pull", rc=1).docker(), "no").offline
    assert compose.open_stack(FakeDocker().docker(), "yes").offline
    assert capsys.readouterr().out == ""  # forced: nothing probed, nothing said


def test_a_profile_in_compose_profiles_gets_its_settings_unless_the_shell_has_them(
    tmp_path: Path,
) -> None:
    stack = stack_with(FakeDocker(), tmp_path, HEALTHY)
    assert "ZTBANK_CONSUL_ADDR" not in stack.env
    stack.docker.env = {"COMPOSE_PROFILES": "consul, otel", "E2E_TRACES": "files"}
    env = stack.env
    assert env["ZTBANK_CONSUL_ADDR"] == "http://consul:8500"
    assert env["ZTBANK_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert env["PROMETHEUS_CONFIG"] == "prometheus.otel.yml"
    assert env["E2E_TRACES"] == "files"  # the shell's value wins
    up = stack.compose_argv("up", "--detach")
    assert "--profile" not in up  # compose reads COMPOSE_PROFILES itself


# -- health ----------------------------------------------------------------------------------


def test_container_states_from_docker_inspect() -> None:
    running = container_state(inspected("gateway", "running", "healthy"))
    assert (running.service, running.ready, running.failed) == ("gateway", True, False)
    starting = container_state(inspected("gateway", "running", "starting"))
    assert (starting.ready, starting.failed) == (False, False)
    job_failed = container_state(inspected("entries", "exited", code=2))
    assert (job_failed.ready, job_failed.failed) == (False, True)
    assert job_failed.describe() == "exited with code 2"
    assert container_state(inspected("gateway", "running", "unhealthy")).failed


def test_up_waits_for_health_without_compose_wait(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)
    states = stack.up(timeout=5)
    assert {s.service for s in states} == {
        "vault-tls",
        "vault-bootstrap",
        "issuer",
        "entries",
        "gateway",
    }
    (up,) = fake.called("up")
    assert "--wait" not in fake.calls[up]  # compose v1 has no --wait
    assert "--profile" not in fake.calls[up]  # the on-demand jobs are not started
    assert not fake.called("down")


def test_a_failed_job_stops_up_naming_it_and_its_log_and_nothing_is_left(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, [*HEALTHY[:2], inspected("entries", "exited", code=2)])
    with pytest.raises(ComposeError) as raised:
        stack.up(timeout=5)
    message = str(raised.value)
    assert "entries is exited with code 2" in message
    log = Path(message.rsplit("its log: ", 1)[1])
    assert log.name == "entries.log"
    assert log.is_file()  # kept before the containers went
    assert fake.called("down", "--remove-orphans")


def test_a_failed_vault_bootstrap_stops_up_naming_it_and_its_log(tmp_path: Path) -> None:
    """compose v1 itself refuses to go on when a job the issuer depends on fails: `up` exits
    non-zero with vault healthy and vault-bootstrap exited 1."""
    bootstrap = inspected("vault-bootstrap", "exited", code=1)
    bootstrap["HostConfig"] = {"RestartPolicy": {"Name": "no"}}
    fake = FakeDocker().on("up", rc=1)
    stack = stack_with(fake, tmp_path, [inspected("vault", "running", "healthy"), bootstrap])
    with pytest.raises(ComposeError) as raised:
        stack.up(timeout=5)
    message = str(raised.value)
    assert message.startswith("`up` failed: vault-bootstrap is exited with code 1; its log: ")
    log = Path(message.split("its log: ", 1)[1].split(" (compose's: ", maxsplit=1)[0])
    assert log.name == "vault-bootstrap.log"
    assert log.is_file()
    assert message.endswith("up.log)")
    assert fake.called("down", "--remove-orphans")


def test_a_vault_that_keeps_crashing_is_named_with_its_restarts(tmp_path: Path) -> None:
    vault = inspected("vault", "running", "starting") | {"RestartCount": 3}
    fake = FakeDocker().on("up", rc=1)
    stack = stack_with(fake, tmp_path, [inspected("gateway", "created"), vault])
    with pytest.raises(
        ComposeError,
        match=r"^`up` failed: vault is running \(starting\), "
        r"restarted 3 times; its log: .*/vault\.log \(compose's: ",
    ):
        stack.up(timeout=5)
    assert fake.called("down")


def test_a_service_that_never_gets_healthy_times_out(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, [*HEALTHY[:3], inspected("gateway", "running", "starting")])
    with pytest.raises(ComposeError, match=r"gateway is running \(starting\)"):
        stack.up(timeout=0)
    assert fake.called("down")


def test_down_with_volumes_removes_every_volume_of_the_project(tmp_path: Path) -> None:
    fake = FakeDocker().on("volume", "ls", out="ztbank-test_ca\nztbank-test_issuer-data\n")
    stack = stack_with(fake, tmp_path, HEALTHY)
    stack.down(volumes=True)
    (down,) = fake.called("down")
    for profile in ALL_PROFILES:  # whatever profile started a container, it goes
        assert fake.calls[down][fake.calls[down].index(profile) - 1] == "--profile"
    (listed,) = fake.called("volume", "ls")
    assert "label=com.docker.compose.project=ztbank-test" in fake.calls[listed]
    (removed,) = fake.called("volume", "rm")
    assert fake.calls[removed][-2:] == ["ztbank-test_ca", "ztbank-test_issuer-data"]


def test_a_failed_build_names_the_image_and_its_log(tmp_path: Path) -> None:
    fake = FakeDocker().on("build", "--target", "runtime", rc=1)
    stack = stack_with(fake, tmp_path, HEALTHY)
    with pytest.raises(ComposeError) as raised:
        stack.images()
    assert (
        str(raised.value)
        == f"image ztbank:0.1.0 failed; its log: {tmp_path}/logs/build-runtime.log"
    )
    (build,) = fake.called("build")
    assert {"PYTHON_IMAGE=ztbank-base:bookworm", "OFFLINE=1"} <= set(fake.calls[build])
    assert fake.called("scripts/base_image.sh") < fake.called("build")  # the base comes first


@pytest.mark.parametrize("offline", [True, False])
def test_images_builds_vault_and_prometheus_too_on_the_base_of_the_mode(
    tmp_path: Path, offline: bool
) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)
    stack.offline = offline
    stack.images()
    builds = {argv[argv.index("-t") + 1]: argv for argv in fake.calls if "build" in argv}
    assert set(builds) == {
        "ztbank:0.1.0", "ztbank-load:0.1.0", "ztbank-test:0.1.0", "ztbank-vault:2.7.2",
        "ztbank-prometheus:2.42",
    }  # fmt: skip
    vault, prometheus = builds["ztbank-vault:2.7.2"], builds["ztbank-prometheus:2.42"]
    assert vault[vault.index("-f") + 1] == "infra/vault/Dockerfile"
    assert vault[-1] == "."  # the context holds constraints.txt and wheelhouse/
    assert prometheus[-1] == "infra/prometheus"
    python = "ztbank-base:bookworm" if offline else "python:3.11.10-slim-bookworm"
    debian = "ztbank-base:bookworm" if offline else "debian:bookworm-20241016-slim"
    assert f"PYTHON_IMAGE={python}" in vault
    assert f"DEBIAN_IMAGE={debian}" in prometheus
    assert ("OFFLINE=1" in vault) is offline
    assert "OFFLINE=1" not in prometheus  # apt, not pip
    assert bool(fake.called("scripts/wheelhouse.sh")) is offline


def test_a_lab_runs_beside_a_healthy_stack_in_the_cli_job_and_its_container_is_removed(
    tmp_path: Path,
) -> None:
    fake = FakeDocker(stream_rc=3)
    stack = stack_with(fake, tmp_path, HEALTHY)

    assert run_beside(stack, "cli", ["lab", "policy"]) == 3  # the lab's own exit code

    [argv] = fake.streamed
    assert argv[argv.index("run") :] == [
        "run", "--rm", "--no-deps", "--name", "ztbank-test_cli_beside", "-T", "cli", "lab",
        "policy",
    ]  # fmt: skip
    assert argv[argv.index("--profile") + 1] == "cli"
    assert fake.called("docker", "rm", "--force", "ztbank-test_cli_beside")


def test_the_console_publishes_its_port_beside_the_stack(tmp_path: Path) -> None:
    fake = FakeDocker()
    stack = stack_with(fake, tmp_path, HEALTHY)

    assert run_beside(stack, "console", [], ports=True) == 0

    [argv] = fake.streamed
    assert "--service-ports" in argv
    assert argv[-1] == "console"


def test_a_lab_beside_a_stack_that_is_not_healthy_is_refused_saying_so(tmp_path: Path) -> None:
    fake = FakeDocker()
    starting = [*HEALTHY[:-1], inspected("gateway", "running", "starting")]
    stack = stack_with(fake, tmp_path, starting)

    with pytest.raises(ComposeUsageError, match="not up and healthy: make up MODE=compose"):
        run_beside(stack, "cli", ["lab", "policy"])
    assert fake.streamed == []
