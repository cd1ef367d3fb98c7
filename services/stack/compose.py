"""The compose stack, driven the same way whichever compose tool is installed.

``docker compose`` (the v2 plugin) when it answers, else Debian's ``docker-compose`` (v1, which
has no ``--wait``): health is waited for here, from ``docker inspect``, for both.  The stack is
``compose.yaml``, one file.  How its images are built is a separate choice: from the registry's
base images, or, where no registry answers, offline (a debootstrap base, a host-made
wheelhouse).  Every failure ends in one line naming what failed and where its log is, with
nothing left running.

    python -m services.stack.compose mode|images|up|down|status|logs|lab|console  (the Makefile's)

``make test-compose`` drives a stack of its own through this module (``tests/compose_run.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

from services.common.errors import CommonError

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = "compose.yaml"
BASE_IMAGE = "ztbank-base:bookworm"
UP_TIMEOUT = 240.0
PROJECT_LABEL = "com.docker.compose.project"
# The stack as a container on its network sees it (compose*.yaml).
ISSUER_SERVICE = "issuer"
ISSUER_HTTP = "issuer:8180"
WORKLOAD_API_SOCKET = "unix:///spiffe-workload-api/workload.sock"
# Run on demand (profiles "test", "load", "cli", "console"), never part of a healthy stack.
ON_DEMAND_JOBS = ("e2e", "locust", "cli", "console")
JOB_PROFILES = ("test", "load", "cli", "console")
# Every profile of compose.yaml: `down` removes what any of them started.
ALL_PROFILES = ("consul", "otel", "grafana", *JOB_PROFILES)
# What a profile named in COMPOSE_PROFILES needs the services pointed at (compose.yaml reads
# these from .env, where they are empty or the default: off). The shell's own values win.
PROFILE_SETTINGS = {
    "consul": {"ZTBANK_CONSUL_ADDR": "http://consul:8500"},
    "otel": {
        "ZTBANK_OTLP_ENDPOINT": "http://otel-collector:4318",
        "PROMETHEUS_CONFIG": "prometheus.otel.yml",
        "E2E_TRACES": "jaeger",
    },
}


@dataclass(frozen=True)
class ImageBuild:
    """One image ztbank owns: the .env variable naming its tag, what ``docker build`` gets."""

    variable: str
    log_name: str
    dockerfile: str
    context: str
    target: str = ""
    base_arg: str = "PYTHON_IMAGE"  # the build argument naming the base image
    wheelhouse: bool = True  # installs from the wheelhouse when built offline

    def argv(self, tag: str, base: str, offline: bool) -> list[str]:
        argv = ["docker", "build", "--build-arg", f"{self.base_arg}={base}"]
        if offline and self.wheelhouse:
            argv += ["--build-arg", "OFFLINE=1"]
        argv += ["-f", self.dockerfile, *(["--target", self.target] if self.target else [])]
        return [*argv, "-t", tag, self.context]


IMAGE_BUILDS = (
    ImageBuild("ZTBANK_IMAGE", "build-runtime", "Dockerfile", ".", "runtime"),
    ImageBuild("ZTBANK_LOAD_IMAGE", "build-load", "Dockerfile", ".", "load"),
    ImageBuild("ZTBANK_TEST_IMAGE", "build-test", "Dockerfile", ".", "test"),
    ImageBuild("VAULT_IMAGE", "build-vault", "infra/vault/Dockerfile", "."),
    ImageBuild(
        "ZTBANK_PROMETHEUS_IMAGE",
        "build-prometheus",
        "infra/prometheus/Dockerfile",
        "infra/prometheus",
        base_arg="DEBIAN_IMAGE",
        wheelhouse=False,
    ),
)

Mode = Literal["native", "compose"]


class ComposeError(CommonError):
    """The compose stack could not do what was asked; the message is the one line to show."""


class ComposeUsageError(ComposeError):
    """What was asked cannot be done on this machine (exit 2)."""


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str


Runner = Callable[[Sequence[str], Mapping[str, str], Path | None], Completed]


def run_command(argv: Sequence[str], env: Mapping[str, str], log: Path | None) -> Completed:
    """Run ``argv``; its output goes to ``log`` when given (builds, ``up``), else is returned."""
    try:
        if log is None:
            done = subprocess.run(
                argv, env=dict(env), cwd=ROOT, capture_output=True, text=True, check=False
            )
            return Completed(done.returncode, done.stdout)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as sink:
            returncode = subprocess.run(
                argv, env=dict(env), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, check=False
            ).returncode
        return Completed(returncode, "")
    except FileNotFoundError:
        return Completed(127, "")


def shown(path: Path) -> Path:
    """A path as the user should type it: relative to the repository when inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def read_env_file(path: Path) -> dict[str, str]:
    """``.env`` as compose reads it (KEY=VALUE lines, # comments)."""
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key] = value
    return values


