"""Query values the database cannot take are refused by the audit API itself (4xx), never a 500."""

from __future__ import annotations

import base64
import json

import pytest

from tests.audit.support import AuditClient
from tests.conftest import assert_problem


def cursor_of(values: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


@pytest.mark.parametrize("name", ["actor_id", "action", "resource_type", "resource_id"])
async def test_a_nul_in_a_text_filter_is_a_422(audit: AuditClient, name: str) -> None:
    response = await audit.http.get("/api/v1/audit/events", params={name: "a\x00b"}, headers=audit.admin())
    body = assert_problem(response, 422)
    assert [error["loc"] for error in body["errors"]] == [["query", name]]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("until", "9999-12-31T23:59:59.999999-12:00"),  # year 10000 in UTC
        ("since", "0001-01-01T00:00:00+14:00"),  # year 0 in UTC
    ],
)
async def test_an_instant_outside_the_calendar_in_utc_is_a_422(audit: AuditClient, name: str, value: str) -> None:
    response = await audit.http.get("/api/v1/audit/events", params={name: value}, headers=audit.admin())
    body = assert_problem(response, 422)
    assert [error["loc"] for error in body["errors"]] == [["query", name]]  # type: ignore[union-attr]


async def test_the_widest_instants_in_utc_are_still_served(audit: AuditClient) -> None:
    params = {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999+00:00"}
    response = await audit.http.get("/api/v1/audit/events", params=params, headers=audit.admin())
    assert response.status_code == 200, response.text
    # An offset is kept as the same instant: the filter is answered in UTC.
    shifted = {"until": "2026-12-07T10:00:00+01:00"}
    assert (await audit.http.get("/api/v1/audit/events", params=shifted, headers=audit.admin())).status_code == 200


@pytest.mark.parametrize("alert_id", ["9223372036854775808", "-9223372036854775809", "0"])
async def test_an_alert_id_outside_bigint_is_a_422(audit: AuditClient, alert_id: str) -> None:
    response = await audit.http.post(f"/api/v1/audit/alerts/{alert_id}/resolve", headers=audit.admin())
    assert_problem(response, 422)
    largest = await audit.http.post("/api/v1/audit/alerts/9223372036854775807/resolve", headers=audit.admin())
    assert_problem(largest, 404)


@pytest.mark.parametrize("path", ["/api/v1/audit/events", "/api/v1/audit/checkpoints", "/api/v1/audit/alerts"])
@pytest.mark.parametrize("key", ["9999999999999999999", "9223372036854775808", "²", "-1", ""])
async def test_a_sequence_cursor_beyond_bigint_or_not_ascii_digits_is_a_400(
    audit: AuditClient, path: str, key: str
) -> None:
    response = await audit.http.get(path, params={"cursor": cursor_of([key])}, headers=audit.admin())
    assert_problem(response, 400)
    largest = await audit.http.get(path, params={"cursor": cursor_of(["9223372036854775807"])}, headers=audit.admin())
    assert largest.status_code == 200, largest.text
