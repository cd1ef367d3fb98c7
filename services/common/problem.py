"""RFC 9457 problem details (``application/problem+json``) for HTTP error responses.

Services build a ``Problem`` at their edge (exception handlers) and send it with
``problem_response``; ``openapi_problem`` documents such a response in a route's ``responses=``.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.responses import JSONResponse

PROBLEM_MEDIA_TYPE = "application/problem+json"
# RFC 9457 section 4.2: the default type, meaning "nothing beyond the HTTP status code".
BLANK_TYPE = "about:blank"
COMPONENTS_REF = "#/components/schemas/{model}"


class Problem(BaseModel):
    """The members of RFC 9457 section 3.1; extension members are kept as extra fields."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default=BLANK_TYPE, description="URI reference identifying the problem type")
    title: str = Field(description="short, human-readable summary of the problem type")
    status: int = Field(ge=400, le=599, description="the HTTP status code of this response")
    detail: str | None = Field(default=None, description="explanation specific to this occurrence")
    instance: str | None = Field(
        default=None, description="URI reference identifying this occurrence"
    )


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    *,
    type_: str = BLANK_TYPE,
    title: str | None = None,
    detail: str | None = None,
    instance: str | None = None,
    **extensions: Any,
) -> Problem:
    """A problem whose title defaults to the status phrase, as RFC 9457 asks for ``about:blank``."""
    return Problem(
        type=type_,
        title=title or HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        **extensions,
    )


def problem_response(body: Problem, headers: Mapping[str, str] | None = None) -> ProblemResponse:
    # Only the optional standard members are left out when unset; a null inside an extension
    # member (a transfer's "risk": null) is data.
    unset = {name for name in ("detail", "instance") if getattr(body, name) is None}
    return ProblemResponse(
        body.model_dump(mode="json", exclude=unset), status_code=body.status, headers=headers
    )


def openapi_problem(
    status: int, description: str | None = None, *models: type[Problem]
) -> dict[str, Any]:
    """One entry of a FastAPI ``responses=`` mapping, served as ``application/problem+json``.

    FastAPI would file a ``model=`` response under ``application/json``, so the schemas are
    referenced by hand and must be registered with ``openapi_components``.  Several models
    (one status, several kinds of problem) become an ``anyOf``: every problem is also a plain
    ``Problem``, so ``oneOf`` would never hold.
    """
    refs = [{"$ref": COMPONENTS_REF.format(model=model.__name__)} for model in models or (Problem,)]
    return {
        "description": description or HTTPStatus(status).phrase,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": refs[0] if len(refs) == 1 else {"anyOf": refs}}},
    }


def openapi_components(*models: type[BaseModel]) -> dict[str, Any]:
    """JSON schemas of ``models`` (and what they reference) for ``components.schemas``."""
    _, schema = models_json_schema(
        [(model, "serialization") for model in models], ref_template=COMPONENTS_REF
    )
    definitions: dict[str, Any] = schema.get("$defs", {})
    return definitions
