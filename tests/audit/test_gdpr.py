"""GDPR for the auth service: access to a user's events, and erasure that leaves the chain verifiable."""

from __future__ import annotations

import json
import uuid

from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture, assert_problem


async def test_erasure_unlinks_the_user_and_the_chain_still_verifies(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    user = str(uuid.uuid4())
    other = str(uuid.uuid4())
    await audit.send(
        "auth",
        [
            event(
                "auth",
                "auth.user.registered",
                actor_id=user,
                actor_role="customer",
                resource_type="user",
                resource_id=user,
                path=f"/api/v1/auth/users/{user.upper()}",
            ),
            event(
                "auth",
                "auth.login.succeeded",
                actor_id=user,
                actor_role="customer",
                resource_type="session",
                resource_id=str(uuid.uuid4()),
            ),
            event(
                "auth",
                "auth.user.role_changed",
                actor_id=other,
                actor_role="admin",
                resource_type="user",
                resource_id=user,
                old_values={"role": "customer"},
                new_values={"role": "staff"},
                ip="198.51.100.7",
                user_agent="the admin's browser",
            ),
        ],
    )
    await audit.send(
        "orders",
        [
            event(
                "orders",
                "orders.order.created",
                actor_id=user,
                actor_role="customer",
                new_values={"user_id": user, "total_xaf": 1500},
            )
        ],
    )
    await audit.checkpoint()
    # The real id is never in the hashed chain, in any letter case.
    for row in await chain_rows(database):
        assert user not in row["document"].lower()

    exported = await audit.http.get(f"/internal/users/{user}/export", headers=audit.service_headers("auth"))
    assert exported.status_code == 200, exported.text
    body = exported.json()
    # Their own doings, and what others did to them (a role change): without who those others are.
    assert [e["action"] for e in body["events"]] == [
        "orders.order.created",
        "auth.user.role_changed",
        "auth.login.succeeded",
        "auth.user.registered",
    ]
    assert [e["actor_user_id"] for e in body["events"]] == [user, None, user, user]
    assert (body["events"][1]["ip"], body["events"][1]["user_agent"]) == (None, None)  # nor from where
    assert other not in json.dumps(body)
    assert body["truncated"] is False

    erased = await audit.http.post(f"/internal/users/{user}/erase", headers=audit.service_headers("auth"))
    assert erased.status_code == 200, erased.text
    assert erased.json() == {"erased": True, "pseudonym_removed": True, "events_pseudonymised": 3}
    # Idempotent: the auth service may ask again.
    again = await audit.http.post(f"/internal/users/{user}/erase", headers=audit.service_headers("auth"))
    assert again.json()["pseudonym_removed"] is False

    verdict = await audit.verify()
    assert verdict["ok"] is True, verdict
    listing = json.dumps(await audit.events(limit=200))
    assert user not in listing.lower()
    assert await audit.events(actor_id=user) == []
    assert_problem(await audit.http.get(f"/internal/users/{user}/export", headers=audit.service_headers("auth")), 404)
    # Events about the user that arrive late (an outbox catching up) get no new link to them.
    await audit.send("auth", [event("auth", "auth.user.erased", actor_id=user, resource_type="user", resource_id=user)])
    (late,) = await audit.events(action="auth.user.erased")
    assert late["actor_id"] == "erased-subject"
    assert late["actor_user_id"] is None
    assert user not in json.dumps(await audit.events(limit=200)).lower()
    # Other users keep their link.
    role_change = (await audit.events(action="auth.user.role_changed"))[0]
    assert role_change["actor_user_id"] == other
    assert role_change["resource_user_id"] is None
    assert (await audit.verify())["ok"] is True


async def test_only_the_auth_service_may_export_or_erase(audit: AuditClient) -> None:
    user = str(uuid.uuid4())
    await audit.send("orders", [event("orders", actor_id=user)])
    for caller in ("orders", "inventory", "gateway"):
        headers = audit.service_headers(caller)
        assert_problem(await audit.http.get(f"/internal/users/{user}/export", headers=headers), 403)
        assert_problem(await audit.http.post(f"/internal/users/{user}/erase", headers=headers), 403)
    assert_problem(await audit.http.post(f"/internal/users/{user}/erase", headers=audit.user(role="admin")), 401)
    unknown = str(uuid.uuid4())
    assert_problem(
        await audit.http.get(f"/internal/users/{unknown}/export", headers=audit.service_headers("auth")), 404
    )
    assert len(await audit.events(actor_id=user)) == 1
