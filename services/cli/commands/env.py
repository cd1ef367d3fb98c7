"""``ztbank env``: what a client of the running stack needs to reach it (docs/ci.md), for a
workload onboarded with ``ztbank workload add`` (services/cli/commands/workload.py): paths and
URLs of the native stack, or, when only a compose project runs, the names a container on its
network sees.  Never key material."""

from __future__ import annotations

import argparse
import json
import shlex

from services.cli.commands.common import Groups, with_stack_settings
from services.cli.commands.workload import UID_SELECTOR, check_label, entries_of, list_entries
from services.cli.errors import CliError, UsageError
from services.common.discovery.registry import FileRegistry
from services.common.identity.workloads import GATEWAY
from services.issuer.domain.revocation import crls_url, ocsp_url
from services.stack.compose import (
    ISSUER_HTTP,
    ISSUER_SERVICE,
    WORKLOAD_API_SOCKET,
    ComposeStack,
    ComposeUsageError,
    Docker,
    open_stack,
)
from services.stack.native import StackSettings, stack_hint, stack_running

FORMATS = ("shell", "dotenv", "json")
COMPOSE_GATEWAY_URL = "https://gateway:8443"  # as a container on the compose network sees it


def client_environment(settings: StackSettings, workload: str | None) -> dict[str, str]:
    """What a client of the running native stack needs: paths and URLs, never key material."""
    if not stack_running(settings.home):
        raise CliError(f"no running stack: {stack_hint(settings.home)}")
    gateway = FileRegistry(settings.registry).lookup(GATEWAY.name)
    values = {
        "ZTBANK_HOME": str(settings.home),
        "ZTBANK_TRUST_DOMAIN": settings.trust_domain,
        "ZTBANK_GATEWAY_URL": f"https://{gateway.host}:{gateway.port}",
        "ZTBANK_GATEWAY_SPIFFE_ID": str(GATEWAY.spiffe_id(settings.trust_domain)),
        "ZTBANK_TRUST_BUNDLE": str(settings.certs_dir / "root-ca.pem"),
        "ZTBANK_CRL_URL": crls_url(settings.issuer_url),
        "ZTBANK_OCSP_URL": ocsp_url(settings.issuer_url),
    }
    if workload is not None:
        check_label("--workload", workload)
        entries = entries_of(list_entries(settings), workload)
        if not entries:
            raise UsageError(
                f"no workload {workload!r} on this stack; onboard it with"
                f" `ztbank workload add {workload} --team TEAM`"
            )
        own_socket = any(f"ztbank:socket:{workload}" in e.selectors for e in entries)
        values["SPIFFE_ENDPOINT_SOCKET"] = (
            f"unix://{settings.workload_socket_for(workload)}"
            if own_socket
            else settings.default_workload_endpoint
        )
        values["ZTBANK_WORKLOAD_SPIFFE_ID"] = entries[0].spiffe_id
    return values


def running_compose_stack() -> ComposeStack | None:
    """The compose project (``COMPOSE_PROJECT_NAME``, else ``.env``'s) if it has containers;
    None without a Docker engine or a compose tool."""
    docker = Docker()
    if not docker.engine_answers():
        return None
    try:
        stack = open_stack(docker, "no")
    except ComposeUsageError:
        return None
    return None if stack.file_in_use() is None else stack


def compose_environment(stack: ComposeStack, workload: str | None) -> dict[str, str]:
    """What a client container on the compose network needs, as names seen from inside it
    (docs/ci.md). No trust bundle file: the ``ca`` volume also holds the root's key, so the
    client takes the bundle that comes with its SVID from the Workload API."""
    ready = {state.service for state in stack.states() if state.ready}
    missing = [name for name in (ISSUER_SERVICE, GATEWAY.name) if name not in ready]
    if missing:
        raise CliError(
            f"compose project {stack.project}: {', '.join(missing)} not ready (make status)"
        )
    trust_domain = stack.settings()["ZTBANK_TRUST_DOMAIN"]
    values = {
        "ZTBANK_TRUST_DOMAIN": trust_domain,
        "ZTBANK_GATEWAY_URL": COMPOSE_GATEWAY_URL,
        "ZTBANK_GATEWAY_SPIFFE_ID": str(GATEWAY.spiffe_id(trust_domain)),
        "ZTBANK_CRL_URL": crls_url(f"http://{ISSUER_HTTP}"),
        "ZTBANK_OCSP_URL": ocsp_url(f"http://{ISSUER_HTTP}"),
        "ZTBANK_COMPOSE_NETWORK": f"{stack.project}_default",
        "ZTBANK_WORKLOAD_API_VOLUME": f"{stack.project}_workload-api",
    }
    if workload is not None:
        check_label("--workload", workload)
        listed = stack.compose("exec", "-T", ISSUER_SERVICE, "ztbank", "workload", "list", "--json")
        try:
            if listed.returncode != 0:
                raise ValueError(f"exit code {listed.returncode}")
            rows = [row for row in json.loads(listed.stdout) if row["name"] == workload]
        except (ValueError, TypeError, KeyError) as error:
            raise CliError(
                f"`ztbank workload list` failed in {stack.project}'s issuer container: {error}"
            ) from None
        if not rows:
            raise UsageError(
                f"no workload {workload!r} on compose project {stack.project}; onboard it in the"
                f" issuer's container: `ztbank workload add {workload} --team TEAM --uid UID`"
            )
        values["SPIFFE_ENDPOINT_SOCKET"] = WORKLOAD_API_SOCKET
        values["ZTBANK_WORKLOAD_SPIFFE_ID"] = rows[0]["spiffe_id"]
        uids = [s.removeprefix(UID_SELECTOR) for s in rows[0]["selectors"]]
        if uid := next((u for u in uids if u.isdigit()), None):
            values["ZTBANK_WORKLOAD_UID"] = uid  # the container's --user
    return values


def format_environment(values: dict[str, str], style: str) -> str:
    if style == "json":
        return json.dumps(values, indent=2)
    for name, value in values.items():
        if "\n" in value:  # one variable a line in every format
            raise CliError(f"{name} holds a line break; it cannot be printed as {style}")
    if style == "dotenv":
        # Unquoted: GitHub's $GITHUB_ENV and GitLab's dotenv reports take the value verbatim.
        return "\n".join(f"{name}={value}" for name, value in values.items())
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in values.items())


def cmd_env(args: argparse.Namespace, settings: StackSettings) -> int:
    compose = None if stack_running(settings.home) else running_compose_stack()
    values = (
        compose_environment(compose, args.workload)
        if compose is not None
        else client_environment(settings, args.workload)
    )
    print(format_environment(values, args.format))
    return 0


def register(groups: Groups) -> None:
    """``env`` on the ``ztbank`` parser; its handler gets the stack's settings."""
    env = groups.add_parser(
        "env", help='what a client needs for the running stack, e.g. eval "$(ztbank env ...)"'
    )
    env.add_argument("--workload", help="add its Workload API socket (SPIFFE_ENDPOINT_SOCKET)")
    env.add_argument("--format", choices=FORMATS, default="shell")
    env.set_defaults(handler=with_stack_settings(cmd_env))
