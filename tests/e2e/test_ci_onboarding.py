"""ztbank as the integration environment of another team's CI (issue 13, docs/ci.md).

1. On a fresh native stack of its own (a copy of the policy, so the repository's file is never
   edited): ``ztbank workload add`` and ``ztbank env``, then the example client
   (examples/python-client) refused until the rule is added, transferring once it is, and cut
   off once the workload is removed.
2. The CI templates (examples/ci) validated against the published schemas that check-jsonschema
   ships, and their shell steps run here, in order, as the CI system would: in a scratch
   workspace under /tmp with a real ``git clone`` of this repository's committed HEAD, on free
   ports, with CI=true; ``make up``, onboarding, the client, the evidence and ``make down`` are
   the templates' own lines.  What CI systems do outside the shell is emulated: the checkout
   of the team's repository (an empty workspace), setup-python (this interpreter's base
   Python), the cache of ``ztbank/.venv`` (a venv that reuses this checkout's installed
   packages, newer than the clone, so ``make install`` has nothing to do: the one step not run
   as in CI), and the artifact upload (the test reads the evidence directory instead).
3. ``make up`` on a port that is taken fails naming the service and its log; ``make down``
   leaves no process behind, not even one whose pid file is gone.

The developer's own ``var/`` is never touched: every stack here has its own ZTBANK_HOME under
/tmp, and every process the steps start inherits a registry path unique to the test, which is
how the test finds (and, failing, kills) anything left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.discovery.registry import ServiceAddress, write_registry
from services.common.identity.workloads import GATEWAY, SERVICES
from services.common.settings import load_settings
from services.stack.native import NativeStack
from services.stack.sandbox import REPO_ROOT, free_ports, sandbox_settings
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import clean_environment, one_line

pytestmark = pytest.mark.skipif(
    load_settings(E2ETargetSettings).stack == "existing",
    reason="starts stacks of its own; not a suite for an existing stack",
)

CLIENT = REPO_ROOT / "examples" / "python-client" / "client.py"
GITHUB = REPO_ROOT / "examples" / "ci" / "github-actions.yml"
GITLAB = REPO_ROOT / "examples" / "ci" / "gitlab-ci.yml"
ZTBANK = Path(sys.executable).parent / "ztbank"
STEP_TIMEOUT = 180.0  # one step; `make up` waits at most 30 s for the stack
COMMAND_TIMEOUT = 60.0
TRANSFER = ["--from", "acc-alice-cny", "--to", "acc-bob-cny", "--amount", "1.00"]


def run(argv: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        **kwargs,
    )


# -- 1. onboarding on a fresh stack ------------------------------------------------------------


@dataclass
class OwnStack:
    stack: NativeStack
    policy: Path
    env: dict[str, str]

    def ztbank(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run([str(ZTBANK), *argv], self.env)

    def client(self, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, str(CLIENT), *TRANSFER], self.env | extra)


@pytest.fixture(scope="module")
def own_stack() -> Iterator[OwnStack]:
    root = Path(tempfile.mkdtemp(prefix="ztci", dir="/tmp"))
    try:
        policy = root / "policy.json"
        shutil.copy(REPO_ROOT / "infra" / "policy.json", policy)
        settings = sandbox_settings(root).model_copy(update={"policy": policy})
        stack = NativeStack(settings)
        env = clean_environment() | stack.env
        try:
            stack.up()
            yield OwnStack(stack, policy, env)
        finally:
            stack.down()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def environment_of(own: OwnStack, workload: str) -> dict[str, str]:
    shown = own.ztbank("env", "--workload", workload, "--format", "json")
    assert shown.returncode == 0, shown.stderr
    values: dict[str, str] = json.loads(shown.stdout)
    return values


def test_a_workload_onboarded_in_one_command_transfers_and_is_cut_off_when_removed(
    own_stack: OwnStack,
) -> None:
    own = own_stack
    original_policy = own.policy.read_bytes()
    added = own.ztbank("workload", "add", "my-app", "--team", "payments")
    assert added.returncode == 0, added.stderr
    spiffe_id = "spiffe://ztbank.example/env/prod/zone/az1/team/payments/svc/my-app"
    assert spiffe_id in added.stdout
    assert own.policy.read_bytes() == original_policy  # no rule unless asked

    values = environment_of(own, "my-app")
    settings = own.stack.settings
    assert values["SPIFFE_ENDPOINT_SOCKET"] == f"unix://{settings.workload_socket_for('my-app')}"
    assert values["ZTBANK_GATEWAY_SPIFFE_ID"] == str(GATEWAY.spiffe_id(settings.trust_domain))
    assert values["ZTBANK_TRUST_BUNDLE"] == str(settings.certs_dir / "root-ca.pem")
    assert not any("PRIVATE KEY" in value for value in values.values())
    login = own.ztbank("login", "alice")
    assert login.returncode == 0, login.stderr
    values["ZTBANK_CUSTOMER_TOKEN"] = login.stdout.strip()

    refused = own.client(values)
    assert refused.returncode == 1
    assert "gateway answered 403" in one_line(refused.stderr)

    granted = own.ztbank(
        "workload", "add", "my-app", "--team", "payments", "--may-call", "gateway:/v1/*"
    )
    assert granted.returncode == 0, granted.stderr
    assert "may call gateway * /v1/*" in granted.stdout
    served = own.client(values)
    assert served.returncode == 0, served.stderr
    transfer = json.loads(served.stdout)
    assert transfer["status"] == "posted"
    assert transfer["amount"] == "1.00"

    audit = settings.home / "audit"
    gateway_records = [json.loads(line) for line in (audit / "gateway.jsonl").open()]
    assert any(
        r["caller_spiffe_id"] == spiffe_id
        and r["method"] == "POST /v1/transfers"
        and r["decision"] == "allow"
        for r in gateway_records
    )
    ops = [json.loads(line) for line in (audit / "ops.jsonl").open()]
    assert [r["method"] for r in ops] == ["workload add", "policy grant"]
    assert f"uid {os.getuid()}" in ops[1]["reason"]
    assert "gateway * /v1/*" in ops[1]["reason"]

    listed = own.ztbank("workload", "list", "--json")
    mine = [w for w in json.loads(listed.stdout) if w["name"] == "my-app"]
    assert mine == [
        {
            "name": "my-app",
            "spiffe_id": spiffe_id,
            "selectors": sorted(["ztbank:socket:my-app", f"unix:uid:{os.getuid()}"]),
            "stack": False,
            "may_call": ["gateway * /v1/*"],
        }
    ]

    removed = own.ztbank("workload", "remove", "my-app")
    assert removed.returncode == 0, removed.stderr
    assert f"revoked {spiffe_id}" in removed.stdout
    assert "none unexpired" not in removed.stdout  # the SVID the client used is on the CRLs
    assert own.policy.read_bytes() == original_policy
    cut = own.client(values)
    assert cut.returncode == 1
    assert "no SVID from the Workload API" in one_line(cut.stderr)  # its socket is gone
    assert "my-app" not in own.ztbank("workload", "list").stdout
    gone = own.ztbank("env", "--workload", "my-app")
    assert gone.returncode == 2
    assert "no workload 'my-app'" in one_line(gone.stderr)


def test_an_add_that_cannot_apply_its_rule_leaves_nothing_behind(own_stack: OwnStack) -> None:
    own = own_stack
    original = own.policy.read_bytes()
    own.policy.write_text('{"rules": "not a list"}')
    try:
        failed = own.ztbank(
            "workload", "add", "half-app", "--team", "payments", "--may-call", "gateway:/v1/*"
        )
    finally:
        own.policy.write_bytes(original)
    assert failed.returncode == 1
    assert "the policy file is unusable, nothing was changed" in one_line(failed.stderr)
    assert "half-app" not in own.ztbank("workload", "list").stdout


def test_an_add_whose_change_cannot_be_audited_is_undone(own_stack: OwnStack) -> None:
    own = own_stack
    original = own.policy.read_bytes()
    ops = own.stack.settings.home / "audit" / "ops.jsonl"
    kept = ops.with_name("ops.kept")
    if ops.exists():
        ops.rename(kept)
    ops.mkdir()  # the audit cannot be written
    try:
        failed = own.ztbank(
            "workload", "add", "unaudited", "--team", "payments", "--may-call", "gateway:/v1/*"
        )
    finally:
        ops.rmdir()
        if kept.exists():
            kept.rename(ops)
    assert failed.returncode == 1
    assert "cannot write the audit record" in one_line(failed.stderr)
    assert "unaudited" not in own.ztbank("workload", "list").stdout
    assert own.policy.read_bytes() == original


# -- 2. the CI templates -----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "schema"), [(GITHUB, "github-workflows"), (GITLAB, "gitlab-ci")])
def test_the_templates_validate_against_the_published_schemas(path: Path, schema: str) -> None:
    checked = run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            f"vendor.{schema}",
            str(path),
        ],
        clean_environment(),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


@dataclass
class Workspace:
    """A CI job's working directory, and the marker every process started in it inherits."""

    root: Path
    env: dict[str, str]
    outputs: list[str] = field(default_factory=list)

    @property
    def marker(self) -> bytes:
        return f"ZTBANK_REGISTRY={self.env['ZTBANK_REGISTRY']}".encode()

    def processes(self) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if self.marker in (proc / "environ").read_bytes().split(b"\0"):
                        found.append(int(proc.name))
                except OSError:
                    continue
        return found

    def bash(self, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
            check=False,
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )
        self.outputs.append(f"$ {script}\n{done.stdout}{done.stderr}")
        return done

    def seed_venv(self, venv: Path, checkout: Path) -> None:
        """The cache of ztbank/.venv: this checkout's installed packages, ``services`` from
        ``checkout``, and a stamp newer than the clone so that ``make install`` skips."""
        base = Path(sys._base_executable)  # type: ignore[attr-defined]
        subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
        site = venv / "lib" / "python3.11" / "site-packages"
        installed = Path(sys.executable).parents[1] / "lib" / "python3.11" / "site-packages"
        (site / "ztbank-ci-cache.pth").write_text(f"{checkout}\n{installed}\n")
        script = venv / "bin" / "ztbank"
        script.write_text(
            f"#!{checkout / '.venv' / 'bin' / 'python'}\n"
            "import sys\nfrom services.cli.main import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
        stamp = venv / ".installed"
        stamp.touch()
        later = time.time() + 3600
        os.utime(stamp, (later, later))

    def clean_up(self) -> list[int]:
        """Kill what is left (the test fails on it), and remove the workspace."""
        left = self.processes()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        return left


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix="ztci", dir="/tmp"))
    ports = iter(free_ports(2 * len(SERVICES) + 2))
    registry = root / "ports" / "registry.json"
    write_registry(
        registry, [ServiceAddress(w.name, "127.0.0.1", next(ports), next(ports)) for w in SERVICES]
    )
    base_bin = str(Path(sys._base_executable).parent)  # type: ignore[attr-defined]
    path = [p for p in os.environ["PATH"].split(":") if p != str(Path(sys.executable).parent)]
    env = clean_environment() | {
        "CI": "true",
        "PATH": ":".join([base_bin, *path]),
        "ZTBANK_REGISTRY": str(registry),
        "ZTBANK_ISSUER_HTTP": f"127.0.0.1:{next(ports)}",
        "ZTBANK_CONSOLE_PORT": str(next(ports)),
        # `make down` also stops the compose project when a Docker engine answers: one that
        # has no containers, never the developer's.
        "COMPOSE_PROJECT_NAME": root.name,
    }
    (root / "job").mkdir()
    space = Workspace(root / "job", env)
    try:
        yield space
    finally:
        left = space.clean_up()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left behind: {left}"


