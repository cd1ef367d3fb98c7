"""A ceiling on request bodies, answered like every other error (413 problem+json).

FastAPI's own ``max_body_size`` answers an oversized declared ``Content-Length`` in plain text,
whatever the exception handlers say, hence this middleware instead.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.problem import problem, problem_response

# Requests are a few hundred bytes; anything bigger is refused (413) before it is parsed.
MAX_BODY_BYTES = 16 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes
        self._detail = f"request bodies are limited to {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        # isascii: isdigit() alone also holds for "²", which int() refuses.
        if declared.isascii() and declared.isdigit() and int(declared) > self._max_bytes:
            body = problem(413, detail=self._detail, instance=scope["path"])
            await problem_response(body)(scope, receive, send)
            return
        received = 0

        async def receive_within_limit() -> Message:
            # Chunked bodies declare no length: count what actually arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    raise HTTPException(413, detail=self._detail)
            return message

        await self._app(scope, receive_within_limit, send)