@dataclass
class Docker:
    """What this machine offers: an engine, a compose tool, a registry."""

    run: Runner = run_command
    stream: Callable[[Sequence[str], Mapping[str, str]], int] = field(
        default=lambda argv, env: (
            subprocess.run(argv, env=dict(env), cwd=ROOT, check=False).returncode
        )
    )
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def ok(self, *argv: str) -> bool:
        return self.run(argv, self.env, None).returncode == 0

    def engine_answers(self) -> bool:
        return self.ok("docker", "info")

    def compose_tool(self) -> list[str] | None:
        if self.ok("docker", "compose", "version"):
            return ["docker", "compose"]
        if self.ok("docker-compose", "version"):
            return ["docker-compose"]
        return None

    def registry_answers(self, probe_image: str) -> bool:
        """Pulling a small image (busybox, which the profile otel uses); fails at once here (no
        route to any registry)."""
        return self.ok("docker", "pull", "--quiet", probe_image)


def choose_mode(requested: str, docker: Docker) -> tuple[Mode, str]:
    """native or compose, and the one line that says why."""
    if requested not in ("", "native", "compose"):
        raise ComposeUsageError(f"MODE={requested}: use MODE=native or MODE=compose")
    if requested == "native":
        return "native", "native stack (MODE=native)"
    if not docker.engine_answers():
        why = "no Docker engine answers (docker info failed)"
    elif docker.compose_tool() is None:
        why = "a Docker engine answers but neither `docker compose` nor `docker-compose` works"
    else:
        return "compose", "compose stack (a Docker engine and a compose tool answer)"
    if requested == "compose":
        raise ComposeUsageError(f"MODE=compose, but {why}")
    return "native", f"native stack: {why}"


@dataclass(frozen=True)
class ContainerState:
    service: str
    status: str  # created, running, exited, ...
    health: str  # healthy, unhealthy, starting, or "" without a health check
    exit_code: int
    one_shot: bool
    restarts: int = 0  # by its restart policy: a service that keeps crashing

    @property
    def ready(self) -> bool:
        if self.one_shot:
            return self.status == "exited" and self.exit_code == 0
        return self.status == "running" and self.health in ("healthy", "")

    @property
    def failed(self) -> bool:
        if self.one_shot:
            return self.status == "exited" and self.exit_code != 0
        return self.health == "unhealthy" or self.status in ("exited", "dead")

    def describe(self) -> str:
        if self.one_shot and self.status == "exited":
            return f"exited with code {self.exit_code}"
        restarted = f", restarted {self.restarts} times" if self.restarts else ""
        return f"{self.status}{f' ({self.health})' if self.health else ''}{restarted}"


def container_state(inspected: Mapping[str, object]) -> ContainerState:
    config = inspected.get("Config")
    state = inspected.get("State")
    host = inspected.get("HostConfig")
    assert isinstance(config, dict)
    assert isinstance(state, dict)
    assert isinstance(host, dict)
    labels = config.get("Labels") or {}
    health = state.get("Health") or {}
    restart = (host.get("RestartPolicy") or {}).get("Name", "")
    return ContainerState(
        service=str(labels.get("com.docker.compose.service", inspected.get("Name", "?"))),
        status=str(state.get("Status", "")),
        health=str(health.get("Status", "")),
        exit_code=int(state.get("ExitCode", 0)),
        one_shot=restart in ("", "no"),
        restarts=int(str(inspected.get("RestartCount") or 0)),
    )


