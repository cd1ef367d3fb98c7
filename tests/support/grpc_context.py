"""A stand-in for the servicer context of grpc.aio, for servicer unit tests: ``abort`` raises
``AbortedError`` carrying what a client would see (status, details, trailers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import grpc


class AbortedError(Exception):
    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


class FakeServicerContext:
    async def abort(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> NoReturn:
        raise AbortedError(code, details, trailing_metadata)
