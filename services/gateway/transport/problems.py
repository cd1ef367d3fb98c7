"""The one place where errors become HTTP: every failure leaves as ``application/problem+json``.

Gateway errors map by class; FastAPI's validation errors and Starlette's own 404/405/400/413 are
rewritten in the same shape; anything unexpected is a bare 500 problem, never a traceback.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from services.common.problem import problem, problem_response
from services.gateway.errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EngineError,
    EngineUnavailableError,
    GatewayError,
    InvalidRequestError,
    InvalidTokenError,
    NotFoundError,
    PermissionDeniedError,
    UnknownCustomerError,
)
from services.gateway.transport.schemas import FieldError, ValidationProblem

logger = logging.getLogger(__name__)

# Problem types are identifiers, not links (RFC 9457 lets type URIs be non-resolvable): a
# "tag:" URI (RFC 4151) is absolute and stable, and no client will try to fetch it.
TYPE_PREFIX = "tag:ztbank.example,2026:problem:"
REALM = "ztbank-gateway"
RETRY_AFTER_SECONDS = 2

# class -> (status, type slug, title).  Looked up along the MRO, so subclasses inherit.
_KINDS: dict[type[GatewayError], tuple[int, str, str]] = {
    AuthenticationError: (401, "unauthenticated", "Customer token missing or invalid"),
    PermissionDeniedError: (403, "forbidden", "Not allowed"),
    BadRequestError: (400, "bad-request", "Bad request"),
    InvalidRequestError: (422, "invalid-request", "Request cannot be carried out"),
    UnknownCustomerError: (422, "unknown-customer", "Unknown customer"),
    NotFoundError: (404, "not-found", "Not found"),
    ConflictError: (409, "conflict", "Conflicts with an earlier request"),
    EngineUnavailableError: (503, "engine-unavailable", "Transfer engine unavailable"),
    EngineError: (502, "engine-error", "Transfer engine error"),
}


def problem_type(slug: str) -> str:
    return TYPE_PREFIX + slug


def _kind(error: GatewayError) -> tuple[int, str, str] | None:
    for cls in type(error).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def _headers(error: GatewayError) -> dict[str, str]:
    if isinstance(error, InvalidTokenError):
        # RFC 6750 section 3: the error code only when a token was presented.
        return {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'}
    if isinstance(error, AuthenticationError):
        return {"WWW-Authenticate": f'Bearer realm="{REALM}"'}
    if isinstance(error, EngineUnavailableError):
        return {"Retry-After": str(error.retry_after_seconds or RETRY_AFTER_SECONDS)}
    return {}


async def _gateway_error(request: Request, error: GatewayError) -> Response:
    kind = _kind(error)
    if kind is None:
        # A root GatewayError (or a subclass nobody mapped) is our bug, not the caller's; it is
        # handled here, so nothing further up logs it.
        logger.error("unmapped %s on %s", type(error).__name__, request.url.path, exc_info=error)
        return await _unexpected(request, error)
    status, slug, title = kind
    body = problem(
        status,
        type_=problem_type(slug),
        title=title,
        detail=str(error) or None,
        instance=request.url.path,
    )
    return problem_response(body, _headers(error))


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    # The offending input is not echoed back: it may be large, or a secret sent by mistake.
    errors = [
        FieldError(
            location=list(item["loc"]),
            message=str(item["msg"]).removeprefix("Value error, "),
            type=item["type"],
        )
        for item in error.errors()
    ]
    body = ValidationProblem(
        type=problem_type("validation"),
        title="Request validation failed",
        status=422,
        detail="; ".join(
            f"{'.'.join(str(part) for part in item.location)}: {item.message}" for item in errors
        ),
        instance=request.url.path,
        errors=errors,
    )
    return problem_response(body)


async def _http_error(request: Request, error: HTTPException) -> Response:
    phrase = HTTPStatus(error.status_code).phrase
    detail = error.detail if error.detail != phrase else None
    body = problem(error.status_code, detail=detail, instance=request.url.path)
    return problem_response(body, error.headers)


async def _unexpected(request: Request, error: Exception) -> Response:
    return problem_response(problem(500, instance=request.url.path))


def install_problem_handlers(app: FastAPI) -> None:
    app.exception_handler(GatewayError)(_gateway_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(HTTPException)(_http_error)
    # Starlette's ServerErrorMiddleware sends this, then re-raises for the server to log.
    app.exception_handler(Exception)(_unexpected)