def active_profiles(env: Mapping[str, str]) -> list[str]:
    """The profiles COMPOSE_PROFILES names (comma-separated, as compose reads it)."""
    return [p.strip() for p in env.get("COMPOSE_PROFILES", "").split(",") if p.strip()]


@dataclass
class ComposeStack:
    docker: Docker
    tool: list[str]
    offline: bool  # images are built without a registry (the file is compose.yaml either way)
    project: str
    overrides: dict[str, str] = field(default_factory=dict)
    log_dir: Path = ROOT / "var" / "log" / "compose"
    say: Callable[[str], None] = print

    @property
    def file(self) -> str:
        return COMPOSE_FILE

    @property
    def env(self) -> dict[str, str]:
        env = {**self.docker.env, "COMPOSE_PROJECT_NAME": self.project, **self.overrides}
        for profile in active_profiles(env):
            for key, value in PROFILE_SETTINGS.get(profile, {}).items():
                env.setdefault(key, value)
        return env

    def settings(self) -> dict[str, str]:
        """.env as compose sees it: the shell's environment wins."""
        env = self.env
        return {k: env.get(k, v) for k, v in read_env_file(ROOT / ".env").items()}

    def compose_argv(self, *args: str, profiles: Sequence[str] = ()) -> list[str]:
        """``profiles``: JOB_PROFILES to ``run`` a job, ALL_PROFILES to take everything
        ``down``; never for ``up``, which would start them (COMPOSE_PROFILES applies there)."""
        flags = [word for profile in profiles for word in ("--profile", profile)]
        return [*self.tool, "-f", self.file, *flags, *args]

    def compose(
        self, *args: str, log: Path | None = None, profiles: Sequence[str] = ()
    ) -> Completed:
        return self.docker.run(self.compose_argv(*args, profiles=profiles), self.env, log)

    # -- images -------------------------------------------------------------------------------

    def images(self) -> None:
        """Every image of compose.yaml's default set and jobs (ztbank's, Vault, Prometheus).
        Offline: the base from debootstrap (kept once made), the wheelhouse from constraints.txt
        on the host, pip without an index inside; else the registry's bases and the index."""
        settings = self.settings()
        if self.offline:
            self._step("base image", ["scripts/base_image.sh", BASE_IMAGE], "base-image")
            self._step(
                "wheelhouse",
                ["env", f"PYTHON={sys.executable}", "scripts/wheelhouse.sh"],
                "wheelhouse",
            )
        for build in IMAGE_BUILDS:
            image = settings[build.variable]
            base = BASE_IMAGE if self.offline else settings[build.base_arg]
            argv = build.argv(image, base, self.offline)
            self._step(f"image {image}", argv, build.log_name, size_of=image)

    def _step(self, what: str, argv: list[str], log_name: str, size_of: str = "") -> None:
        log = self.log_dir / f"{log_name}.log"
        started = time.monotonic()
        if self.docker.run(argv, self.env, log).returncode != 0:
            raise ComposeError(f"{what} failed; its log: {shown(log)}")
        size = ""
        if size_of:
            inspected = self.docker.run(
                ["docker", "image", "inspect", "--format", "{{.Size}}", size_of], self.env, None
            )
            if inspected.returncode == 0 and inspected.stdout.strip().isdigit():
                size = f", {int(inspected.stdout) / 1e6:.0f} MB"
        self.say(f"{what}: {time.monotonic() - started:.1f} s{size}")

    # -- up / down ----------------------------------------------------------------------------

    def up(self, timeout: float = UP_TIMEOUT) -> list[ContainerState]:
        """Start the stack and wait until every service is healthy and every job is done. On
        failure the logs are kept under var/log/compose/ and the containers are removed."""
        log = self.log_dir / "up.log"
        started = time.monotonic()
        done = self.compose("up", "--detach", "--no-build", "--remove-orphans", log=log)
        try:
            if done.returncode != 0:
                states = self.states()
                # What failed, else what keeps restarting, else what is not ready yet.
                bad = sorted(
                    (s for s in states if s.failed or not s.ready),
                    key=lambda s: (not s.failed, not s.restarts),
                )
                logs = shown(self.keep_logs())
                if not bad:
                    raise ComposeError(f"`up` failed; its log: {shown(log)}")
                raise ComposeError(
                    f"`up` failed: {bad[0].service} is {bad[0].describe()};"
                    f" its log: {logs}/{bad[0].service}.log (compose's: {shown(log)})"
                )
            states = self.wait_ready(started + timeout)
        except BaseException:
            self.down(volumes=False, quiet=True)
            raise
        self.say(
            f"{self.project}: {len(states)} containers ready in {time.monotonic() - started:.1f} s"
        )
        return states

    def states(self) -> list[ContainerState]:
        ids = self.compose("ps", "--all", "-q").stdout.split()
        if not ids:
            return []
        inspected = self.docker.run(["docker", "inspect", *ids], self.env, None)
        if inspected.returncode != 0:
            return []
        return sorted(
            (container_state(item) for item in json.loads(inspected.stdout or "[]")),
            key=lambda s: s.service,
        )

    def wait_ready(self, deadline: float) -> list[ContainerState]:
        while True:
            states = [s for s in self.states() if s.service not in ON_DEMAND_JOBS]
            failed = [s for s in states if s.failed]
            if states and not failed and all(s.ready for s in states):
                return states
            if failed or time.monotonic() >= deadline:
                laggards = failed or [s for s in states if not s.ready]
                logs = shown(self.keep_logs())
                if not laggards:
                    raise ComposeError(f"no container of {self.project} started; logs: {logs}/")
                culprit = laggards[0]
                raise ComposeError(
                    f"the compose stack is not healthy: {culprit.service} is {culprit.describe()};"
                    f" its log: {logs}/{culprit.service}.log"
                )
            time.sleep(1.0)

    def keep_logs(self) -> Path:
        """Each service's log to var/log/compose/<project>/<service>.log (before a teardown)."""
        directory = self.log_dir / self.project
        for state in self.states():
            self.compose(
                "logs", "--no-color", "--timestamps", state.service,
                log=directory / f"{state.service}.log",
            )  # fmt: skip
        return directory

    def down(self, *, volumes: bool, quiet: bool = False) -> None:
        """Remove every container of the project (of every profile, and orphans) and, with
        ``volumes``, every volume labelled with the project."""
        log = self.log_dir / "down.log"
        done = self.compose("down", "--remove-orphans", log=log, profiles=ALL_PROFILES)
        if volumes and done.returncode == 0:
            listed = self.docker.run(
                [
                    "docker",
                    "volume",
                    "ls",
                    "-q",
                    "--filter",
                    f"label={PROJECT_LABEL}={self.project}",
                ],
                self.env,
                None,
            )
            names = listed.stdout.split()
            if listed.returncode != 0 or (
                names
                and self.docker.run(["docker", "volume", "rm", *names], self.env, log).returncode
            ):
                done = Completed(1, "")
        if done.returncode != 0 and not quiet:
            raise ComposeError(f"`down` failed; its log: {shown(log)}")

    def leftovers(self) -> list[str]:
        """Containers and volumes of the project that still exist."""
        label = f"label={PROJECT_LABEL}={self.project}"
        containers = self.docker.run(
            ["docker", "ps", "--all", "--filter", label, "--format", "{{.Names}}"], self.env, None
        ).stdout.split()
        volumes = self.docker.run(
            ["docker", "volume", "ls", "-q", "--filter", label], self.env, None
        ).stdout.split()
        return [*(f"container {c}" for c in containers), *(f"volume {v}" for v in volumes)]

    def file_in_use(self) -> str | None:
        """The compose file the project's containers were created from; None without any."""
        listed = self.docker.run(
            [
                "docker", "ps", "--all", "--filter", f"label={PROJECT_LABEL}={self.project}",
                "--format", '{{.Label "com.docker.compose.project.config_files"}}',
            ],
            self.env,
            None,
        )  # fmt: skip
        for line in listed.stdout.splitlines():
            if name := Path(line.split(",")[0].strip()).name:
                return name
        return None

    def memory(self) -> str:
        """Resident memory of the running containers (docker stats), one line."""
        ids = self.docker.run(
            ["docker", "ps", "-q", "--filter", f"label={PROJECT_LABEL}={self.project}"],
            self.env,
            None,
        ).stdout.split()
        if not ids:
            return "no container running"
        stats = self.docker.run(
            ["docker", "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *ids],
            self.env,
            None,
        )
        parts = []
        total = 0.0
        for line in stats.stdout.splitlines():
            name, _, usage = line.partition(" ")
            mib = _mebibytes(usage.split("/")[0].strip())
            total += mib
            service = name.removeprefix(self.project).lstrip("_-")
            parts.append(f"{service} {mib:.0f}")
        return f"{total:.0f} MiB in all ({', '.join(parts)})"


def _mebibytes(text: str) -> float:
    units = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "B": 1 / 1024 / 1024}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return float(text.removesuffix(unit)) * factor
            except ValueError:
                return 0.0
    return 0.0


