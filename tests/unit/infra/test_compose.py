"""The compose stack, checked statically (``make test-compose`` runs it for real).

compose.yaml, .env, the Dockerfile and the configuration files they mount are read as text and
YAML/JSON; nothing is built or started. ``docker compose config -q`` (or Debian's
``docker-compose`` v1) validates the file against the Compose schema when either is installed.
Here are the promises a run on one machine does not show: pinned images, loopback-only ports,
every dependency with a condition, the settings for Vault, Consul and the collector, which the
offline run here replaces.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.workloads import OPS, SERVICES, TELLER
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_OFFLINE = ROOT / "compose.offline.yaml"
ENV_FILE = ROOT / ".env"
DOCKERFILE = ROOT / "Dockerfile"
BANK_SERVICES = ("gateway", "transfer-engine", "risk")
# The names the services export (OTel instrument name + unit, as the collector's Prometheus
# exporter spells them); the dashboard must show each.
DASHBOARD_METRICS = (
    "svid_expiry_seconds",
    "tls_handshake_duration_seconds",
    "authz_decisions_total",
    "transfer_duration_seconds",
    "revocation_revoked",
    "revocation_fresh",
)

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR; $$ is a literal $.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {raw!r}"
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: bad key"
        assert key not in values, f"{path.name}:{number}: {key} defined twice"
        values[key] = value
    return values


def variables_used(text: str) -> set[str]:
    return {
        m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(text) if not m["escaped"]
    }


def interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        value = env.get(name)
        if op in (":-", "-") and (value is None or (op == ":-" and not value)):
            return arg
        if value is None:
            raise KeyError(name)
        return value

    return _VARIABLE.sub(substitute, text)


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file(ENV_FILE)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def strings_in(node: object) -> Iterator[str]:
    """Every string value of a parsed YAML document (docker compose interpolates values only,
    after parsing: not comments, not keys)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)


