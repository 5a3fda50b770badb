"""Tampering is detected: by the hash chain, and by signed checkpoints when every hash was recomputed."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from services.audit.chain import chain_hash
from tests.audit.support import AuditClient, chain_rows, event
from tests.conftest import DatabaseFixture, assert_problem


async def as_superuser(database: DatabaseFixture, *statements: tuple[str, list[Any]]) -> None:
    """Run statements as the database superuser with the append-only trigger switched off."""
    admin = await database.admin()
    try:
        async with admin.transaction():
            await admin.execute("ALTER TABLE audit.events DISABLE TRIGGER events_append_only")
            for sql, args in statements:
                await admin.execute(sql, *args)
            await admin.execute("ALTER TABLE audit.events ENABLE TRIGGER events_append_only")
    finally:
        await admin.close()


async def fill(audit: AuditClient, n: int) -> None:
    await audit.send("orders", [event("orders", resource_type="order", resource_id=str(i)) for i in range(n)])


def edited(document: str, **changes: Any) -> str:
    doc = json.loads(document) | changes
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


async def test_a_row_changed_by_a_superuser_is_reported_at_its_sequence(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    await fill(audit, 10)
    rows = await chain_rows(database)
    forged = edited(rows[6]["document"], new_values={"total_xaf": 1})
    await as_superuser(database, ("UPDATE audit.events SET document = $1 WHERE sequence = 7", [forged]))

    verdict = await audit.verify()
    assert verdict["ok"] is False
    assert verdict["first_bad_sequence"] == 7
    assert "hash does not match" in verdict["problems"][0]["reason"]
    # A failed verification is a security alert, and nothing is signed over a broken chain.
    (alert,) = await audit.alerts()
    assert alert["rule"] == "audit.chain.integrity"
    assert alert["severity"] == "critical"
    problem = assert_problem(await audit.http.post("/api/v1/audit/checkpoints", headers=audit.admin()), 409)
    assert problem["first_bad_sequence"] == 7


async def test_a_query_column_out_of_step_with_the_hashed_document_is_reported(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    await fill(audit, 5)
    await as_superuser(database, ("UPDATE audit.events SET actor_id = 'someone-else' WHERE sequence = 3", []))
    verdict = await audit.verify()
    assert (verdict["ok"], verdict["first_bad_sequence"]) == (False, 3)
    assert "columns differ" in verdict["problems"][0]["reason"]


async def test_a_removed_row_is_reported(audit: AuditClient, database: DatabaseFixture) -> None:
    await fill(audit, 6)
    await as_superuser(database, ("DELETE FROM audit.events WHERE sequence = 4", []))
    verdict = await audit.verify()
    assert (verdict["ok"], verdict["first_bad_sequence"]) == (False, 4)


async def rewrite_from(database: DatabaseFixture, sequence: int) -> None:
    """What a superuser covering their tracks does: change one event and recompute every hash after it."""
    rows = await chain_rows(database)
    statements: list[tuple[str, list[Any]]] = []
    prev = next(r["hash"] for r in rows if r["sequence"] == sequence - 1)
    for row in rows:
        if row["sequence"] < sequence:
            continue
        document = row["document"]
        if row["sequence"] == sequence:
            document = edited(document, outcome="failure", new_values={"rewritten": True})
        digest = chain_hash(prev, document)
        statements.append(
            (
                "UPDATE audit.events SET document = $1, prev_hash = $2, hash = $3, outcome = $4 WHERE sequence = $5",
                [document, prev, digest, json.loads(document)["outcome"], row["sequence"]],
            )
        )
        prev = digest
    await as_superuser(database, *statements)


async def test_rows_rewritten_with_all_hashes_recomputed_are_caught_by_the_signed_checkpoint(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    await fill(audit, 5)
    first = await audit.checkpoint()
    await fill(audit, 10)
    second = await audit.checkpoint()
    await fill(audit, 3)
    target = first["sequence"] + 4
    assert target < second["sequence"]
    await rewrite_from(database, target)

    verdict = await audit.verify()
    assert verdict["ok"] is False
    # The chain itself is consistent again; the first checkpoint still matches, the second does not.
    assert all("checkpoint" in p["reason"] for p in verdict["problems"])
    assert verdict["first_bad_sequence"] == first["sequence"] + 1
    assert verdict["checkpoints_checked"] == 2

    # Deleting the checkpoints from the database does not help: they are also in the log under DATA_DIR.
    admin = await database.admin()
    try:
        await admin.execute("SET session_replication_role = replica")
        await admin.execute("DELETE FROM audit.checkpoints")
    finally:
        await admin.close()
    again = await audit.verify()
    assert again["ok"] is False
    assert again["first_bad_sequence"] == first["sequence"] + 1


async def test_events_removed_from_the_end_are_caught_by_the_checkpoint(
    audit: AuditClient, database: DatabaseFixture
) -> None:
    await fill(audit, 8)
    signed = await audit.checkpoint()
    await as_superuser(database, ("DELETE FROM audit.events WHERE sequence > $1", [signed["sequence"] - 3]))
    verdict = await audit.verify()
    assert verdict["ok"] is False
    assert verdict["first_bad_sequence"] == signed["sequence"] - 2
    assert "events were removed" in verdict["problems"][0]["reason"]


async def test_a_checkpoint_written_without_the_key_is_refused(audit: AuditClient, database: DatabaseFixture) -> None:
    await fill(audit, 4)
    signed = await audit.checkpoint()
    assert (await audit.verify())["ok"] is True
    # The running service's own role can insert a checkpoint row, but it cannot sign one.
    conn = await database.connect_as("audit")
    try:
        await conn.execute(
            "INSERT INTO audit.checkpoints (sequence, head_hash, signed_at, kind, key_id, public_key, signature)"
            " VALUES ($1, $2, now(), 'manual', $3, $4, $5)",
            signed["sequence"],
            "f" * 64,
            signed["key_id"],
            signed["public_key"],
            signed["signature"],
        )
    finally:
        await conn.close()
    verdict = await audit.verify()
    assert verdict["ok"] is False
    assert any("no valid signature" in p["reason"] for p in verdict["problems"])


async def test_checkpoints_are_signed_listed_and_verified(audit: AuditClient) -> None:
    await fill(audit, 3)
    signed = await audit.checkpoint()
    assert signed["sequence"] == 3
    assert signed["kind"] == "manual"
    page = (await audit.http.get("/api/v1/audit/checkpoints", headers=audit.admin())).json()
    assert [c["id"] for c in page["items"]] == [signed["id"]]
    verdict = await audit.verify()
    assert verdict["ok"] is True
    assert verdict["checkpoints_checked"] == 1
    # Periodic signing skips a head that is already signed, and signs a head that moved.
    checkpointer = audit.app.state.audit.checkpointer
    await fill(audit, 1)
    assert (await checkpointer.run_once()) is not None
    assert (await checkpointer.run_once()) is None


async def test_the_key_file_is_private_and_outside_the_database(audit: AuditClient, database: DatabaseFixture) -> None:
    settings = audit.app.state.audit.settings
    path = settings.checkpoint_key_path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    await fill(audit, 1)
    signed = await audit.checkpoint()
    pem = path.read_text()
    admin = await database.admin()
    try:
        stored = await admin.fetch("SELECT * FROM audit.checkpoints")
    finally:
        await admin.close()
    assert "PRIVATE KEY" in pem
    assert all(pem.strip() not in str(dict(row)) for row in stored)
    assert path.with_suffix(".pub").read_text().strip() == signed["public_key"]


async def test_the_runtime_role_cannot_change_or_remove_events(audit: AuditClient, database: DatabaseFixture) -> None:
    await fill(audit, 2)
    conn = await database.connect_as("audit")
    try:
        for sql in (
            "UPDATE audit.events SET action = 'orders.nothing.happened'",
            "DELETE FROM audit.events",
            "TRUNCATE audit.events",
            "UPDATE audit.checkpoints SET head_hash = head_hash",
            "DELETE FROM audit.checkpoints",
            "UPDATE audit.pseudonyms SET pseudonym = 'x'",
            "DELETE FROM audit.alerts",
            "SET comptoir.audit_retention = 'archive'; DELETE FROM audit.events",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute(sql)
        # What it may do beyond SELECT and INSERT: count alert repeats, and erase pseudonyms.
        await conn.execute("UPDATE audit.alerts SET occurrences = occurrences")
        await conn.execute("DELETE FROM audit.pseudonyms WHERE false")
    finally:
        await conn.close()
    assert len(await chain_rows(database)) == 2


async def test_the_trigger_refuses_changes_even_for_the_owner(audit: AuditClient, database: DatabaseFixture) -> None:
    await fill(audit, 2)
    await audit.checkpoint()
    admin = await database.admin()
    try:
        await admin.execute("SET ROLE comptoir_audit_owner")
        for sql in (
            "UPDATE audit.events SET action = 'orders.nothing.happened' WHERE sequence = 1",
            "DELETE FROM audit.events WHERE sequence = 2",
            "TRUNCATE audit.events",
            "UPDATE audit.checkpoints SET head_hash = repeat('0', 64)",
            "DELETE FROM audit.checkpoints",
            "TRUNCATE audit.checkpoints",
            # The retention path needs an archive checkpoint covering the rows, and there is none.
            "SET comptoir.audit_retention = 'archive'; DELETE FROM audit.events WHERE sequence = 1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await admin.execute(sql)
    finally:
        await admin.close()
    assert len(await chain_rows(database)) == 3
    assert (await audit.verify())["ok"] is True