# -- the labs and the console beside the running stack -------------------------------------


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (CI cancelling the job) tears down like Ctrl-C does."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_beside(stack: ComposeStack, job: str, args: Sequence[str], *, ports: bool = False) -> int:
    """``job`` (``cli`` or ``console``, compose.yaml's jobs of those profiles) in a container
    beside the running stack, in the foreground; its exit code."""
    states = [s for s in stack.states() if s.service not in ON_DEMAND_JOBS]
    if not states or not all(s.ready for s in states):
        raise ComposeUsageError(
            f"the compose stack {stack.project} is not up and healthy: make up MODE=compose"
        )
    # Named, so that it is removed however this ends: compose leaves a `run` container behind
    # when it is itself killed.
    name = f"{stack.project}_{job}_beside"
    flags = [*(["--service-ports"] if ports else []), *([] if sys.stdin.isatty() else ["-T"])]
    argv = stack.compose_argv(
        "run", "--rm", "--no-deps", "--name", name, *flags, job, *args, profiles=(job,)
    )
    try:
        with terminate_as_interrupt():
            return stack.docker.stream(argv, stack.env)
    except KeyboardInterrupt:
        return 130
    finally:
        stack.docker.run(["docker", "rm", "--force", name], stack.env, None)


# -- command line ---------------------------------------------------------------------------


