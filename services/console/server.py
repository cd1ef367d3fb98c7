"""``ztbank console``: the console's app under uvicorn on 127.0.0.1 (see ``settings``)."""

from __future__ import annotations

import os
import socket

import uvicorn

from services.common.authz.audit import AuditLog
from services.console.app import Console, create_console_app
from services.console.settings import ConsoleSettings
from services.console.state import StackView
from services.labs.registry import LABS

# A response still open at shutdown (not an event stream: those are ended) is cut after this.
SHUTDOWN_GRACE_SECONDS = 2


class ConsoleServer(uvicorn.Server):
    """uvicorn, ending the pages' event streams first when it shuts down (it waits for open
    responses to end, and an event stream never does by itself)."""

    def __init__(self, config: uvicorn.Config, console: Console) -> None:
        super().__init__(config)
        self._console = console

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._console.events.close()
        await super().shutdown(sockets)


def build_console(settings: ConsoleSettings) -> tuple[Console, AuditLog]:
    """The console of the stack ``settings`` name; it offers the labs of the registry, each run
    as ``ztbank lab NAME`` with that stack's environment."""
    view = StackView(settings)
    audit = AuditLog(settings.home / "audit" / "console.jsonl")
    lab_env = {**os.environ, **view.stack.env}
    labs = {lab.name: lab.summary for lab in LABS}
    return Console(settings, view, audit, labs, lab_env), audit


def serve_console(settings: ConsoleSettings) -> None:
    """Serve until interrupted; lab starts are audited in ``$ZTBANK_HOME/audit/console.jsonl``."""
    console, audit = build_console(settings)
    try:
        config = uvicorn.Config(
            create_console_app(console),
            host=settings.console_listen,
            port=settings.console_port,
            log_level="warning",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
        ConsoleServer(config, console).run()
    finally:
        audit.close()
