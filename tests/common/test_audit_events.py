"""What an audit event stores: secrets never reach the outbox, whatever shape they come in."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict

from common.audit import Actor, outbox_payload, scrub
from common.logging import REDACTED

TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl"


def test_scrub_drops_secret_fields_and_masks_secret_text_at_any_depth_and_keeps_the_rest() -> None:
    value = OrderedDict(
        status="pending",
        total_xaf=1500,
        ratio=0.5,
        paid=False,
        note=None,
        password="hunter2-hunter2",
        lines=(
            {"sku": "SAVON-1", "refresh_token": "rt_x"},
            [f"Bearer {TOKEN}", 3],
        ),
        context={"user_agent": f"curl token={TOKEN}", "nested": {"otp": "123456", "ok": "yes"}},
    )
    scrubbed = scrub(value)
    assert scrubbed == {
        "status": "pending",
        "total_xaf": 1500,
        "ratio": 0.5,
        "paid": False,
        "note": None,
        "lines": [{"sku": "SAVON-1"}, [f"Bearer {REDACTED}", 3]],
        "context": {"user_agent": f"curl token={REDACTED}", "nested": {"ok": "yes"}},
    }
    deep: object = "x"
    for _ in range(30):
        deep = {"d": deep}
    assert "x" not in json.dumps(scrub(deep))  # beyond 20 levels: dropped, never walked without end


def test_an_order_event_is_stored_redacted_with_where_it_came_from() -> None:
    actor = Actor(
        id=str(uuid.uuid4()),
        role="customer",
        context={"ip": "203.0.113.7", "user_agent": f"app Bearer {TOKEN}", "method": "POST", "path": "/api/v1/orders"},
    )
    event = actor.event("orders", "orders.order.created", resource_type="order", resource_id="o-1", new={"lines": 2})
    payload = outbox_payload(event)
    assert TOKEN not in json.dumps(payload)
    assert payload["user_agent"] == f"app Bearer {REDACTED}"
    assert payload["ip"] == "203.0.113.7"
    assert payload["new_values"] == {"lines": 2}
    assert payload["id"] == str(event.id)