def interpolated(node: object, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    return node


@pytest.fixture(scope="module")
def used_variables(raw_compose: dict[str, Any]) -> set[str]:
    """In either compose file: .env serves both."""
    offline = yaml.safe_load(COMPOSE_OFFLINE.read_text())
    documents = (raw_compose, offline)
    return {name for doc in documents for text in strings_in(doc) for name in variables_used(text)}


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """compose.yaml as docker compose sees it: variables from .env substituted."""
    document = interpolated(raw_compose, env)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def is_one_shot(service: dict[str, Any]) -> bool:
    """Jobs that run to completion say so with ``restart: "no"``; every other service is
    long-running and must restart on failure."""
    return service.get("restart") == "no"


def long_running(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    return ((name, s) for name, s in services.items() if not is_one_shot(s))


# -- the compose file ---------------------------------------------------------------------------


def test_compose_parses_with_the_expected_services(raw_compose: dict[str, Any]) -> None:
    assert "version" not in raw_compose  # the Compose Specification has no version key
    expected = {
        "vault", "vault-bootstrap", "consul", "issuer", "entries", "gateway", "transfer-engine",
        "risk", "otel-collector", "jaeger", "prometheus", "grafana", "locust", "e2e",
    }  # fmt: skip
    assert expected <= set(raw_compose["services"])


def test_every_variable_is_defined_in_env_file(
    env: dict[str, str], used_variables: set[str]
) -> None:
    used = used_variables
    assert used, "compose.yaml takes its images and ports from .env"
    assert sorted(used - set(env)) == []


def test_the_env_file_defines_nothing_unused(env: dict[str, str], used_variables: set[str]) -> None:
    # COMPOSE_PROJECT_NAME is read by docker compose itself.
    used = used_variables | {"COMPOSE_PROJECT_NAME"}
    assert sorted(set(env) - used) == []


def test_long_running_services_have_health_checks_and_restart(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in long_running(services):
        check = service.get("healthcheck")
        assert isinstance(check, dict), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        test = check.get("test")
        assert isinstance(test, list), f"{name}: healthcheck test should be a list"
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert len(test) > 1, name
        assert service.get("restart") == "unless-stopped", name


def test_every_dependency_names_a_condition_that_fits(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping of conditions"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert not services[target].get("profiles"), f"{name} depends on a profiled service"
            wanted = (
                "service_completed_successfully"
                if is_one_shot(services[target])
                else "service_healthy"
            )
            assert spec == {"condition": wanted}, f"{name} -> {target}: {spec}"


def test_one_shot_jobs_are_the_expected_ones(services: dict[str, dict[str, Any]]) -> None:
    one_shots = {name for name, s in services.items() if is_one_shot(s)}
    assert one_shots == {
        "vault-bootstrap", "entries", "consul-seed", "healthcheck-bin", "locust", "e2e",
    }  # fmt: skip
    assert services["locust"]["profiles"] == ["load"]
    assert services["e2e"]["profiles"] == ["test"]


def _published(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, str, str, str]]:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the HOST_IP:HOST:CONTAINER string form"
            host_ip, host_port, container_port = port.split(":")
            yield name, host_ip, host_port, container_port


def test_host_ports_are_unique_and_local(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    for name, host_ip, host_port, _ in _published(services):
        assert host_ip == "127.0.0.1", f"{name} publishes on {host_ip}"
        assert host_port.isdigit(), f"{name}: host port {host_port!r}"
        assert host_port not in seen, f"{name} and {seen.get(host_port)} both use {host_port}"
        seen[host_port] = name
    assert {"vault", "consul", "gateway", "grafana", "prometheus", "jaeger"} <= set(seen.values())


def test_host_ports_come_from_env_file() -> None:
    for line in COMPOSE.read_text().splitlines():
        if re.match(r"\s*-\s*\"?127\.0\.0\.1:", line):
            assert re.search(r"127\.0\.0\.1:\$\{[A-Z_]+_PORT\}:\d+", line), line


def _image_tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def test_images_are_pinned(raw_compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert isinstance(image, str), f"{name} has no image"
        tag = _image_tag(image)
        assert tag, f"{name}: image {image} has no tag"
        assert tag != "latest", f"{name}: image {image}"
        raw_image = raw_compose["services"][name]["image"]
        assert re.fullmatch(r"\$\{[A-Z_]+_IMAGE\}", raw_image), f"{name}: image not from .env"


def _bind_sources(service: dict[str, Any]) -> Iterator[str]:
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "use the short SOURCE:TARGET[:MODE] form"
        source = volume.split(":", 1)[0]
        if source.startswith((".", "/", "~")):
            yield source


def test_bind_mounts_and_build_contexts_exist(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        for source in _bind_sources(service):
            assert source.startswith("./"), f"{name}: bind mount {source} outside the repository"
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            checked += 1
        build = service.get("build")
        if build is not None:
            context = ROOT / build["context"]
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    assert checked >= 6


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    assert {"vault-bootstrap", "workload-api"} <= declared


def test_scripts_run_by_the_containers_exist_and_are_executable(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        entrypoint = service.get("entrypoint") or []
        for word in entrypoint[:1]:
            if word.startswith("/app/"):
                script = ROOT / word.removeprefix("/app/")
                assert script.is_file(), f"{name}: {script}"
                assert script.stat().st_mode & 0o111, f"{name}: {script} is not executable"
        if entrypoint[:2] == ["python", "infra/vault/bootstrap.py"]:
            assert (ROOT / entrypoint[1]).is_file()


def test_vault_is_a_real_server(services: dict[str, dict[str, Any]]) -> None:
    vault = services["vault"]
    assert "-dev" not in " ".join(vault.get("command", []))
    assert "IPC_LOCK" in vault["cap_add"]
    config = (ROOT / "infra/vault/vault.hcl").read_text()
    assert 'storage "file"' in config
    bootstrap = services["vault-bootstrap"]
    assert "vault-bootstrap:/vault/bootstrap" in bootstrap["volumes"]
    command = bootstrap["command"]
    for flag, value in (
        ("--vault-addr", "http://vault:8200"),
        ("--init-file", "/vault/bootstrap/init.json"),
        ("--approle-out", "/vault/bootstrap/approle.json"),
    ):
        assert command[command.index(flag) + 1] == value


def test_consul_denies_by_default_with_a_bootstrap_token(
    raw_compose: dict[str, Any], env: dict[str, str]
) -> None:
    config = (ROOT / "infra/consul/server.hcl").read_text()
    assert re.search(r"acl\s*\{[^}]*enabled\s*=\s*true", config)
    assert re.search(r'default_policy\s*=\s*"deny"', config)
    command = " ".join(raw_compose["services"]["consul"]["command"])
    assert "initial_management" in command
    assert "${CONSUL_BOOTSTRAP_TOKEN}" in command
    assert env["CONSUL_BOOTSTRAP_TOKEN"]
    seed = raw_compose["services"]["consul-seed"]
    assert "./infra/policy.json:/seed/policy.json:ro" in seed["volumes"]
    assert "consul kv put ztbank/policy @/seed/policy.json" in seed["command"][0]
    for name in BANK_SERVICES:
        wanted = {"condition": "service_completed_successfully"}
        assert raw_compose["services"][name]["depends_on"]["consul-seed"] == wanted, name


def test_issuer_uses_vault_and_names_itself_as_others_reach_it(
    services: dict[str, dict[str, Any]],
) -> None:
    issuer = services["issuer"]["environment"]
    assert issuer["ZTBANK_UPSTREAM"] == "vault"
    assert issuer["VAULT_ADDR"] == "http://vault:8200"
    assert issuer["ZTBANK_ISSUER_HTTP"] == "issuer:8180"
    for name in BANK_SERVICES:
        environment = services[name]["environment"]
        assert environment["ZTBANK_ISSUER_HTTP"] == "issuer:8180", name
        assert environment["SPIFFE_ENDPOINT_SOCKET"] == issuer["SPIFFE_ENDPOINT_SOCKET"], name
        assert environment["CONSUL_HTTP_ADDR"] == "http://consul:8500", name
        assert environment["CONSUL_HTTP_TOKEN"], name
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318", name
        assert any(v.startswith("workload-api:") for v in services[name]["volumes"]), name


def test_bank_services_run_as_distinct_non_root_uids_matched_by_entries(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    uids = {name: str(services[name]["user"]).split(":")[0] for name in BANK_SERVICES}
    for name, uid in uids.items():
        assert uid.isdigit(), f"{name} runs as {uid!r}: use a numeric uid"
        assert int(uid) != 0, f"{name} runs as root"
    assert len(set(uids.values())) == len(BANK_SERVICES)
    assert str(services["issuer"]["user"]) not in uids.values()
    entries = services["entries"]["environment"]
    assert entries["GATEWAY_UID"] == uids["gateway"]
    assert entries["TRANSFER_ENGINE_UID"] == uids["transfer-engine"]
    assert entries["RISK_UID"] == uids["risk"]
    script = (ROOT / "scripts/compose_entries.sh").read_text()
    for variable in ("GATEWAY_UID", "TRANSFER_ENGINE_UID", "RISK_UID", "TELLER_UID", "OPS_UID"):
        assert f"${{{variable}:?}}" in script
    assert "unix:uid:$3" in script


def test_e2e_harness_switches_to_the_uids_the_entries_register(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The e2e service finds its settings in its environment (tests/e2e/target.py) and is
    attested as each workload by the uid the `entries` job registered for it."""
    e2e_env = services["e2e"]["environment"]
    scrub_environment(monkeypatch)
    for name, value in e2e_env.items():
        monkeypatch.setenv(name, value)
    target = E2ETargetSettings()
    assert (target.stack, target.identity, target.traces) == ("existing", "uid", "jaeger")
    entries = services["entries"]["environment"]
    assert target.uids == {
        "gateway": int(entries["GATEWAY_UID"]),
        "transfer-engine": int(entries["TRANSFER_ENGINE_UID"]),
        "risk": int(entries["RISK_UID"]),
        "teller": int(entries["TELLER_UID"]),
        "ops": int(entries["OPS_UID"]),
    }
    assert set(target.uids) == {w.name for w in (*SERVICES, TELLER, OPS)}
    for name in BANK_SERVICES:
        home = target.service_home.replace("{service}", name)
        assert services[name]["environment"]["ZTBANK_HOME"] == home
        assert f"{name}-data:{home}:ro" in services["e2e"]["volumes"], name
    assert f"issuer-data:{e2e_env['ZTBANK_HOME']}" in services["e2e"]["volumes"]
    assert e2e_env["ZTBANK_HOME"] == services["issuer"]["environment"]["ZTBANK_HOME"]
    assert e2e_env["ZTBANK_REGISTRY"] == services["gateway"]["environment"]["ZTBANK_REGISTRY"]
    for shared in ("SPIFFE_ENDPOINT_SOCKET", "ZTBANK_ISSUER_HTTP", "ZTBANK_TRUST_DOMAIN"):
        assert e2e_env[shared] == services["gateway"]["environment"][shared], shared
    assert target.jaeger_url == "http://jaeger:16686"
    assert "jaeger" in services["e2e"]["depends_on"]


def test_registry_for_compose_names_the_compose_hosts(
    services: dict[str, dict[str, Any]],
) -> None:
    registry_path = services["gateway"]["environment"]["ZTBANK_REGISTRY"]
    registry = json.loads((ROOT / registry_path.removeprefix("/app/")).read_text())
    for name in BANK_SERVICES:
        entry = registry["services"][name]
        assert entry["host"] == name
        check = " ".join(services[name]["healthcheck"]["test"])
        assert f"('{name}', {entry['port']})" in check, f"{name}: health check probes elsewhere"
    gateway_port = registry["services"]["gateway"]["port"]
    assert services["gateway"]["ports"][0].endswith(f":{gateway_port}")


# -- Dockerfile -----------------------------------------------------------------------------


def _stages(text: str) -> list[tuple[str, list[str]]]:
    """(the FROM line, the instructions after it) per stage; continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    stages: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.upper().startswith("FROM "):
            stages.append((stripped, []))
        elif stages:
            stages[-1][1].append(stripped)
    return stages


def test_dockerfile_final_stage_is_non_root_without_compilers() -> None:
    stages = _stages(DOCKERFILE.read_text())
    final_from, final = stages[-1]
    assert final_from.split()[-1] == "runtime"  # the default target is the runtime image
    chain = [final_from.split()[1]]
    by_name = {f.split()[-1]: body for f, body in stages if " AS " in f.upper()}
    while chain[-1] in by_name:  # the stages the final one is built FROM
        parent = next(f for f, _ in stages if f.split()[-1] == chain[-1])
        chain.append(parent.split()[1])
    inherited = [line for name in chain if name in by_name for line in by_name[name]]
    for line in final + inherited:
        assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|cc)\b", line), line
        assert not re.match(r"RUN .*\b(pip|apt-get|apt) install\b", line), line
    users = [line.split()[1] for line in final + inherited if line.upper().startswith("USER ")]
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    assert 'ENTRYPOINT ["ztbank"]' in final
    assert any(line.startswith("COPY --from=builder /opt/venv") for line in final)


def test_dockerfile_builds_with_constraints_and_a_pinned_python() -> None:
    text = DOCKERFILE.read_text()
    assert "pip install -c constraints.txt" in text
    assert "pip wheel --no-deps -w /dist ." in text  # ztbank itself, built once
    assert "pip install --no-deps /dist/*.whl" in text
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.MULTILINE)
    assert default
    tag = _image_tag(default.group(1))
    assert tag
    assert tag.startswith("3.11")
    assert "slim" in tag
    for line in text.splitlines():
        if line.upper().startswith("FROM "):
            image = line.split()[1]
            assert image.startswith("${") or image in {
                "deps", "builder", "base", "load-builder", "test-builder",
            }, line  # fmt: skip


def test_dockerfile_python_matches_env_file(env: dict[str, str]) -> None:
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert default
    assert default.group(1) == env["PYTHON_IMAGE"]


def test_volume_mount_points_belong_to_the_uids_in_env_file(env: dict[str, str]) -> None:
    """A new named volume takes its owner from the image's mount point: the uids in .env must
    be the ones the Dockerfile gives each service's state directory."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    owners = {
        directory: owner
        for owner, directories in re.findall(
            r"install -d -o (\d+) -g \d+ -m \d+ ((?:/var/lib/ztbank/[\w-]+ ?)+)", text
        )
        for directory in directories.split()
    }
    assert owners == {
        "/var/lib/ztbank/issuer": env["ISSUER_UID"],
        "/var/lib/ztbank/certs": env["ISSUER_UID"],  # the offline variant's root CA volume
        "/var/lib/ztbank/gateway": env["GATEWAY_UID"],
        "/var/lib/ztbank/transfer-engine": env["TRANSFER_ENGINE_UID"],
        "/var/lib/ztbank/risk": env["RISK_UID"],
    }


def test_dockerignore_keeps_local_state_out() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**"  # ignore everything, then allow what COPY needs
    allowed_paths = ("!services/", "!infra/", "!loadtest/", "!tests/")
    for allowed in (*allowed_paths, "!constraints.txt", "!pyproject.toml"):
        assert allowed in lines
    for never in ("!.env", "!var/", "!certs/", "!.venv/"):
        assert never not in lines


# -- telemetry configuration --------------------------------------------------------------------


def test_otel_collector_pipelines_use_defined_components() -> None:
    config = yaml.safe_load((ROOT / "infra/otel-collector/config.yaml").read_text())
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {kind} {component} undefined"
    assert "otlp/jaeger" in pipelines["traces"]["exporters"]
    assert config["exporters"]["otlp/jaeger"]["endpoint"] == "jaeger:4317"
    assert "prometheus" in pipelines["metrics"]["exporters"]
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert config["extensions"]["health_check"]["endpoint"].endswith(":13133")
    assert config["service"]["extensions"] == ["health_check"]


def test_prometheus_scrapes_the_collector_exporter() -> None:
    collector = yaml.safe_load((ROOT / "infra/otel-collector/config.yaml").read_text())
    port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert f"otel-collector:{port}" in targets


def test_grafana_provisions_datasources_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    provisioning = ROOT / "infra/grafana/provisioning"
    sources = yaml.safe_load((provisioning / "datasources/datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in sources["datasources"]}
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    assert by_uid["jaeger"]["url"] == "http://jaeger:16686"
    providers = yaml.safe_load((provisioning / "dashboards/dashboards.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert f"./infra/grafana/dashboards:{path}:ro" in services["grafana"]["volumes"]

    dashboards = sorted((ROOT / "infra/grafana/dashboards").glob("*.json"))
    assert dashboards
    dashboard = json.loads(dashboards[0].read_text())
    expressions = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    )
    for metric in DASHBOARD_METRICS:
        assert metric in expressions, metric
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in by_uid, panel["title"]
    assert "decision" in expressions  # allow / deny


# -- the Compose schema, when a compose binary is installed ----------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_OFFLINE], ids=lambda p: p.name)
def test_docker_compose_config_validates(path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` (the compose plugin) nor `docker-compose` is installed;"
            " `apt-get install docker-compose` adds one that validates without a daemon"
        )
    done = subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(path), "--profile", "load",
         "--profile", "test", "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
