"""The console's settings: the stack it shows (the CLI's settings, with ``console_port``) and
how often it probes.  It always listens on 127.0.0.1: it can start labs, so nothing beyond this
machine may reach it."""

from __future__ import annotations

from pydantic import Field

from services.stack.native import StackSettings

CONSOLE_HOST = "127.0.0.1"


class ConsoleSettings(StackSettings):
    # How often the services are probed (mTLS handshakes and health checks, like `ztbank status`).
    console_probe_seconds: float = Field(default=2.0, gt=0, le=60)
