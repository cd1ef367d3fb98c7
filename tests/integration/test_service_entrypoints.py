"""``python -m services.<name>``: a service that cannot start says why in one line and exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.helpers import clean_environment, one_line

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("services.gateway", "gateway"),
        ("services.transfer_engine", "transfer-engine"),
        ("services.risk", "risk"),
    ],
)
def test_invalid_settings_stop_the_service_with_one_line_and_exit_2(module: str, name: str) -> None:
    env = clean_environment() | {"ZTBANK_TRUST_DOMAIN": "Not A Domain!"}
    done = subprocess.run(
        [sys.executable, "-m", module],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"{name}: invalid setting ZTBANK_TRUST_DOMAIN: "), line
