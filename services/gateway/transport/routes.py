"""The gateway's REST API.  Handlers only translate: HTTP in -> domain call -> JSON out.

Handlers are coroutines: the transfer-engine client is grpc.aio on the server's event loop, so
no request waits for a worker thread.  No ``from __future__ import annotations`` here: FastAPI
must evaluate the annotations that name the dependencies local to ``create_router``.
"""

import re
from collections.abc import Callable
from datetime import date
from typing import Annotated, Any, Literal, Protocol, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator

from services.common.identity.spiffe_id import SpiffeId
from services.common.mtls.peer import current_peer
from services.common.problem import Problem, openapi_problem, problem, problem_response
from services.common.runtime.health import HealthAnswer
from services.gateway.domain.banking import MAX_IDEMPOTENCY_KEY_LENGTH, Banking
from services.gateway.domain.ledger import Transfer, TransferStatus
from services.gateway.domain.tokens import CustomerTokens
from services.gateway.errors import MissingTokenError, PermissionDeniedError
from services.gateway.route_table import (
    CREATE_TRANSFER,
    GET_ACCOUNT,
    GET_TRANSFER,
    ISSUE_TOKEN,
    LIST_ACCOUNTS,
    LIST_TRANSACTIONS,
)
from services.gateway.transport.limits import MAX_BODY_BYTES
from services.gateway.transport.problems import problem_type
from services.gateway.transport.schemas import (
    RESOURCE_ID_PATTERN,
    AccountList,
    AccountOut,
    Health,
    RejectedTransferProblem,
    TokenRequest,
    TokenResponse,
    TransactionList,
    TransactionOut,
    TransferOut,
    TransferRequest,
    ValidationProblem,
)

IDEMPOTENCY_HEADER = "Idempotency-Key"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
# OpenAPI: the customer token, as fastapi.security.HTTPBearer would document it.
BEARER_SCHEME: dict[str, Any] = {
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": f"customer access token from {ISSUE_TOKEN.name}",
    }
}
SECURED: dict[str, Any] = {"security": [{"HTTPBearer": []}]}
REPLAYED_HEADER = "Idempotent-Replayed"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _iso_day(value: object) -> object:
    # date.fromisoformat alone would also take "20240101" and "2024-W01-1", and pydantic's date
    # would take a unix timestamp: only the documented YYYY-MM-DD gets through.
    if not isinstance(value, str) or not _DAY.fullmatch(value):
        raise ValueError("expected a date as YYYY-MM-DD")
    return date.fromisoformat(value)


IsoDay = Annotated[date, BeforeValidator(_iso_day)]
AccountId = Annotated[str, Path(pattern=RESOURCE_ID_PATTERN)]
TransferId = Annotated[str, Path(pattern=RESOURCE_ID_PATTERN)]

Responses = dict[int | str, dict[str, Any]]
Refusals = dict[int, tuple[str, tuple[type[Problem], ...]]]

