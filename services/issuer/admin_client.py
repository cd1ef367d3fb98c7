"""Client of the issuer's admin socket (CLI, local stack, benchmarks)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from services._proto.issuer_admin_grpc import IssuerAdminStub
from services.issuer.errors import IssuerError

T = TypeVar("T")
_BAD_INPUT = {Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS}
TIMEOUT = 15.0


class AdminCallError(IssuerError):
    """An admin call failed; ``bad_input`` when the issuer refused what was asked."""

    def __init__(self, message: str, *, bad_input: bool) -> None:
        super().__init__(message)
        self.bad_input = bad_input


def call_admin(socket_path: Path, call: Callable[[IssuerAdminStub], Awaitable[T]]) -> T:
    """Run one admin call with a deadline; failures become one clear AdminCallError."""

    async def run() -> T:
        channel = Channel(path=str(socket_path))
        try:
            return await asyncio.wait_for(call(IssuerAdminStub(channel)), TIMEOUT)
        finally:
            channel.close()

    try:
        if not socket_path.exists():
            raise AdminCallError(
                f"the issuer is not running (no admin socket at {socket_path})", bad_input=False
            )
        return asyncio.run(run())
    except GRPCError as error:
        message = error.message or error.status.name
        if error.status in _BAD_INPUT:
            raise AdminCallError(message, bad_input=True) from None
        raise AdminCallError(f"issuer refused: {message}", bad_input=False) from None
    except (OSError, TimeoutError) as error:
        raise AdminCallError(
            f"cannot reach the issuer at {socket_path}: {error}", bad_input=False
        ) from None
