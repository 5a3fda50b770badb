"""The created event of a placed order is written straight (``rules.created_event``), not through the event
model: it must store exactly what ``outbox_payload`` stores for the same event, secrets masked the same way."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from common.audit import Actor, outbox_payload
from common.logging import REDACTED
from services.orders.models import Status
from services.orders.rules import created_event, order_event

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl"

ACTORS = [
    Actor(
        id=str(uuid.uuid4()),
        role="customer",
        context={
            "ip": "203.0.113.7",
            "user_agent": "shop-app/2.1",
            "method": "POST",
            "path": "/api/v1/orders",
            "request_id": "req-1",
        },
    ),
    # Every text that came from the request may carry something secret-looking.
    Actor(
        id=f"Bearer {TOKEN}",
        role="customer password='x y'",
        context={
            "ip": None,
            "user_agent": f"curl token={TOKEN} \"quoted\" 'single'",
            "method": "POST",
            "path": f"/api/v1/orders?access_token={TOKEN}",
            "request_id": f"basic {TOKEN}",
        },
    ),
    # Texts at and past the lengths audit stores, some made longer by their redaction ("Bearer x").
    Actor(
        id="a" * 127 + " Bearer x",
        role="r" * 40,
        context={
            "ip": "9" * 70,
            "user_agent": "u" * 505 + " Bearer x",
            "method": "M" * 17,
            "path": "/" + "p" * 600,
            "request_id": "q" * 128,
        },
    ),
    # Anonymous fields, a missing context, extra context keys the event model ignores.
    Actor(id=None, role=None, context={}),
    Actor(id="u", role="staff", context={"ip": "::1", "user_agent": None, "secret": "s", "unexpected": 1}),
]


def model_payload(actor: Actor, order_id: uuid.UUID, total: int, lines: int, event_id: uuid.UUID, at: datetime) -> Any:
    event = order_event(
        actor, "orders.order.created", order_id, None, {"status": Status.pending, "total_xaf": total, "lines": lines}
    )
    return outbox_payload(event.model_copy(update={"id": event_id, "occurred_at": at}))


@pytest.mark.parametrize("actor", ACTORS)
@pytest.mark.parametrize(("total", "lines"), [(1500, 1), (0, 100), (10**18, 7)])
def test_the_created_event_stores_what_the_event_model_stores(actor: Actor, total: int, lines: int) -> None:
    order_id = uuid.uuid4()
    event = created_event(actor, order_id, total, lines)
    payload = json.loads(event.payload)
    assert payload == model_payload(actor, order_id, total, lines, event.id, event.occurred_at)
    assert list(payload) == list(model_payload(actor, order_id, total, lines, event.id, event.occurred_at))
    assert payload["id"] == str(event.id)
    assert event.occurred_at.tzinfo is not None
    assert TOKEN not in event.payload


@pytest.mark.parametrize("at", [datetime(2026, 12, 7, 5, 0, tzinfo=UTC), datetime(2026, 12, 7, 5, 0, 1, 7, tzinfo=UTC)])
def test_the_event_time_is_written_as_the_event_model_writes_it(at: datetime, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.orders.rules.utcnow", lambda: at)
    actor = ACTORS[0]
    order_id = uuid.uuid4()
    event = created_event(actor, order_id, 1, 1)
    assert event.occurred_at == at
    assert json.loads(event.payload) == model_payload(actor, order_id, 1, 1, event.id, at)


def test_secret_looking_request_texts_are_masked() -> None:
    event = json.loads(created_event(ACTORS[1], uuid.uuid4(), 1, 1).payload)
    assert event["actor_id"] == f"Bearer {REDACTED}"
    assert event["request_id"] == f"basic {REDACTED}"
    assert TOKEN not in event["user_agent"]
    assert TOKEN not in event["path"]
