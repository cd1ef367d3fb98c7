"""``make test-compose``: the e2e suites inside the compose network, on a fresh stack of their own.

Test code, so it lives with the tests and stays out of the wheel; it drives the stack through
``services.stack.compose`` as ``make up`` does.  The images are built (offline when no registry
answers, as ``make images``), a stack of project ``ztbank-e2e`` comes up with 20 s SVIDs and
host ports Docker picks, the suites run in its ``e2e`` container, then ``tests/compose`` on the
host against the same stack.  The stack and its volumes are always removed, and anything left
behind fails the run; each phase is timed.  SIGTERM (CI cancelling the job) tears down as Ctrl-C
does (exit 130).

    python -m tests.compose_run [--offline auto|yes|no] [PYTEST ARGS...]

Every argument but ``--offline`` goes to pytest in the ``e2e`` container, options included
(``-p no:cacheprovider``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from services.stack.compose import (
    JOB_PROFILES,
    ComposeError,
    ComposeStack,
    Docker,
    add_offline_option,
    open_stack,
    report_failure,
    terminate_as_interrupt,
)

E2E_PROJECT = "ztbank-e2e"
E2E_SETTINGS = {
    "ZTBANK_SVID_TTL": "20s",  # the rotation suite fits its deadline
    # Empty host ports: Docker picks free ones ("127.0.0.1::8443"), no clash with a demo stack.
    **{
        port: ""
        for port in (
            "VAULT_PORT", "CONSUL_PORT", "GATEWAY_PORT", "JAEGER_UI_PORT", "PROMETHEUS_PORT",
            "GRAFANA_PORT",
        )
    },
}  # fmt: skip


def run_e2e_suites(stack: ComposeStack, pytest_args: Sequence[str]) -> int:
    """Images, a fresh stack, the suites in the ``e2e`` container, always a teardown with the
    volumes; the suites' exit code (1 when the stack never got healthy); each phase timed."""
    phases: list[str] = []
    status = 1

    @contextmanager
    def phase(name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            phases.append(f"{name} {time.monotonic() - started:.1f} s")

    with terminate_as_interrupt():
        try:
            with phase("images"):
                stack.images()
            with phase("up"):
                stack.up()
            stack.say(f"{stack.project} memory: {stack.memory()}")
            with phase("e2e"):
                # --no-deps: the stack is up; v1 would start its finished jobs once more.
                argv = stack.compose_argv(
                    "run", "--rm", "--no-deps", "-T", "e2e", "tests/e2e", "-p", "no:cacheprovider",
                    "-rs", *pytest_args, profiles=JOB_PROFILES,
                )  # fmt: skip
                status = stack.docker.stream(argv, stack.env)
            with phase("container checks"):
                # On the host: uids of the processes, attestation of other containers.
                host_env = {**stack.env, "ZTBANK_COMPOSE_PROJECT": stack.project}
                argv = [sys.executable, "-m", "pytest", "tests/compose", "-p", "no:cacheprovider"]
                status = max(status, stack.docker.stream([*argv, "-q", "-rs"], host_env))
        except ComposeError as error:
            stack.say(f"test-compose: {error}")
        except KeyboardInterrupt:
            stack.say("test-compose: interrupted")
            status = 130
        finally:
            stack.say(f"test-compose: tearing down {stack.project} (containers and volumes)")
            with phase("down"):
                stack.down(volumes=True, quiet=True)
            if left := stack.leftovers():
                stack.say(f"test-compose: left behind after down: {', '.join(left)}")
                status = status or 1
            stack.say(f"test-compose: {', '.join(phases)}; exit {status}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.compose_run", description=__doc__, allow_abbrev=False
    )
    add_offline_option(parser)
    # Known arguments only: pytest's own options (-p, -k, -x...) must reach pytest, which a
    # REMAINDER positional does not do when the first of them is an option.
    args, pytest_args = parser.parse_known_args(argv)
    try:
        stack = open_stack(Docker(), args.offline, project=E2E_PROJECT)
        stack.overrides.update(E2E_SETTINGS)
        return run_e2e_suites(stack, pytest_args)
    except ComposeError as error:
        return report_failure(error)


if __name__ == "__main__":
    sys.exit(main())
