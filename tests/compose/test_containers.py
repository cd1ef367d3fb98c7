"""What only the host sees of a running compose stack: the container boundary itself.

``make test-compose`` runs these on the host after the e2e suites ran inside the compose network,
against the same stack (``ZTBANK_COMPOSE_PROJECT`` names it); elsewhere they skip.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.stack.compose import PROJECT_LABEL, read_env_file

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("ZTBANK_COMPOSE_PROJECT", "")
SETTINGS = read_env_file(ROOT / ".env")
UIDS = {
    "issuer": SETTINGS["ISSUER_UID"],
    "gateway": SETTINGS["GATEWAY_UID"],
    "transfer-engine": SETTINGS["TRANSFER_ENGINE_UID"],
    "risk": SETTINGS["RISK_UID"],
}
# Run inside a fresh container: one SVID from the shared Workload API socket, or exit 3.
FETCH = """
import sys
from services.common.errors import CommonError
from services.common.identity.source import fetch_svid
try:
    material = fetch_svid("unix:///spiffe-workload-api/workload.sock", sys.argv[1], timeout=5)
except CommonError as error:
    print("no SVID:", error)
    sys.exit(3)
print(material.spiffe_id)
"""

pytestmark = pytest.mark.skipif(
    not PROJECT, reason="runs in `make test-compose`, against the stack it brought up"
)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=check, timeout=60
    )


def container_of(service: str) -> str:
    ids = docker(
        "ps", "-q", "--filter", f"label={PROJECT_LABEL}={PROJECT}",
        "--filter", f"label=com.docker.compose.service={service}",
    ).stdout.split()  # fmt: skip
    assert len(ids) == 1, f"{service}: {len(ids)} running containers"
    return ids[0]


def fetch_svid_in_new_container(uid: str) -> subprocess.CompletedProcess[str]:
    """A container of its own (not the issuer's, not the e2e one), on the shared socket only."""
    return docker(
        "run", "--rm", "--network", "none", "--user", f"{uid}:{SETTINGS['ISSUER_UID']}",
        "-v", f"{PROJECT}_workload-api:/spiffe-workload-api:ro",
        "--entrypoint", "python", SETTINGS["ZTBANK_IMAGE"],
        "-c", FETCH, SETTINGS["ZTBANK_TRUST_DOMAIN"],
        check=False,
    )  # fmt: skip


@pytest.mark.parametrize("service", sorted(UIDS))
def test_each_service_runs_as_its_own_non_root_uid(service: str) -> None:
    # docker top runs ps on the host for the container's processes; it needs the PID column.
    listed = docker("top", container_of(service), "-eo", "pid,uid").stdout.splitlines()[1:]
    uids = {line.split()[1] for line in listed}
    assert uids == {UIDS[service]}, f"{service} processes run as {uids}"
    assert UIDS[service] != "0"


def test_a_registered_uid_in_another_container_is_attested_by_its_uid() -> None:
    done = fetch_svid_in_new_container(SETTINGS["TELLER_UID"])
    assert done.returncode == 0, done.stdout + done.stderr
    td = SETTINGS["ZTBANK_TRUST_DOMAIN"]
    assert done.stdout.strip() == f"spiffe://{td}/env/prod/zone/az1/team/channels/svc/teller"


def test_an_unregistered_uid_in_another_container_gets_no_svid() -> None:
    done = fetch_svid_in_new_container("10042")
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("no SVID:"), done.stdout