def open_stack(docker: Docker, offline: str, project: str | None = None) -> ComposeStack:
    if not docker.engine_answers():
        raise ComposeUsageError("no Docker engine answers (docker info failed): start dockerd")
    tool = docker.compose_tool()
    if tool is None:
        raise ComposeUsageError(
            "neither `docker compose` nor `docker-compose` works: apt-get install docker-compose"
        )
    settings = {**read_env_file(ROOT / ".env"), **docker.env}
    stack = ComposeStack(
        docker, tool, offline=False, project=project or settings["COMPOSE_PROJECT_NAME"]
    )
    if offline == "auto":
        stack.offline = not docker.registry_answers(settings["BUSYBOX_IMAGE"])
        if stack.offline:
            stack.say(
                f"no container registry answers: images are built offline ({BASE_IMAGE},"
                " wheelhouse/)"
            )
    else:
        stack.offline = offline == "yes"
    return stack


def add_offline_option(parser: argparse.ArgumentParser) -> None:
    """``--offline``, as the Makefile passes ``OFFLINE`` to whatever builds the images."""
    parser.add_argument(
        "--offline",
        type=lambda v: {"1": "yes", "true": "yes", "0": "no", "false": "no"}.get(v.lower(), v),
        choices=("auto", "yes", "no"),
        default="auto",
        help="build the images without a registry (yes, 1: a debootstrap base, a host-made"
        " wheelhouse), from it (no, 0), or by whether one answers (auto); the compose file is"
        " compose.yaml either way",
    )


