"""Retention with an injected clock: expired codes, links, sessions and devices go; inactive customers are
anonymised everywhere (the other services first); nothing younger than its period is touched."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from comptoir.cli import main
from services.auth.retention import purge
from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.auth.test_gdpr import FakePeers, down
from tests.conftest import DatabaseFixture
from tests.support.tokens import bearer

DAY = 86_400


async def count(auth: AuthClient, table: str, user_id: str) -> int:
    rows = await auth.sql(f"SELECT count(*) AS n FROM auth.{table} WHERE user_id = $1", user_id)  # noqa: S608
    return int(rows[0]["n"])


async def test_expired_rows_are_deleted_after_their_period_and_young_ones_kept(make_auth: MakeAuth) -> None:
    async with make_auth(gdpr_services=[], retention_days=30, device_ttl_days=90, inactive_account_days=0) as auth:
        rt = auth.app.state.auth
        user, pair = await auth.user(phone="+237671234567")
        headers = bearer(pair["access_token"])
        # A code, a reset link, a second session ended by logout, an extra device.
        assert (await auth.client.post("/api/v1/auth/otp/request", headers=headers)).status_code == 202
        await auth.client.post("/api/v1/auth/password-reset/request", json={"email": user["email"]})
        other = await auth.tokens(user["email"])
        assert (await auth.client.post("/api/v1/auth/logout", headers=bearer(other["access_token"]))).status_code == 204
        assert await count(auth, "otp_codes", user["id"]) == 1
        assert await count(auth, "password_resets", user["id"]) == 1
        assert await count(auth, "devices", user["id"]) == 2

        # Nothing is old enough yet.
        report = await purge(rt)
        assert (report.otp_codes, report.reset_links, report.sessions, report.devices) == (0, 0, 0, 0)

        auth.clock.advance(2 * DAY)  # codes and links expired more than a day ago
        report = await purge(rt)
        assert (report.otp_codes, report.otp_sends, report.reset_links) == (1, 1, 1)
        assert report.sessions == 0  # revoked two days ago: kept for 30
        assert await count(auth, "otp_codes", user["id"]) == 0

        auth.clock.advance(29 * DAY)  # the logged-out session was revoked 31 days ago
        report = await purge(rt)
        assert report.sessions == 1
        assert await count(auth, "sessions", user["id"]) == 1  # the other ended (7-day lifetime) 24 days ago
        assert report.devices == 0  # last seen 31 days ago: still known

        auth.clock.advance(60 * DAY)
        report = await purge(rt)
        assert (report.sessions, report.devices) == (1, 2)
        assert await count(auth, "sessions", user["id"]) == 0
        assert await count(auth, "devices", user["id"]) == 0
        # The account itself is untouched (inactivity anonymisation is off here).
        assert (await auth.login(user["email"])).status_code == 200


async def test_inactive_customers_are_anonymised_everywhere_and_others_kept(make_auth: MakeAuth) -> None:
    peers = FakePeers()
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler), inactive_account_days=365) as auth:
        peers.app = auth.app
        rt = auth.app.state.auth
        idle, _ = await auth.user(full_name="Idle Customer", phone="+237671234567")
        staff, _ = await auth.user("staff")
        active, _ = await auth.user()
        auth.clock.advance(300 * DAY)
        assert (await auth.login(active["email"])).status_code == 200
        auth.clock.advance(66 * DAY)

        report = await purge(rt)
        assert report.anonymised == 1
        assert peers.calls == [
            ("orders", "POST", f"/internal/users/{idle['id']}/erase"),
            ("audit", "POST", f"/internal/users/{idle['id']}/erase"),
        ]
        rows = await auth.sql(
            "SELECT email, full_name, phone, is_active, erased_at FROM auth.users WHERE id = $1", idle["id"]
        )
        assert (rows[0]["email"], rows[0]["full_name"], rows[0]["phone"], rows[0]["is_active"]) == (
            None,
            None,
            None,
            False,
        )
        assert rows[0]["erased_at"] is not None
        assert await count(auth, "sessions", idle["id"]) == 0
        event = (await auth.events("auth.user.anonymised"))[0]
        assert event["resource_id"] == idle["id"]
        assert event["actor_role"] == "system"
        assert "Idle Customer" not in await auth.outbox_text()
        # Staff and the customer who signed in recently are kept; the e-mail is free again.
        assert (await auth.login(staff["email"])).status_code == 200
        assert (await auth.login(active["email"])).status_code == 200
        assert (await auth.login(idle["email"])).status_code == 401
        await auth.register(idle["email"])
        # A second run finds nothing more to do.
        assert (await purge(rt)).anonymised == 0


async def test_an_account_whose_erasure_elsewhere_fails_is_kept_for_the_next_run(make_auth: MakeAuth) -> None:
    peers = FakePeers(answers={("audit", "erase"): down})
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler), inactive_account_days=30) as auth:
        peers.app = auth.app
        rt = auth.app.state.auth
        user, _ = await auth.user()
        auth.clock.advance(31 * DAY)
        report = await purge(rt)
        assert report.anonymised == 0
        assert report.postponed == [user["id"]]
        assert (await auth.login(user["email"], PASSWORD)).status_code == 200
        # The login made it active again: the next run leaves it alone even once audit is back.
        peers.answers.clear()
        assert (await purge(rt)).anonymised == 0


async def test_comptoir_purge_runs_the_same_purge_on_demand(
    auth: AuthClient, database: DatabaseFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    user = await auth.register(phone="+237671234567")
    await auth.sql(
        "INSERT INTO auth.otp_codes (id, user_id, phone, code_mac, created_at, expires_at, attempts) "
        "VALUES (gen_random_uuid(), $1, '+237671234567', repeat('a', 64), now() - interval '3 days', "
        "now() - interval '2 days', 0)",
        user["id"],
    )
    monkeypatch.setenv("DATABASE_URL", database.admin_url)
    # The same data directory as the test database's provisioning: migrate keeps the roles' passwords.
    monkeypatch.setenv("DATA_DIR", str(database.data_dir))
    monkeypatch.setenv("AUTH_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("AUTH_GDPR_SERVICES", "[]")
    capsys.readouterr()  # what this test printed so far
    with pytest.raises(SystemExit) as exited:
        await asyncio.to_thread(main, ["purge"])
    assert exited.value.code == 0
    # Standard output is the JSON document alone (`comptoir purge | jq`); the auth app's log lines go to stderr.
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["otp_codes"] == 1
    assert report["anonymised"] == 0
    logged = next(json.loads(line) for line in printed.err.splitlines() if "auth.retention.purged" in line)
    assert {k: logged[k] for k in report} == report  # the command and its log line say the same, unredacted
    assert await count(auth, "otp_codes", user["id"]) == 0


async def test_a_customer_whose_session_is_in_use_is_active_whenever_they_last_signed_in(make_auth: MakeAuth) -> None:
    peers = FakePeers()
    async with make_auth(
        peer_transport=httpx.MockTransport(peers.handler), inactive_account_days=30, refresh_token_ttl_seconds=40 * DAY
    ) as auth:
        peers.app = auth.app
        rt = auth.app.state.auth
        user, pair = await auth.user()
        refresh = pair["refresh_token"]
        for _ in range(62):  # signed in once, then the app refreshes its session twice a day for a month
            auth.clock.advance(DAY // 2)
            answer = await auth.refresh(refresh)
            assert answer.status_code == 200, answer.text
            refresh = answer.json()["refresh_token"]
        assert (await purge(rt)).anonymised == 0
        assert peers.calls == []
        assert (await auth.refresh(refresh)).status_code == 200

        auth.clock.advance(31 * DAY)  # the session ended (40 days), and nothing since: inactive now
        assert (await purge(rt)).anonymised == 1


class Peer(http.server.BaseHTTPRequestHandler):
    """A peer service's erase endpoint: notes the call and answers 204."""

    calls: ClassVar[list[tuple[int, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - the handler's interface
        Peer.calls.append((self.server.server_address[1], self.path))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


async def test_comptoir_purge_asks_the_peers_on_the_ports_comptoir_run_gives_them(
    auth: AuthClient, database: DatabaseFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    user = await auth.register()
    await auth.sql(
        "UPDATE auth.users SET created_at = now() - interval '3 years', last_login_at = NULL WHERE id = $1", user["id"]
    )
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Peer) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    orders_port, audit_port = (s.server_address[1] for s in servers)
    Peer.calls.clear()
    monkeypatch.setenv("DATABASE_URL", database.admin_url)
    monkeypatch.setenv("DATA_DIR", str(database.data_dir))
    monkeypatch.setenv("AUTH_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("ORDERS_PORT", str(orders_port))  # not the standard 8003 and 8004
    monkeypatch.setenv("AUDIT_PORT", str(audit_port))
    for name in ("AUTH_ORDERS_URL", "AUTH_AUDIT_URL"):
        monkeypatch.delenv(name, raising=False)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exited:
            await asyncio.to_thread(main, ["purge"])
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert exited.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["anonymised"], report["postponed"]) == (1, [])
    assert sorted(Peer.calls) == sorted(
        [(orders_port, f"/internal/users/{user['id']}/erase"), (audit_port, f"/internal/users/{user['id']}/erase")]
    )


async def test_an_account_that_signs_in_during_the_run_is_not_erased_anywhere(make_auth: MakeAuth) -> None:
    """The run lists the inactive accounts first and asks the other services to erase each in turn: one that
    signs in before its turn must not lose its orders and audit links while its account is kept."""
    peers = FakePeers()
    first: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        erased = request.url.path.split("/")[-2]
        if not first:  # while the first account is erased elsewhere, the other one signs in
            first.append(erased)
            other = next(u["id"] for u in users if u["id"] != erased)
            await auth.sql("UPDATE auth.users SET last_login_at = $1 WHERE id = $2", auth.app.state.auth.now(), other)
        return await peers.handler(request)

    async with make_auth(peer_transport=httpx.MockTransport(handler), inactive_account_days=30) as auth:
        peers.app = auth.app
        users = [(await auth.user())[0] for _ in range(2)]
        auth.clock.advance(31 * DAY)
        report = await purge(auth.app.state.auth)
    assert report.anonymised == 1
    assert {path.split("/")[-2] for _, _, path in peers.calls} == set(first)
