"""Admin reads name users by their id while the pseudonym mapping exists; erased users stay pseudonyms."""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture


def rehash(item: dict[str, Any]) -> str:
    """The documented recipe: drop the extra fields, put the hashed pseudonyms back, hash."""
    extra = ("hash", "prev_hash", "actor_user_id", "resource_user_id", "pseudonyms")
    doc = {k: v for k, v in item.items() if k not in extra} | (item["pseudonyms"] or {})
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(item["prev_hash"].encode() + text.encode()).hexdigest()


async def test_actor_and_user_resource_ids_are_resolved_for_admins_until_erasure(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    admin, customer = str(uuid.uuid4()), str(uuid.uuid4())
    await audit.send(
        "auth",
        [
            event(
                "auth",
                "auth.user.role_changed",
                actor_id=admin,
                actor_role="admin",
                resource_type="user",
                resource_id=customer,
                old_values={"role": "customer"},
                new_values={"role": "staff"},
            )
        ],
    )
    (item,) = await audit.events(action="auth.user.role_changed")
    assert item["actor_id"] == admin
    assert item["resource_id"] == customer
    assert item["pseudonyms"]["actor_id"].startswith("psn_")
    assert item["pseudonyms"]["resource_id"].startswith("psn_")
    # The chain itself still holds only pseudonyms, and the answer can be rehashed.
    for row in await chain_rows(database):
        assert admin not in row["document"]
        assert customer not in row["document"]
    assert rehash(item) == item["hash"]
    # Filtering by the user id finds it, as the API reference says.
    assert [e["id"] for e in await audit.events(actor_id=admin)] == [item["id"]]
    assert [e["id"] for e in await audit.events(resource_type="user", resource_id=customer)] == [item["id"]]

    erased = await audit.http.post(f"/internal/users/{customer}/erase", headers=audit.service_headers("auth"))
    assert erased.status_code == 200, erased.text
    (after,) = await audit.events(action="auth.user.role_changed")
    assert after["actor_id"] == admin
    assert after["resource_id"] == item["pseudonyms"]["resource_id"]
    assert after["resource_user_id"] is None
    assert after["pseudonyms"] == {"actor_id": item["pseudonyms"]["actor_id"]}
    assert customer not in json.dumps(await audit.events(limit=200))
    assert rehash(after) == after["hash"]
    assert (await audit.verify())["ok"] is True