# Answered in front of every route: the policy check and the load shedding of the mTLS server
# (services.common.mtls.https), the body limit (transport.limits).  Merged into each operation's
# own refusals, so the schema lists every status a client can get.
_IN_FRONT: dict[int, str] = {
    403: "the caller's SPIFFE ID is not allowed this request (policy)",
    413: f"the request body is larger than {MAX_BODY_BYTES} bytes",
    503: "the gateway has too many requests in flight; retry after Retry-After seconds",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "the Bearer challenge (RFC 6750)",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    503: {
        "Retry-After": {
            "description": "seconds to wait before retrying",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}
_INVALID = (ValidationProblem, Problem)


def _refusals(own: Refusals, *, policy: bool = True) -> Responses:
    """``own`` plus what is answered in front of every route (``policy``: the 403 of the policy,
    which never refuses health checks), as problem+json responses."""
    merged = {status: (description, models) for status, (description, models) in own.items()}
    for status, description in _IN_FRONT.items():
        if status == 403 and not policy:
            continue
        if status in merged:
            first, models = merged[status]
            merged[status] = (f"{first}; or {description}", models)
        else:
            merged[status] = (description, ())
    responses: Responses = {}
    for status, (description, models) in sorted(merged.items()):
        responses[status] = openapi_problem(status, description, *models)
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    return responses


_ENGINE: Refusals = {
    502: ("the transfer-engine failed", ()),
    503: ("the transfer-engine is unavailable; retry after Retry-After seconds", ()),
}
_UNAUTHENTICATED: Refusals = {401: ("customer token missing, invalid or expired", ())}
# FastAPI's own answer to a body it cannot read as text (not UTF-8), before any validation.
_UNREADABLE_BODY = "the body is not UTF-8 text"
# A path whose ID holds an encoded "/" is another path: 404 from the router.
_NO_ROUTE = "no route for this path (an ID with a '/' in it)"
_ACCOUNT_REFUSALS: Refusals = {
    403: ("not one of the customer's accounts", ()),
    404: (_NO_ROUTE, ()),
    422: ("the request is invalid", _INVALID),
}
_TRANSFER_REFUSALS: Refusals = {
    403: ("not one of the customer's transfers", ()),
    404: (f"no such transfer, or {_NO_ROUTE}", ()),
    422: ("the request is invalid", _INVALID),
}
_CREATED_HEADERS: dict[str, Any] = {
    "Location": {
        "description": "the transfer's URL",
        "required": True,
        "schema": {"type": "string"},
    },
    REPLAYED_HEADER: {
        "description": "true when this is the stored answer to an earlier request with this key",
        "schema": {"type": "string", "enum": ["true"]},
    },
}


def _transfer_response(transfer: Transfer, instance: str) -> Response:
    """Posted 201, held 202, rejected 422: the same for the first answer and every replay."""
    body = TransferOut.of(transfer)
    headers = {REPLAYED_HEADER: "true"} if transfer.replayed else {}
    if transfer.status is TransferStatus.REJECTED:
        reasons = list(transfer.risk.reasons) if transfer.risk else []
        if transfer.rejection_reason and transfer.rejection_reason not in reasons:
            reasons.insert(0, transfer.rejection_reason)
        rejected = RejectedTransferProblem(
            type=problem_type("transfer-rejected"),
            title="Transfer rejected",
            status=422,
            detail="the transfer was rejected; nothing was moved"
            + (f" ({', '.join(reasons)})" if reasons else ""),
            instance=instance,
            transfer_id=transfer.id,
            reasons=reasons,
            transfer=body,
        )
        return problem_response(rejected, headers)
    status = 201 if transfer.status is TransferStatus.POSTED else 202
    headers["Location"] = instance
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


class HealthReport(Protocol):
    """The service's own liveness and readiness (``services.common.runtime.health``)."""

    def liveness(self) -> HealthAnswer: ...

    def readiness(self) -> HealthAnswer: ...


_NOT_LIVE: Refusals = {503: ("not live: the gateway's event loop has stalled (reasons)", ())}
_NOT_READY: Refusals = {503: ("not ready: the gateway would refuse work (reasons)", ())}


def _health_response(answer: HealthAnswer, good: Literal["live", "ready"], bad: str) -> Response:
    if answer.ok:
        return JSONResponse(Health(status=good).model_dump())
    return problem_response(
        problem(
            503,
            type_=problem_type(bad.replace(" ", "-")),
            title=bad.capitalize(),
            detail="; ".join(answer.reasons),
            reasons=list(answer.reasons),
        )
    )


def create_router(
    *, banking: Banking, tokens: CustomerTokens, teller_id: SpiffeId, health: HealthReport
) -> APIRouter:
    router = APIRouter()

    def customer_read(path: str, tag: str, refusals: Refusals) -> Callable[[Endpoint], Endpoint]:
        """GET of a customer's own data: bearer token documented, with ``refusals`` and those
        every customer read shares."""
        responses = _refusals({**_UNAUTHENTICATED, **refusals, **_ENGINE})
        return router.get(path, tags=[tag], responses=responses, openapi_extra=SECURED)

    async def authenticated_customer(request: Request) -> str:
        # The header is read here rather than through fastapi.security.HTTPBearer: a nested
        # dependency cost a third of the dependency solving on every request.  The scheme is
        # documented by hand (BEARER_SCHEME, SECURED).
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise MissingTokenError("an Authorization: Bearer token is required")
        return tokens.verify(token)

    async def teller_only() -> None:
        caller = current_peer().spiffe_id
        if caller != teller_id:
            raise PermissionDeniedError(f"only the teller may obtain customer tokens, not {caller}")

    async def livez() -> Response:
        return _health_response(health.liveness(), "live", "not live")

    async def readyz() -> Response:
        return _health_response(health.readiness(), "ready", "not ready")

    # /healthz answers as /readyz, for the probes written before the two were apart.
    for path, probe, not_ok in (
        ("/livez", livez, _NOT_LIVE),
        ("/readyz", readyz, _NOT_READY),
        ("/healthz", readyz, _NOT_READY),
    ):
        responses = _refusals(not_ok, policy=False)
        router.get(path, tags=["health"], response_model=Health, responses=responses)(probe)

    @router.post(
        ISSUE_TOKEN.path,
        status_code=201,
        tags=["tokens"],
        summary="Issue a customer access token (teller only)",
        dependencies=[Depends(teller_only)],
        responses=_refusals(
            {
                400: (_UNREADABLE_BODY, ()),
                403: ("the caller is not the teller", ()),
                422: ("invalid request (a body not in JSON too) or unknown customer", _INVALID),
                **_ENGINE,
            }
        ),
    )
    async def issue_token(body: TokenRequest, response: Response) -> TokenResponse:
        issued = await tokens.issue(body.customer)
        # RFC 6749 section 5.1: responses carrying tokens must not be cached.
        response.headers["Cache-Control"] = "no-store"
        return TokenResponse(access_token=issued.access_token, expires_in=issued.expires_in)

    @customer_read(LIST_ACCOUNTS.path, "accounts", {})
    async def list_accounts(
        customer: Annotated[str, Depends(authenticated_customer)],
    ) -> AccountList:
        accounts = await banking.accounts(customer)
        return AccountList(accounts=[AccountOut.of(account) for account in accounts])

    @customer_read(GET_ACCOUNT.path, "accounts", _ACCOUNT_REFUSALS)
    async def get_account(
        customer: Annotated[str, Depends(authenticated_customer)], account_id: AccountId
    ) -> AccountOut:
        return AccountOut.of(await banking.account(customer, account_id))

    @customer_read(LIST_TRANSACTIONS.path, "accounts", _ACCOUNT_REFUSALS)
    async def list_transactions(
        customer: Annotated[str, Depends(authenticated_customer)],
        account_id: AccountId,
        from_date: Annotated[
            IsoDay | None,
            Query(alias="from", description="only transactions on or after this UTC day"),
        ] = None,
    ) -> TransactionList:
        transactions = await banking.transactions(customer, account_id, from_date)
        return TransactionList(transactions=[TransactionOut.of(t) for t in transactions])

    @router.post(
        CREATE_TRANSFER.path,
        status_code=201,
        tags=["transfers"],
        summary="Move money from one of the customer's accounts",
        response_model=TransferOut,
        responses={
            201: {"description": "posted: the money moved", "headers": _CREATED_HEADERS},
            202: {
                "model": TransferOut,
                "description": "held for review: nothing moved yet",
                "headers": _CREATED_HEADERS,
            },
            **_refusals(
                {
                    400: (f"Idempotency-Key header missing or invalid, or {_UNREADABLE_BODY}", ()),
                    **_UNAUTHENTICATED,
                    403: ("from_account is not one of the customer's accounts", ()),
                    404: ("to_account does not exist", ()),
                    409: ("Idempotency-Key already used for a different transfer", ()),
                    422: (
                        "rejected (insufficient funds, risk; nothing moved) or invalid request"
                        " (a body that is not JSON too)",
                        (RejectedTransferProblem, *_INVALID),
                    ),
                    **_ENGINE,
                }
            ),
        },
        openapi_extra={
            **SECURED,
            "parameters": [
                {
                    "name": IDEMPOTENCY_HEADER,
                    "in": "header",
                    "required": True,
                    "description": (
                        "a retry with the same key and body replays the first answer"
                        f" (header {REPLAYED_HEADER}: true); the same key with another body"
                        " is a 409"
                    ),
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH,
                        "pattern": "^[\\x21-\\x7e]+$",
                    },
                }
            ],
        },
    )
    async def create_transfer(
        customer: Annotated[str, Depends(authenticated_customer)],
        body: TransferRequest,
        request: Request,
    ) -> Response:
        # Read by hand: a declared header parameter would answer a missing key with 422, and
        # the API promises 400.  It is documented through openapi_extra above.
        idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
        transfer = await banking.create_transfer(
            customer,
            idempotency_key,
            from_account=body.from_account,
            to_account=body.to_account,
            amount=body.amount,
            currency=body.currency,
        )
        location = request.url_for("get_transfer", transfer_id=transfer.id).path
        return _transfer_response(transfer, location)

    @customer_read(GET_TRANSFER.path, "transfers", _TRANSFER_REFUSALS)
    async def get_transfer(
        customer: Annotated[str, Depends(authenticated_customer)], transfer_id: TransferId
    ) -> TransferOut:
        return TransferOut.of(await banking.transfer(customer, transfer_id))

    return router