def report_failure(error: ComposeError) -> int:
    """The failure's one line on stderr; the exit code (2 for what cannot be done here)."""
    print(f"ztbank compose: {error}", file=sys.stderr)
    return 2 if isinstance(error, ComposeUsageError) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.stack.compose", description=__doc__)
    add_offline_option(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    mode = commands.add_parser("mode", help="print native or compose; why on stderr")
    mode.add_argument("--requested", default="")
    mode.add_argument(
        "--running",
        action="store_true",
        help="compose only if the project has containers (status, logs of what runs)",
    )
    commands.add_parser("images", help="build every image ztbank owns")
    commands.add_parser("up", help="images, then the stack, healthy")
    down = commands.add_parser("down", help="remove the containers (--volumes: and volumes)")
    down.add_argument("--volumes", action="store_true")
    commands.add_parser("status", help="each container's state and health")
    commands.add_parser("logs", help="follow the logs")
    lab = commands.add_parser("lab", help="`ztbank lab ARGS` beside the running stack")
    lab.add_argument("lab_args", nargs=argparse.REMAINDER)
    commands.add_parser("console", help="the lab console beside the running stack")
    args = parser.parse_args(argv)
    docker = Docker()
    try:
        if args.command == "mode":
            chosen, why = choose_mode(args.requested, docker)
            if chosen == "compose" and args.running and not args.requested:
                stack = open_stack(docker, "no")
                if stack.file_in_use() is None:
                    chosen, why = "native", f"native stack: no container of {stack.project} exists"
            print(why, file=sys.stderr)
            print(chosen)
            return 0
        if args.command == "down":
            stack = open_stack(docker, "no")
            stack.down(volumes=args.volumes)
            left = [t for t in stack.leftovers() if args.volumes or t.startswith("container")]
            if left:
                raise ComposeError(f"still there after down: {', '.join(left)}")
            print(f"{stack.project}: down{' (volumes removed)' if args.volumes else ''}")
            return 0
        if args.command in ("status", "logs"):
            stack = open_stack(docker, "no")
            if args.command == "logs":
                return docker.stream(stack.compose_argv("logs", "--follow"), stack.env)
            return print_status(stack)
        if args.command == "lab":
            return run_beside(open_stack(docker, "no"), "cli", ["lab", *args.lab_args])
        if args.command == "console":
            stack = open_stack(docker, "no")
            port = stack.settings()["CONSOLE_PORT"]
            stack.say(f"the lab console: http://127.0.0.1:{port}/ (Ctrl-C stops it)")
            return run_beside(stack, "console", [], ports=True)
        stack = open_stack(docker, args.offline)
        stack.images()
        if args.command == "up":
            stack.up()
            print_status(stack)
        return 0
    except ComposeError as error:
        return report_failure(error)


def print_status(stack: ComposeStack) -> int:
    """Each container's state, then ``ztbank status`` in the ``cli`` job beside the stack: every
    service probed over mTLS as the ops identity (attested by its uid), the issuer's CA chain up
    to Vault's root from its admin socket, and Vault's state."""
    states = [s for s in stack.states() if s.service not in ON_DEMAND_JOBS]
    if not states:
        print(f"{stack.project}: no container (make up MODE=compose starts the stack)")
        return 1
    print(f"{stack.project} ({stack.file}):")
    for state in states:
        print(f"  {state.service:<16} {state.describe()}")
    if not all(s.ready for s in states):
        return 1
    return run_beside(stack, "cli", ["status"])


if __name__ == "__main__":
    sys.exit(main())
