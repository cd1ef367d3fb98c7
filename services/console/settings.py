"""The console's settings: the stack it shows (the CLI's settings, with ``console_port``) and
how often it probes.  It listens on 127.0.0.1: it can start labs, so nothing beyond this machine
may reach it.  In its compose job it listens on the container's address instead, and Docker
publishes that port on the host's 127.0.0.1 only (compose.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.stack.native import StackSettings

CONSOLE_HOST = "127.0.0.1"


class ConsoleSettings(StackSettings):
    # How often the services are probed (mTLS handshakes and health checks, like `ztbank status`).
    console_probe_seconds: float = Field(default=2.0, gt=0, le=60)
    console_listen: Literal["127.0.0.1", "0.0.0.0"] = "127.0.0.1"  # noqa: S104 (compose job)
