"""``make test-e2e-existing``: the e2e suites in ``existing`` mode against a native stack.

The same path ``make test-compose`` takes inside the compose network, here on this machine: a
private native stack (``services.stack.sandbox``: temp dir, free ports, 20 s SVID TTL) is brought
up first, then pytest runs with ``ZTBANK_E2E_STACK=existing`` and only the ``ZTBANK_*`` settings
that point at that stack, so the suites find it as they would any stack that is already up.  The
stack is always stopped and removed; pytest's exit code is kept.

    python -m tests.e2e.run_existing [PYTEST ARGS...]
"""

from __future__ import annotations

import os
import subprocess
import sys

from services.stack.sandbox import REPO_ROOT, sandbox_stack
from tests.support.helpers import clean_environment

SVID_TTL = "20s"


def main(pytest_args: list[str]) -> int:
    os.environ.clear()
    os.environ.update(clean_environment())  # the stack's processes inherit this environment
    with sandbox_stack(svid_ttl=SVID_TTL) as native:
        env = os.environ | native.env | {"ZTBANK_E2E_STACK": "existing"}
        command = [sys.executable, "-m", "pytest", "tests/e2e", *pytest_args]
        return subprocess.run(command, env=env, cwd=REPO_ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
