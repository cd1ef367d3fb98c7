"""Client of the issuer's admin socket, used by the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from services._proto import issuer_admin_pb2 as pb
from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.cli.errors import CliError, UsageError

T = TypeVar("T")
_BAD_INPUT = {Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS}
TIMEOUT = 15.0


def call_admin(socket_path: Path, call: Callable[[IssuerAdminStub], Awaitable[T]]) -> T:
    """Run one admin call; map transport failures to CLI errors with one clear line."""

    async def run() -> T:
        channel = Channel(path=str(socket_path))
        try:
            return await asyncio.wait_for(call(IssuerAdminStub(channel)), TIMEOUT)
        finally:
            channel.close()

    if not socket_path.exists():
        raise CliError(f"the issuer is not running (no admin socket at {socket_path})")
    try:
        return asyncio.run(run())
    except GRPCError as error:
        if error.status in _BAD_INPUT:
            raise UsageError(error.message or error.status.name) from None
        raise CliError(f"issuer refused: {error.message or error.status.name}") from None
    except (OSError, TimeoutError) as error:
        raise CliError(f"cannot reach the issuer at {socket_path}: {error}") from None


__all__ = ["call_admin", "pb"]
