"""services.common.problem, exercised where it is used."""

import json

from services.common.problem import (
    PROBLEM_MEDIA_TYPE,
    Problem,
    openapi_components,
    openapi_problem,
    problem,
    problem_response,
)


def test_blank_problems_take_the_status_phrase_as_title() -> None:
    body = problem(404)

    assert body.type == "about:blank"
    assert body.title == "Not Found"
    assert body.status == 404


def test_response_is_problem_json_without_unset_members() -> None:
    response = problem_response(
        problem(409, type_="tag:x,2026:p", title="Conflict!", instance="/v1/x", note=None),
        {"Retry-After": "1"},
    )

    assert response.status_code == 409
    assert response.media_type == PROBLEM_MEDIA_TYPE
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.headers["retry-after"] == "1"
    # detail is unset and left out; an extension member that is null is data and stays.
    assert json.loads(bytes(response.body)) == {
        "type": "tag:x,2026:p",
        "title": "Conflict!",
        "status": 409,
        "instance": "/v1/x",
        "note": None,
    }


def test_extension_members_are_kept() -> None:
    body = problem(422, detail="no", transfer_id="tr-1", reasons=["a"])

    assert json.loads(bytes(problem_response(body).body))["reasons"] == ["a"]


class Special(Problem):
    code: int


def test_openapi_entries_reference_component_schemas() -> None:
    single = openapi_problem(403)
    several = openapi_problem(422, "bad", Special, Problem)

    assert single == {
        "description": "Forbidden",
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    assert several["content"][PROBLEM_MEDIA_TYPE]["schema"] == {
        "anyOf": [
            {"$ref": "#/components/schemas/Special"},
            {"$ref": "#/components/schemas/Problem"},
        ]
    }
    components = openapi_components(Problem, Special)
    assert set(components) == {"Problem", "Special"}
    assert components["Special"]["required"] == ["title", "status", "code"]
