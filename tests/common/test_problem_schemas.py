"""The problem bodies the services send are the documented shapes (common.errors' Problem models)."""

from __future__ import annotations

import json

from common.errors import (
    OrderConflictProblem,
    Problem,
    RetryProblem,
    ServiceUnavailable,
    TooManyRequests,
    Unprocessable,
    ValidationProblem,
    error_response,
    problem_response,
)


def body_of(response) -> dict:  # noqa: ANN001
    return json.loads(bytes(response.body))


def test_retry_after_is_repeated_in_the_body() -> None:
    throttled = body_of(error_response(TooManyRequests("Slow down.", headers={"Retry-After": "7"})))
    assert RetryProblem.model_validate(throttled).retry_after == 7
    busy = body_of(problem_response(503, detail="Busy.", headers={"Retry-After": "1"}))
    assert RetryProblem.model_validate(busy).retry_after == 1
    # Without the header nothing is invented.
    assert "retry_after" not in body_of(error_response(ServiceUnavailable("Down.")))


def test_every_422_carries_errors() -> None:
    # Raised without its own list, a 422 still says which input (the body, unless the raiser names one) and why.
    bare = ValidationProblem.model_validate(body_of(error_response(Unprocessable("The file is empty."))))
    assert [(e.loc, e.msg) for e in bare.errors] == [(["body"], "The file is empty.")]
    placed = body_of(error_response(Unprocessable("Control characters.", loc=("query", "q"))))
    assert [(e.loc, e.msg) for e in ValidationProblem.model_validate(placed).errors] == [
        (["query", "q"], "Control characters.")
    ]
    listed = body_of(
        error_response(
            Unprocessable("Bad.", extra={"errors": [{"loc": ["body", "items", 0], "msg": "Unknown product"}]})
        )
    )
    problem = ValidationProblem.model_validate(listed)
    assert [(e.loc, e.msg) for e in problem.errors] == [(["body", "items", 0], "Unknown product")]


def test_short_items_are_typed_and_other_members_are_kept() -> None:
    body = {
        "type": "urn:comptoir:problem:insufficient-stock",
        "title": "Not enough stock",
        "status": 409,
        "detail": "Some items lack stock.",
        "request_id": None,
        "short_items": [{"product_id": "0b6c3a52-0000-4000-8000-000000000000", "requested": 5, "available": 2}],
    }
    conflict = OrderConflictProblem.model_validate(body)
    assert (conflict.short_items[0].requested, conflict.short_items[0].available) == (5, 2)
    assert Problem.model_validate(body).model_extra == {"short_items": body["short_items"]}
