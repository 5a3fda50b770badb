"""Ingest: authenticated callers only, each event stored once, one gap-free chain, secrets never stored."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from services.audit.chain import GENESIS
from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture, assert_problem


def assert_one_chain(rows: list[Any]) -> None:
    """Sequences 1..n without gaps, each linked to the one before, each hash recomputable."""
    assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1))
    prev = GENESIS
    for row in rows:
        assert row["prev_hash"] == prev
        expected = hashlib.sha256(row["prev_hash"].encode() + row["document"].encode()).hexdigest()
        assert row["hash"] == expected
        prev = row["hash"]


async def test_redelivered_events_are_stored_once(audit: AuditClient, database: DatabaseFixture) -> None:
    batch = [event("orders", "orders.order.created", resource_type="order", resource_id=str(i)) for i in range(5)]
    assert await audit.send("orders", batch) == {"stored": 5, "duplicates": 0}
    assert await audit.send("orders", batch) == {"stored": 0, "duplicates": 5}
    fresh = [event("orders"), event("orders")]
    assert await audit.send("orders", batch[:3] + fresh) == {"stored": 2, "duplicates": 3}
    # The same id twice in one batch is stored once too.
    again = event("orders")
    assert await audit.send("orders", [again, again]) == {"stored": 1, "duplicates": 1}

    rows = await chain_rows(database)
    assert len(rows) == 8
    assert len({r["id"] for r in rows}) == 8
    assert_one_chain(rows)
    verdict = await audit.verify()
    assert verdict["ok"] is True
    assert verdict["checked"] == 8
    assert verdict["first_bad_sequence"] is None
    assert verdict["head_hash"] == rows[-1]["hash"]


async def test_parallel_ingest_from_four_services_makes_one_gap_free_chain(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    callers = ["auth", "inventory", "orders", "gateway"]
    per_caller, batch_size = 250, 25
    sent: dict[str, list[dict[str, Any]]] = {c: [event(c) for _ in range(per_caller)] for c in callers}

    async def deliver(caller: str, events: list[dict[str, Any]]) -> int:
        stored = 0
        for start in range(0, len(events), batch_size):
            result = await audit.send(caller, events[start : start + batch_size])
            stored += result["stored"]
        return stored

    # Every caller delivers its events twice, concurrently with itself and the others (a relay retry race).
    results = await asyncio.gather(*(deliver(c, e) for c, e in sent.items()), *(deliver(c, e) for c, e in sent.items()))
    assert sum(results) == 1000

    rows = await chain_rows(database)
    assert len(rows) == 1000
    assert_one_chain(rows)
    stored_ids = {str(r["id"]) for r in rows}
    assert stored_ids == {e["id"] for events in sent.values() for e in events}
    verdict = await audit.verify()
    assert verdict == verdict | {"ok": True, "checked": 1000, "first_bad_sequence": None}


async def test_secrets_in_nested_fields_are_never_stored(audit: AuditClient, database: DatabaseFixture) -> None:
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
    leaky = event(
        "auth",
        "auth.password.changed",
        user_agent=f"curl/8 Bearer {jwt_like}",
        path="/api/v1/auth/password-reset/confirm?token=0123456789abcdef&lang=fr",
        old_values={"profile": {"password": "hunter2-hunter2", "password_hash": "pbkdf2_sha256$600000$salt$hash"}},
        new_values={
            "steps": [{"otp": "493817"}, {"otp_code": "112233"}, {"note": f"Authorization: Bearer {jwt_like}"}],
            "headers": {"Authorization": f"Bearer {jwt_like}", "X-Request-ID": "abc"},
            "reset": {"reset_token": "d2f1c0ffee", "refresh_token": "r-123", "code": "654321"},
            "kept": "the phone number changed",
        },
    )
    await audit.send("auth", [leaky])
    rows = await chain_rows(database)
    stored = rows[0]["document"]
    for secret in (
        "hunter2",
        "pbkdf2_sha256",
        "493817",
        "112233",
        jwt_like,
        "0123456789abcdef",
        "d2f1c0ffee",
        "r-123",
        "654321",
    ):
        assert secret not in stored
    doc = json.loads(stored)
    assert doc["new_values"]["kept"] == "the phone number changed"
    assert doc["new_values"]["headers"] == {"X-Request-ID": "abc"}
    assert doc["old_values"] == {"profile": {}}
    assert "token=[REDACTED]" in doc["path"]
    listed = await audit.events(action="auth.password.changed")
    assert all(secret not in json.dumps(listed) for secret in ("hunter2", "493817", jwt_like))


async def test_only_allowed_services_may_send_events(audit: AuditClient, database: DatabaseFixture) -> None:
    http = audit.http
    body = {"events": [event("orders")]}
    # A user's access token is never a service token.
    assert_problem(await http.post("/internal/events", json=body, headers=audit.user(role="admin")), 401)
    assert_problem(await http.post("/internal/events", json=body), 401)
    # A service token minted for another audience.
    wrong_audience = audit.service_headers("orders", audience="inventory")
    assert_problem(await http.post("/internal/events", json=body, headers=wrong_audience), 401)
    # A valid service token from a caller that has no business sending events: 403, and recorded.
    denied = assert_problem(await http.post("/internal/events", json=body, headers=audit.service_headers("audit")), 403)
    assert denied["type"] == "urn:comptoir:problem:forbidden"
    # A caller may not write another service's events.
    forged = {"events": [event("auth", "auth.login.succeeded")]}
    assert_problem(await http.post("/internal/events", json=forged, headers=audit.service_headers("orders")), 403)

    rows = await chain_rows(database)
    actions = [json.loads(r["document"])["action"] for r in rows]
    assert actions == ["audit.internal.denied", "audit.ingest.rejected"]
    first = json.loads(rows[0]["document"])
    assert (first["actor_id"], first["outcome"], first["path"]) == ("audit", "denied", "/internal/events")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda e: e | {"unexpected": "field"}, id="unknown-field"),
        pytest.param(lambda e: e | {"action": "Not A Dotted Name"}, id="bad-action"),
        pytest.param(lambda e: e | {"occurred_at": "2026-11-23T10:00:00"}, id="naive-time"),
        pytest.param(lambda e: {k: v for k, v in e.items() if k != "id"}, id="no-id"),
        pytest.param(lambda e: e | {"outcome": "maybe"}, id="bad-outcome"),
    ],
)
async def test_an_invalid_event_refuses_the_whole_batch(
    audit: AuditClient, database: DatabaseFixture, mutate: Any
) -> None:
    batch = [event("orders"), mutate(event("orders"))]
    response = await audit.http.post(
        "/internal/events", json={"events": batch}, headers=audit.service_headers("orders")
    )
    assert_problem(response, 422)
    assert await chain_rows(database) == []


async def test_batches_are_bounded(audit: AuditClient, database: DatabaseFixture) -> None:
    batch = [event("orders") for _ in range(1001)]
    response = await audit.http.post(
        "/internal/events", json={"events": batch}, headers=audit.service_headers("orders")
    )
    assert_problem(response, 422)
    assert await audit.send("orders", []) == {"stored": 0, "duplicates": 0}
    assert await chain_rows(database) == []


async def test_strings_postgres_cannot_hold_are_made_storable(audit: AuditClient, database: DatabaseFixture) -> None:
    odd = event("orders", user_agent="nul\x00byte", new_values={"note": "a\x00b", "n": 1.5, "big": 10**20})
    await audit.send("orders", [odd])
    (row,) = await chain_rows(database)
    doc = json.loads(row["document"])
    assert doc["user_agent"] == "nul\ufffdbyte"
    assert doc["new_values"] == {"note": "a\ufffdb", "n": 1.5, "big": 10**20}
    assert (await audit.verify())["ok"] is True


async def test_an_event_api_answer_can_be_rehashed_by_anyone(audit: AuditClient) -> None:
    """The documented canonical form: rebuild the document from the API fields and hash it."""
    await audit.send("orders", [event("orders", new_values={"é": "ü", "list": [3, 1, 2]}, actor_id="orders")])
    (item,) = await audit.events(action="orders.thing.done")
    extra = ("hash", "prev_hash", "actor_user_id", "resource_user_id", "pseudonyms")
    doc = {k: v for k, v in item.items() if k not in extra} | (item["pseudonyms"] or {})
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(item["prev_hash"].encode() + text.encode()).hexdigest() == item["hash"]
    assert item["occurred_at"].endswith("Z")
