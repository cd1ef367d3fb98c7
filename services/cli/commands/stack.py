"""``ztbank up|console|down|reset|status|health``: the native stack (services/stack/native.py)
as one command each, the lab console served beside it, and one service's own word on its
health (what a container's health check runs)."""

from __future__ import annotations

import argparse
import json
import signal
import socket
from types import FrameType

from services.cli.commands.common import Groups, stack_settings
from services.cli.errors import CliError, UsageError
from services.common.identity.workloads import SERVICES
from services.common.runtime.health import (
    HealthUnavailableError,
    Probe,
    health_socket,
    read_health,
)
from services.stack.native import (
    NativeStack,
    SettingsConflictError,
    StackError,
    StackStatus,
    console_pid_file,
    locate_settings,
    stack_healthy,
    status_document,
)


def _print_status(status: StackStatus) -> None:
    print(f"trust domain {status.trust_domain}  root CA {status.root_ca}")
    running = "running" if status.issuer_running else "stopped"
    print(f"{'issuer':<16} {running}, Workload API {status.issuer_socket}")
    print(f"{'':<16} CRLs {status.issuer_crl_url}  OCSP {status.issuer_ocsp_url}")
    if (authority := status.issuer_authority) is not None:
        print(
            f"{'':<16} signing CA {authority.active_ca_serial} until"
            f" {authority.active_ca_not_after} ({authority.upstream} upstream),"
            f" {authority.entries} entries, CRL #{authority.crl_number},"
            f" {authority.revoked_certificates} certificates and"
            f" {len(authority.revoked_spiffe_ids)} SPIFFE IDs revoked"
        )
        if authority.ca_chain:
            chain = " <- ".join(f"{c['subject']} ({c['serial'][:8]}…)" for c in authority.ca_chain)
            print(f"{'':<16} chain {chain}")
        if authority.upstream_error:
            print(f"{'':<16} UPSTREAM FAILING: {authority.upstream_error}")
    if (vault := status.vault) is not None:
        version = f" ({vault.version})" if vault.version else ""
        process = "" if vault.running else ", not running"
        print(f"{'vault':<16} {vault.address:<24} {vault.state}{version}{process}  log {vault.log}")
    for name, probe in status.services.items():
        if probe.healthy:
            health = "healthy"
        elif probe.ready is False:
            health = f"NOT READY ({probe.error})"
        else:
            health = f"DOWN ({probe.error})"
        serial = (
            f"svid {probe.svid_serial} until {probe.svid_not_after}" if probe.svid_serial else ""
        )
        print(f"{name:<16} {probe.url:<24} {health}  {probe.spiffe_id}  {serial}")


def cmd_up(args: argparse.Namespace) -> int:
    """Exit 2 when asked for settings other than the running stack's (nothing is changed), 1
    when a part of the stack fails to start (what this call started is stopped again)."""
    stack = NativeStack(stack_settings(args))
    try:
        status = stack.up()
    except SettingsConflictError as error:
        raise UsageError(str(error)) from None
    except StackError as error:
        raise CliError(str(error)) from None
    _print_status(status)
    print(f"logs in {stack.settings.home / 'log'}; `make down` stops everything")
    print(f"lab console: `make console`, then open {stack.settings.console_url}")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from services.console.server import serve_console  # FastAPI: only for this command
    from services.console.settings import CONSOLE_HOST, ConsoleSettings

    overrides = {"trust_domain": args.trust_domain} if args.trust_domain else {}
    settings = locate_settings(ConsoleSettings, **overrides)
    with socket.socket() as probe:
        # As uvicorn binds: connections of a console just stopped (TIME_WAIT) are no console.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((CONSOLE_HOST, settings.console_port))
        except OSError as error:
            raise CliError(
                f"cannot listen on {CONSOLE_HOST}:{settings.console_port} ({error.strerror});"
                " is a console already running? (ZTBANK_CONSOLE_PORT picks another port)"
            ) from None
    print(
        f"lab console on {settings.console_url} for the stack in {settings.home} (Ctrl-C stops it)",
        flush=True,
    )
    # `make down` finds the console by its pid file and stops it with SIGTERM: a normal end,
    # with the pid file removed and the audit log closed (uvicorn shuts down gracefully first,
    # then raises the signal again, which would end the process before any of that).
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        with console_pid_file(settings, settings.console_port):
            serve_console(settings)
    except SystemExit as stop:
        if stop.code != 0:
            raise
        print("lab console stopped", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def cmd_down(args: argparse.Namespace) -> int:
    stopped = NativeStack(stack_settings(args)).down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    stack = NativeStack(stack_settings(args))
    stack.reset()
    print(f"stopped everything and wiped {stack.settings.home} (certs kept)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = NativeStack(stack_settings(args)).status()
    if args.json:
        print(json.dumps(status_document(status), indent=2))
    else:
        _print_status(status)
    return 0 if stack_healthy(status) else 1


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the service is ready (or live, with --live), 1 with its reasons when not."""
    settings = stack_settings(args)
    path = health_socket(settings.home_of(args.service), args.service)
    probe: Probe = "livez" if args.live else "readyz"
    try:
        answer = read_health(path, probe)
    except HealthUnavailableError as error:
        raise CliError(f"{args.service}: {error}: is it running?") from None
    status = answer.document(args.service, probe)["status"]
    print(f"{args.service}: {status}" + "".join(f"\n  {reason}" for reason in answer.reasons))
    return 0 if answer.ok else 1


# -- the parser -------------------------------------------------------------------------------


def register(groups: Groups) -> None:
    """``up``, ``console``, ``down``, ``reset`` and ``status`` on the ``ztbank`` parser."""
    for name, handler, text in (
        ("up", cmd_up, "start the native stack in the background and wait until healthy"),
        ("console", cmd_console, "serve the live lab console on 127.0.0.1 (ZTBANK_CONSOLE_PORT)"),
        ("down", cmd_down, "stop every process `up` started, and the consoles (state is kept)"),
        ("reset", cmd_reset, "stop everything and wipe ZTBANK_HOME (balances, history, entries)"),
    ):
        groups.add_parser(name, help=text).set_defaults(handler=handler)
    up = groups.choices["up"]
    up.add_argument(
        "--upstream",
        choices=("disk", "vault"),
        help="who signs the issuer's CA: the root in certs/ (default) or a local Vault (OpenBao)",
    )
    status = groups.add_parser("status", help="trust domain, issuer and each service's SVID/health")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
    health = groups.add_parser(
        "health",
        help="a service's own readiness (or liveness) and its reasons, from its local socket",
    )
    health.add_argument("service", choices=[workload.name for workload in SERVICES])
    health.add_argument("--live", action="store_true", help="liveness instead of readiness")
    health.set_defaults(handler=cmd_health)
