"""`ztbank lab all` (`make lab-all`, issue 21, item 1) on a stack of the class profile: every lab
of the registry passes, in its order, the summary table says so, and the stack is left as the
run found it.

The stack is this module's own: `ztbank lab class` starts it on a private home
(``services.stack.sandbox``'s settings: a temp dir, free ports, its own copies of the policy and
trust table, which the labs edit), as `make class` would.  Not on an existing stack: the run
stops the issuer (the outage lab) and takes the root key offline (the upstream lab).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.settings import load_settings
from services.labs.registry import LABS
from services.labs.support import service_starts
from services.stack.native import NativeStack
from services.stack.sandbox import sandbox_settings
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import clean_environment, scrub_environment

pytestmark = [pytest.mark.e2e, pytest.mark.stack, pytest.mark.slow]  # eight labs, ~70 s here

CLASS_TIMEOUT = 120.0
# The run takes about 70 s here; the deadline is only there so that a hung lab fails the test.
RUN_TIMEOUT = 600.0


def ztbank(native: NativeStack, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The ``ztbank`` console script of this venv on ``native``'s home, in a process of its own
    as a trainer runs it."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("ztbank")), *args],
        env=clean_environment() | native.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def class_stack() -> Iterator[NativeStack]:
    if load_settings(E2ETargetSettings).stack == "existing":
        pytest.skip("the run stops the issuer and takes the root key offline: not a shared stack")
    env = pytest.MonkeyPatch()
    root = Path(tempfile.mkdtemp(prefix="zta", dir="/tmp"))  # short: unix socket paths
    try:
        scrub_environment(env)
        native = NativeStack(sandbox_settings(root))
        try:
            started = ztbank(native, "lab", "class", timeout=CLASS_TIMEOUT)
            assert started.returncode == 0, started.stdout + started.stderr
            yield native
        finally:
            native.down()
    finally:
        env.undo()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_every_lab_passes_on_the_class_profile_and_the_stack_is_left_as_found(
    class_stack: NativeStack,
) -> None:
    settings = class_stack.settings
    policy, trust = settings.policy.read_bytes(), settings.trust_levels.read_bytes()
    starts = service_starts(settings)

    result = ztbank(class_stack, "lab", "all", timeout=RUN_TIMEOUT)

    transcript = result.stdout + result.stderr
    assert result.returncode == 0, transcript
    assert "Traceback" not in result.stderr, transcript
    lines = result.stdout.splitlines()
    heading = lines.index(f"summary of ztbank lab all ({len(LABS)} labs):")
    rows = [line.split() for line in lines[heading + 2 : heading + 2 + len(LABS)]]
    assert [row[:2] for row in rows] == [[lab.name, "passed"] for lab in LABS], transcript
    assert lines[heading + 2 + len(LABS)].split()[0] == "total"
    assert lines[-2].startswith("the stack is as the run found it: "), transcript
    assert lines[-1].startswith(f"all {len(LABS)} labs passed in "), transcript
    # Each lab narrated its own verdict, in registry order.
    announced = [line.split()[-1] for line in lines if line.startswith("[")]
    assert announced == [lab.name for lab in LABS]
    assert sum(line.startswith("lab passed") for line in lines) == len(LABS)

    # As the run's own check says: nothing left changed, the lock released.
    assert settings.policy.read_bytes() == policy
    assert settings.trust_levels.read_bytes() == trust
    assert service_starts(settings) == starts
    assert class_stack.issuer.running()
    assert (settings.certs_dir / "root-ca.key").exists()
    assert not list(settings.run_dir.glob("lab-*.original.json"))
    assert (settings.run_dir / "lab.lock").read_text() == ""