def clone(into: Path, env: dict[str, str]) -> None:
    done = run(["git", "clone", "--quiet", str(REPO_ROOT), str(into)], env)
    assert done.returncode == 0, done.stderr


def check_evidence(space: Workspace) -> None:
    evidence = space.root / "ztbank-evidence"
    spiffe_id = "spiffe://ztbank.example/env/prod/zone/az1/team/payments/svc/my-app"
    gateway = (evidence / "audit" / "gateway.jsonl").read_text()
    assert any(
        json.loads(line)["caller_spiffe_id"] == spiffe_id
        and json.loads(line)["method"] == "POST /v1/transfers"
        for line in gateway.splitlines()
    )
    assert "policy grant" in (evidence / "audit" / "ops.jsonl").read_text()
    spans = list((evidence / "telemetry").rglob("*.jsonl"))
    assert any(p.stat().st_size > 0 for p in spans), spans
    assert (evidence / "log" / "gateway.log").stat().st_size > 0
    transcript = "\n".join(space.outputs)
    assert "\x1b" not in transcript, "CI=true: no colours or cursor movement"
    assert not space.processes(), "make down left processes behind"


def test_the_github_actions_steps_run_here(workspace: Workspace) -> None:
    job = yaml.safe_load(GITHUB.read_text())["jobs"]["ztbank"]
    env = workspace.env | {k: str(v) for k, v in job["env"].items()}
    github_env = workspace.root.parent / "github_env"
    github_env.touch()
    env["GITHUB_ENV"] = str(github_env)
    failed = False
    ran = []
    for step in job["steps"]:
        action = step.get("uses", "")
        if action.startswith("actions/checkout") and step.get("with", {}).get("path"):
            clone(workspace.root / step["with"]["path"], env)
        elif action.startswith("actions/cache"):
            venv = workspace.root / step["with"]["path"]
            workspace.seed_venv(venv, venv.parent)
        elif "run" in step:
            if failed and step.get("if") != "always()":
                continue
            assert "${{" not in step["run"], "run lines are executed as written"
            done = workspace.bash(step["run"], env)
            ran.append(step["name"])
            failed = failed or done.returncode != 0
            for line in github_env.read_text().splitlines():  # GitHub's $GITHUB_ENV
                name, _, value = line.partition("=")
                env[name] = value
    transcript = "\n".join(workspace.outputs)
    assert not failed, transcript
    assert len(ran) == 5, ran
    assert '"status": "posted"' in transcript
    check_evidence(workspace)


