"""The fast ingest path keeps every rule of the slow one it replaced: redaction and storable strings in one
walk, timestamps formatted without strftime, and pseudonyms looked up, recognised as erased and added in
one statement, all inside the chain's transaction."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from common.audit import scrub
from services.audit.chain import format_timestamp, parse_timestamp
from services.audit.pseudonyms import ERASED, clean_text
from services.audit.service import prepare
from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture, assert_problem

SECRET_JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
STRINGS = [
    "",
    "plain",
    "nul\x00inside",
    "lone \ud800 surrogate",
    "é accented",
    "both \x00 and \udfff",
    f"Bearer {SECRET_JWT}",
    "password=hunter2hunter2",
    str(uuid.uuid4()),
]
KEYS = ["name", "password", "token", "user_id", "k\x00ey", "\udc80key", "Authorization", "note", "secret_code"]


def random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(7 if depth < 25 else 4)
    if kind == 0:
        return rng.choice(STRINGS)
    if kind == 1:
        return rng.choice([0, -3, 2**40, 1.5, True, False])
    if kind == 2:
        return None
    if kind == 3:
        return rng.choice(STRINGS) + rng.choice(STRINGS)
    if kind in (4, 5):
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "x\x00", "password": "p"}
    for level in range(depth):
        value = {f"level{level}": value, "list": [value, "\ud800"]}
    return value


def test_one_walk_redacts_and_cleans_exactly_as_scrub_then_clean_text() -> None:
    rng = random.Random(20261207)
    for _ in range(3000):
        payload = {key: random_value(rng, 0) for key in rng.sample(KEYS, 4)}
        assert prepare(payload) == clean_text(scrub(payload))
    # Past the depth limit both give up the same way, at every depth around it.
    for depth in range(15, 25):
        payload = {"new_values": nested(depth)}
        assert prepare(payload) == clean_text(scrub(payload)), depth
    # Tuples become lists, secret keys are dropped, strings are storable.
    payload = {"old_values": {"pair": ("a\x00", "b")}, "token": "t", "ok": f"Bearer {SECRET_JWT}"}
    prepared = prepare(payload)
    assert prepared["old_values"] == {"pair": ["a\ufffd", "b"]}
    assert "token" not in prepared
    assert SECRET_JWT not in json.dumps(prepared)


def test_timestamps_have_the_documented_text_for_any_instant_and_offset() -> None:
    rng = random.Random(7)
    offsets = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-9, minutes=-30))]
    for year in [1, 999, 1000, 1970, 2026, 9998]:
        for _ in range(300):
            instant = datetime(year, 1, 2, tzinfo=UTC) + timedelta(
                seconds=rng.randrange(360 * 86400), microseconds=rng.randrange(1_000_000)
            )
            value = instant.astimezone(rng.choice(offsets))
            text = format_timestamp(value)
            assert text == value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if year >= 1000:
                assert parse_timestamp(text) == value


async def pseudonym_rows(database: DatabaseFixture) -> dict[str, str]:
    admin = await database.admin()
    try:
        rows = await admin.fetch("SELECT user_id, pseudonym FROM audit.pseudonyms")
        return {str(row["user_id"]): row["pseudonym"] for row in rows}
    finally:
        await admin.close()


async def test_one_batch_maps_known_erased_and_new_users_and_stores_each_event_once(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    known, erased, new = (str(uuid.uuid4()) for _ in range(3))
    first = event("auth", "auth.user.registered", actor_id=known, resource_type="user", resource_id=known)
    assert await audit.send("auth", [first]) == {"stored": 1, "duplicates": 0}
    known_pseudonym = (await pseudonym_rows(database))[known]
    wiped = await audit.http.post(f"/internal/users/{erased}/erase", headers=audit.service_headers("auth"))
    assert wiped.status_code == 200, wiped.text

    offset = timezone(timedelta(hours=1))
    batch = [
        first,  # sent again: stored once
        event("auth", "auth.login.succeeded", actor_id=known.upper(), occurred_at=datetime.now(offset)),
        event("auth", "auth.login.succeeded", actor_id=erased, path=f"/api/v1/auth/users/{erased}"),
        event("auth", "auth.user.updated", actor_id=new, resource_type="user", resource_id=new),
        event("auth", "auth.user.role_changed", actor_id=known, new_values={"user_id": new, "role": "staff"}),
    ]
    batch.append(batch[-1])  # the same id twice in one batch
    assert await audit.send("auth", batch) == {"stored": 4, "duplicates": 2}

    mapping = await pseudonym_rows(database)
    assert set(mapping) == {known, new}  # the erased user got no new link, the new one exactly one
    assert mapping[known] == known_pseudonym
    every = await chain_rows(database)
    assert [row["sequence"] for row in every] == [1, 2, 3, 4, 5, 6]  # the erasure's own event is the 2nd
    rows = [row for row in every if json.loads(row["document"])["service"] == "auth"]
    docs = [json.loads(row["document"]) for row in rows]
    assert docs[1]["actor_id"] == known_pseudonym
    assert docs[2]["actor_id"] == ERASED
    assert erased not in rows[2]["document"]
    assert docs[3]["actor_id"] == docs[3]["resource_id"] == mapping[new]
    assert docs[4]["actor_id"] == known_pseudonym
    assert docs[4]["new_values"] == {"user_id": mapping[new], "role": "staff"}
    for person in (known, erased, new):
        assert all(person not in row["document"].lower() for row in rows)
    # One recorded_at per batch; the event sent at +01:00 is chained in UTC.
    assert docs[1]["recorded_at"] == docs[4]["recorded_at"] != docs[0]["recorded_at"]
    assert docs[1]["occurred_at"] == format_timestamp(datetime.fromisoformat(batch[1]["occurred_at"]))
    assert docs[1]["occurred_at"].endswith("Z")

    admin = await database.admin()
    try:
        columns = await admin.fetch(
            "SELECT id, occurred_at, recorded_at, service, action, actor_id, resource_type, resource_id, outcome"
            " FROM audit.events ORDER BY sequence"
        )
    finally:
        await admin.close()
    for doc, column in zip([json.loads(row["document"]) for row in every], columns, strict=True):
        assert str(column["id"]) == doc["id"]
        assert column["occurred_at"] == parse_timestamp(doc["occurred_at"])
        assert column["recorded_at"] == parse_timestamp(doc["recorded_at"])
        for field in ("service", "action", "actor_id", "resource_type", "resource_id", "outcome"):
            assert column[field] == doc[field], field
    verdict = await audit.verify()
    assert verdict["ok"] is True, verdict
    assert verdict["checked"] == 6


@pytest.mark.parametrize("occurred_at", ["0999-06-01T00:00:00Z", "0001-01-01T00:30:00+01:00"])
async def test_an_instant_the_chain_cannot_hold_refuses_the_batch(
    audit: AuditClient, database: DatabaseFixture, occurred_at: str
) -> None:
    batch = [event("orders"), event("orders") | {"occurred_at": occurred_at}]
    answer = await audit.post_events("orders", batch)
    assert_problem(answer, 422)
    assert "invalid-event" in answer.json()["type"]
    assert await chain_rows(database) == []
    assert await audit.send("orders", batch[:1]) == {"stored": 1, "duplicates": 0}
    assert (await audit.verify())["ok"] is True
