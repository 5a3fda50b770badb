"""The admin query API: filters, cursor pagination, newest first; everyone else gets 403, on the record."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture, assert_problem


async def test_non_admins_get_403_and_the_denial_is_in_the_chain(audit: AuditClient, database: DatabaseFixture) -> None:
    staff_id = str(uuid.uuid4())
    for path in ("/api/v1/audit/events", "/api/v1/audit/verify", "/api/v1/audit/alerts"):
        assert_problem(await audit.http.get(path, headers=audit.user(role="staff", sub=staff_id)), 403)
    assert_problem(await audit.http.post("/api/v1/audit/checkpoints", headers=audit.user()), 403)
    # Without a token (or with a service token) it is 401, before any role is known.
    assert_problem(await audit.http.get("/api/v1/audit/events"), 401)
    assert_problem(await audit.http.get("/api/v1/audit/events", headers=audit.service_headers("auth")), 401)

    denials = await audit.events(action="audit.access.denied")
    assert len(denials) == 4
    newest = denials[-1]  # the oldest of the four: the staff member's first attempt
    assert newest["path"] == "/api/v1/audit/events"
    assert newest["method"] == "GET"
    assert newest["outcome"] == "denied"
    assert newest["actor_role"] == "staff"
    assert newest["actor_user_id"] == staff_id
    assert newest["ip"] == "203.0.113.7"
    assert newest["request_id"]
    assert (await audit.verify())["ok"] is True
    assert len(await chain_rows(database)) >= 4


async def test_filters_cursor_and_order(audit: AuditClient) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    product = str(uuid.uuid4())
    base = datetime(2026, 1, 1, tzinfo=UTC)
    batch = [
        event(
            "inventory",
            "inventory.stock.adjusted",
            actor_id=alice,
            actor_role="staff",
            occurred_at=base,
            resource_type="product",
            resource_id=product,
            new_values={"delta": 3},
        ),
        event(
            "orders",
            "orders.order.created",
            actor_id=bob,
            actor_role="customer",
            occurred_at=base + timedelta(hours=1),
            resource_type="order",
            resource_id=str(uuid.uuid4()),
        ),
        event(
            "orders",
            "orders.order.cancelled",
            actor_id=bob,
            actor_role="customer",
            occurred_at=base + timedelta(hours=2),
            resource_type="order",
            resource_id=str(uuid.uuid4()),
        ),
        event(
            "inventory",
            "inventory.stock.adjusted",
            actor_id=alice,
            actor_role="staff",
            occurred_at=base + timedelta(hours=3),
            resource_type="product",
            resource_id=product,
        ),
    ]
    await audit.send("inventory", [batch[0], batch[3]])
    await audit.send("orders", batch[1:3])

    everything = await audit.events()
    sequences = [e["sequence"] for e in everything if e["service"] != "audit"]
    assert sequences == sorted(sequences, reverse=True)
    assert set(everything[0]) >= {
        "id",
        "sequence",
        "occurred_at",
        "service",
        "action",
        "actor_id",
        "actor_role",
        "resource_type",
        "resource_id",
        "ip",
        "user_agent",
        "method",
        "path",
        "request_id",
        "old_values",
        "new_values",
        "outcome",
        "hash",
        "prev_hash",
        "actor_user_id",
        "resource_user_id",
        "pseudonyms",
    }

    by_bob = await audit.events(actor_id=bob)
    assert [e["action"] for e in by_bob] == ["orders.order.cancelled", "orders.order.created"]
    # Admins read the user's id; the pseudonym that was hashed is given beside it.
    assert all(e["actor_user_id"] == bob and e["actor_id"] == bob for e in by_bob)
    assert all(e["pseudonyms"]["actor_id"].startswith("psn_") for e in by_bob)
    # The pseudonym itself is a valid filter too.
    assert len(await audit.events(actor_id=by_bob[0]["pseudonyms"]["actor_id"])) == 2
    assert len(await audit.events(action="inventory.stock.adjusted")) == 2
    assert len(await audit.events(resource_type="product", resource_id=product)) == 2
    window = await audit.events(
        since=(base + timedelta(hours=1)).isoformat(), until=(base + timedelta(hours=3)).isoformat()
    )
    assert [e["action"] for e in window] == ["orders.order.cancelled", "orders.order.created"]

    first = (await audit.http.get("/api/v1/audit/events", params={"limit": 2}, headers=audit.admin())).json()
    assert len(first["items"]) == 2
    second = (
        await audit.http.get(
            "/api/v1/audit/events", params={"limit": 2, "cursor": first["next_cursor"]}, headers=audit.admin()
        )
    ).json()
    assert second["items"][0]["sequence"] < first["items"][-1]["sequence"]
    assert_problem(
        await audit.http.get("/api/v1/audit/events", params={"cursor": "nonsense"}, headers=audit.admin()), 400
    )
    assert_problem(await audit.http.get("/api/v1/audit/events", params={"limit": 201}, headers=audit.admin()), 422)
    assert_problem(
        await audit.http.get("/api/v1/audit/events", params={"since": "2026-01-01T00:00:00"}, headers=audit.admin()),
        422,
    )

    # Admin reads of the trail are themselves on the record, with the filters used.
    await audit.events(resource_type="user", resource_id=bob)
    (viewed,) = await audit.events(action="audit.events.viewed", limit=1)
    assert viewed["actor_user_id"] == audit.admin_id
    assert viewed["new_values"]["filters"]["resource_type"] == "user"
    assert viewed["new_values"]["filters"]["resource_id"].startswith("psn_")  # pseudonymised like everything else


@pytest.mark.parametrize("value", ["0.5", "1700000000", "2026-11-23", "2026-11-23T08:00:00", "yesterday"])
async def test_time_filters_take_rfc3339_only(audit: AuditClient, value: str) -> None:
    """Found by fuzzing: numbers were read as Unix timestamps."""
    response = await audit.http.get("/api/v1/audit/events", params={"until": value}, headers=audit.admin())
    assert response.status_code == 422
    ok = await audit.http.get("/api/v1/audit/events", params={"until": "2026-11-23T08:00:00Z"}, headers=audit.admin())
    assert ok.status_code == 200