def test_the_gitlab_ci_steps_run_here(workspace: Workspace) -> None:
    job = yaml.safe_load(GITLAB.read_text())["ztbank-integration"]
    # `git clone --branch` needs a branch: a bare mirror of this repository with one at HEAD
    # (HEAD may be detached, as in a CI clone).
    mirror = workspace.root.parent / "ztbank.git"
    for argv in (
        ["git", "clone", "--quiet", "--bare", str(REPO_ROOT), str(mirror)],
        ["git", "-C", str(mirror), "branch", "--force", "ci-under-test", "HEAD"],
    ):
        done = run(argv, workspace.env)
        assert done.returncode == 0, done.stderr
    env = workspace.env | {k: str(v) for k, v in job["variables"].items()}
    env |= {"ZTBANK_REPOSITORY": str(mirror), "ZTBANK_REF": "ci-under-test"}
    cached = workspace.root / job["cache"]["paths"][0]
    workspace.seed_venv(cached, workspace.root / "ztbank")
    main = workspace.bash("\n".join(job["before_script"] + job["script"]), env)
    after = workspace.bash("\n".join(job["after_script"]), env)
    transcript = "\n".join(workspace.outputs)
    assert main.returncode == 0, transcript
    assert after.returncode == 0, transcript
    assert '"status": "posted"' in transcript
    check_evidence(workspace)
    assert (workspace.root / ".ztbank-venv").is_dir(), "the venv goes back to the cache"


