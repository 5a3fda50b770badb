"""Audit down means events wait, never events lost (real processes, real HTTP, real PostgreSQL); while audit
hangs, the relay holds a lease on its batch but no lock and no transaction; a relay killed mid-send loses
and repeats nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from comptoir.embedded import SUPERUSER, libpq_url
from tests.e2e.harness import new_system
from tests.support.accounts import CONSENT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"


def admin_url(data_dir: Path) -> str:
    creds = json.loads((data_dir / "secrets" / "postgres.json").read_text())
    return libpq_url(SUPERUSER, creds["superuser_password"], data_dir / "pg")


async def outbox_state(data_dir: Path) -> tuple[int, list[str], list[str]]:
    conn = await asyncpg.connect(admin_url(data_dir))
    try:
        pending = await conn.fetchval("SELECT count(*) FROM auth.outbox WHERE delivered_at IS NULL")
        sent = [str(r["id"]) for r in await conn.fetch("SELECT id FROM auth.outbox")]
        stored = [str(r["id"]) for r in await conn.fetch("SELECT id FROM audit.events WHERE service = 'auth'")]
        return int(pending), sent, stored
    finally:
        await conn.close()


async def longest_user_agent(data_dir: Path) -> int:
    conn = await asyncpg.connect(admin_url(data_dir))
    try:
        return int(await conn.fetchval("SELECT max(length(document::jsonb->>'user_agent')) FROM audit.events"))
    finally:
        await conn.close()


LEASE_SECONDS = 10


async def while_the_relay_waits_on_audit(data_dir: Path) -> int:
    """Once a batch has been claimed and its send has gone on for over a second: no lock on any outbox row,
    no connection of auth idle in a transaction; returns how many rows are leased."""
    conn = await asyncpg.connect(admin_url(data_dir))
    try:
        deadline = time.monotonic() + 30
        while True:
            claimed_at = await conn.fetchval(
                "SELECT max(lease_expires_at) - make_interval(secs => $1) FROM auth.outbox"
                " WHERE delivered_at IS NULL AND lease_expires_at > now()",
                float(LEASE_SECONDS),
            )
            if claimed_at is not None and await conn.fetchval("SELECT now() - $1 > interval '1.5 s'", claimed_at):
                break
            assert time.monotonic() < deadline, "no batch was claimed"
            await asyncio.sleep(0.1)
        leased = [r["id"] for r in await conn.fetch("SELECT id FROM auth.outbox WHERE lease_expires_at > now()")]
        async with conn.transaction():  # every leased row can be locked at once, without waiting
            locked = await conn.fetch("SELECT id FROM auth.outbox WHERE id = ANY($1) FOR UPDATE NOWAIT", leased)
            assert len(locked) == len(leased)
        pinned = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'comptoir-auth'"
            " AND state LIKE 'idle in transaction%' AND now() - state_change > interval '1 s'"
        )
        assert pinned == 0
        return len(leased)
    finally:
        await conn.close()


async def leased_rows(data_dir: Path) -> int:
    conn = await asyncpg.connect(admin_url(data_dir))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM auth.outbox WHERE lease_expires_at IS NOT NULL"))
    finally:
        await conn.close()


def test_events_wait_while_audit_is_down_and_arrive_exactly_once(tmp_path: Path) -> None:
    system = new_system(tmp_path)
    system.env["AUTH_PBKDF2_ROUNDS"] = "1000"
    system.env["AUTH_OUTBOX_MAX_BACKOFF_SECONDS"] = "2"  # a cost setting: retry sooner than in production
    system.env["AUTH_OUTBOX_LEASE_SECONDS"] = str(LEASE_SECONDS)
    system.start()
    gateway = system.url()
    try:
        audit = system.child("audit")
        audit.send_signal(signal.SIGSTOP)  # audit hangs: connections are accepted, nothing answers
        try:
            emails = [f"outage-{uuid.uuid4().hex[:8]}@boutique.cm" for _ in range(4)]
            for email in emails:
                # The first client's user agent is as long as audit stores, and its redaction makes it
                # longer: audit refused that event, and every auth event behind it waited for good.
                agent = {"User-Agent": "u" * 503 + " Bearer x"} if email == emails[0] else {}
                assert (
                    httpx.post(
                        gateway + "/api/v1/auth/register",
                        json={"email": email, "password": PASSWORD} | CONSENT,
                        headers=agent,
                    ).status_code
                    == 201
                )
                login = httpx.post(
                    gateway + "/api/v1/auth/login",
                    json={"email": email, "password": PASSWORD},
                )
                assert login.status_code == 200  # no request fails because audit is down
            pending, waiting, stored = asyncio.run(outbox_state(system.data_dir))
            assert pending >= 8
            assert asyncio.run(while_the_relay_waits_on_audit(system.data_dir)) > 0
            # The emitting service dies with kill -9 in the middle of a send; the supervisor restarts it.
            victim = system.child("auth")
            victim.kill()
            victim.wait(10)
            assert asyncio.run(leased_rows(system.data_dir)) > 0  # it did die mid-send: its lease is still there
            system.wait_healthy(processes=["auth"])
        finally:
            audit.send_signal(signal.SIGCONT)

        deadline = time.monotonic() + 60
        while True:
            pending, sent, stored = asyncio.run(outbox_state(system.data_dir))
            if pending == 0 and set(waiting) <= set(stored):
                break
            assert time.monotonic() < deadline, f"{pending} events still pending"
            time.sleep(0.5)
        assert len(stored) == len(set(stored))  # each event stored exactly once
        assert asyncio.run(longest_user_agent(system.data_dir)) == 512
        assert set(waiting) <= set(stored)  # every event that waited for audit arrived
        assert set(sent) - set(stored) == set()  # and what is left in the outbox is only what is not yet sent
        verdict = subprocess.run(
            [sys.executable, "-m", "comptoir.cli", "audit", "verify"],
            env={**system.env, "DATABASE_URL": admin_url(system.data_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verdict.returncode == 0, verdict.stdout + verdict.stderr
        assert json.loads(verdict.stdout)["ok"] is True
    finally:
        assert system.stop() == 0
    logs = system.logs()
    assert PASSWORD not in logs
