"""Operator commands: comptoir audit verify / checkpoints export / archive, on the real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from services.audit import admin
from services.audit.config import Settings
from services.audit.signing import TrustedKeys, load_key
from tests.audit.support import AuditClient, chain_rows, event
from tests.audit.test_integrity import as_superuser, edited
from tests.conftest import DatabaseFixture


async def comptoir(database: DatabaseFixture, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DATABASE_URL": database.admin_url, "DATA_DIR": str(settings.data_dir), "LOG_LEVEL": "ERROR"}
    command = [sys.executable, "-m", "comptoir.cli", *args]
    return await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=120)


async def test_cli_verify_and_checkpoint_export(
    audit: AuditClient, database: DatabaseFixture, audit_settings: Settings
) -> None:
    await audit.send("orders", [event("orders") for _ in range(4)])
    signed = await audit.checkpoint()

    ok = await comptoir(database, audit_settings, "audit", "verify")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) | {"ok": True, "first_bad_sequence": None} == json.loads(ok.stdout)

    exported = await comptoir(database, audit_settings, "audit", "checkpoints", "export")
    assert exported.returncode == 0, exported.stderr
    (line,) = exported.stdout.splitlines()
    entry = json.loads(line)
    assert entry["sequence"] == signed["sequence"]
    assert entry["public_key"] == signed["public_key"]
    assert entry["trusted"] is True
    # The line is self-contained: its public key verifies its message.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from services.audit.signing import unb64

    Ed25519PublicKey.from_public_bytes(unb64(entry["public_key"])).verify(
        unb64(entry["signature"]), entry["message"].encode()
    )

    rows = await chain_rows(database)
    await as_superuser(
        database,
        ("UPDATE audit.events SET document = $1 WHERE sequence = 2", [edited(rows[1]["document"], ip="1.2.3.4")]),
    )
    broken = await comptoir(database, audit_settings, "audit", "verify")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["first_bad_sequence"] == 2
    assert [a["rule"] for a in await audit.alerts()] == ["audit.chain.integrity"]


async def test_retention_archives_to_a_signed_file_and_the_rest_still_verifies(
    audit: AuditClient, database: DatabaseFixture, audit_settings: Settings, tmp_path: Path
) -> None:
    await audit.send("orders", [event("orders") for _ in range(12)])
    await audit.checkpoint()
    await audit.send("orders", [event("orders") for _ in range(3)])
    head = len(await chain_rows(database))

    # Retention off (the default): nothing happens.
    off = await admin.archive(database.admin_url, audit_settings, older_than_days=0, output_dir=tmp_path)
    assert off.archived == 0
    # Everything is older than "one day" ten days from now; the newest event always stays.
    later = datetime.now(UTC) + timedelta(days=10)
    result = await admin.archive(database.admin_url, audit_settings, older_than_days=1, output_dir=tmp_path, now=later)
    assert (result.archived, result.first_sequence, result.last_sequence) == (head - 1, 1, head - 1)
    assert result.file is not None
    assert result.file.stat().st_mode & 0o777 == 0o600

    remaining = await chain_rows(database)
    assert [r["sequence"] for r in remaining] == [head]
    verdict = await audit.verify()
    assert verdict["ok"] is True, verdict
    assert verdict["first_sequence"] == head

    key = load_key(audit_settings.checkpoint_key_path)
    assert key is not None
    trusted = TrustedKeys([key.private.public_key()])
    checked = admin.verify_archive(result.file, trusted)
    assert checked["ok"] is True, checked
    assert (checked["events"], checked["starts_at_genesis"]) == (head - 1, True)
    # The archive continues into what remains: its last hash is the first remaining event's prev_hash.
    last_line = json.loads(result.file.read_text().splitlines()[-2])
    assert last_line["hash"] == remaining[0]["prev_hash"]

    # A tampered archive file does not verify.
    lines = result.file.read_text().splitlines()
    doc = json.loads(lines[0])
    doc["document"] = edited(doc["document"], outcome="failure")
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("\n".join([json.dumps(doc), *lines[1:]]) + "\n")
    assert admin.verify_archive(tampered, trusted)["ok"] is False

    # Later events chain on, and a second archive run continues from the first.
    await audit.send("orders", [event("orders") for _ in range(5)])
    again = await admin.archive(database.admin_url, audit_settings, older_than_days=1, output_dir=tmp_path, now=later)
    assert again.first_sequence == head
    assert (await audit.verify())["ok"] is True
    # Without an archive checkpoint covering them, rows still cannot be deleted.
    conn = await database.admin()
    try:
        await conn.execute("SET ROLE comptoir_audit_owner")
        await conn.execute("SET comptoir.audit_retention = 'archive'")
        newest = await conn.fetchval("SELECT max(sequence) FROM audit.events")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM audit.events WHERE sequence = $1", newest)
    finally:
        await conn.close()
    assert (await audit.verify())["ok"] is True