# -- 3. make up that fails, make down that leaves nothing ----------------------------------------


def test_a_failed_make_up_names_the_service_and_leaves_nothing(
    workspace: Workspace,
) -> None:
    checkout = workspace.root / "ztbank"
    clone(checkout, workspace.env)
    workspace.seed_venv(checkout / ".venv", checkout)
    registry = json.loads(Path(workspace.env["ZTBANK_REGISTRY"]).read_text())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", registry["services"][GATEWAY.name]["port"]))
        taken.listen()
        up = workspace.bash("make -C ztbank up MODE=native", workspace.env)
    assert up.returncode != 0
    assert f"{GATEWAY.name} exited during start-up" in up.stderr
    assert str(checkout / "var" / "log" / "gateway.log") in up.stderr
    assert not workspace.processes(), "a failed make up stops what it started"

    # A process whose pid file is gone is stopped all the same.
    up = workspace.bash("make -C ztbank up MODE=native", workspace.env)
    assert up.returncode == 0, up.stderr
    lost = checkout / "var" / "run" / "pids" / "risk.pid"
    lost.unlink()
    down = workspace.bash("make -C ztbank down", workspace.env)
    assert down.returncode == 0, down.stderr
    assert "1 without a pid file" in down.stdout
    assert not workspace.processes(), "make down returns once every process is gone"
    assert "\x1b" not in up.stdout + up.stderr + down.stdout
