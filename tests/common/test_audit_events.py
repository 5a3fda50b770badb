"""What an audit event stores: secrets never reach the outbox, whatever shape they come in."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict

from common.audit import STORED_LENGTHS, Actor, outbox_payload, scrub
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


def max_lengths() -> dict[str, int]:
    """The audit service's limit on each text field of an incoming event."""
    from services.audit.schemas import EventIn

    out = {}
    for name, info in EventIn.model_fields.items():
        limits = [m.max_length for m in info.metadata if getattr(m, "max_length", None) is not None]
        if limits:
            out[name] = limits[0]
    return out


def test_every_stored_text_fits_what_audit_accepts_however_long_and_whatever_its_redaction_adds() -> None:
    from services.audit.schemas import EventIn

    limits = max_lengths()
    # service and action are the code's own (patterns); every other limited text is cut to audit's limit.
    assert {name: limits[name] for name in STORED_LENGTHS} == STORED_LENGTHS
    assert set(limits) - set(STORED_LENGTHS) == {"service", "action"}
    for tail in ("", " Bearer x", f" token={TOKEN}"):
        texts = {name: "t" * (limit - 2) + tail for name, limit in STORED_LENGTHS.items()}
        event = Actor(id=None, role=None).event("orders", "orders.order.created")
        payload = outbox_payload(event.model_copy(update=texts))
        EventIn.model_validate(payload)  # audit accepts it: an event it refused would wait in the outbox for good
        for name, limit in STORED_LENGTHS.items():
            assert len(payload[name]) <= limit
            assert payload[name].startswith("t" * (limit - 2))
        assert TOKEN not in json.dumps(payload)
