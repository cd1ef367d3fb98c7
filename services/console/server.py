"""``ztbank console``: the console's app under uvicorn on 127.0.0.1."""

from __future__ import annotations

import os

import uvicorn

from services.common.audit import AuditLog
from services.console.app import Console, create_console_app
from services.console.settings import CONSOLE_HOST, ConsoleSettings
from services.console.state import StackView

# Open event streams would hold a shutdown for ever: they are cut after this.
SHUTDOWN_GRACE_SECONDS = 2


def build_console(settings: ConsoleSettings) -> tuple[Console, AuditLog]:
    """The console of the stack ``settings`` name; labs run as ``ztbank lab NAME`` with that
    stack's environment (the CLI is the one list of labs)."""
    from services.cli.main import lab_descriptions  # the CLI imports this module

    view = StackView(settings)
    audit = AuditLog(settings.home / "audit" / "console.jsonl")
    lab_env = {**os.environ, **view.stack.env}
    return Console(settings, view, audit, dict(lab_descriptions()), lab_env), audit


def serve_console(settings: ConsoleSettings) -> None:
    """Serve until interrupted; lab starts are audited in ``$ZTBANK_HOME/audit/console.jsonl``."""
    console, audit = build_console(settings)
    try:
        config = uvicorn.Config(
            create_console_app(console),
            host=CONSOLE_HOST,
            port=settings.console_port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
        uvicorn.Server(config).run()
    finally:
        audit.close()
