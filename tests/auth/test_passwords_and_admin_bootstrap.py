"""Hashing parameters and threads, the common-password list, the first admin (start-up and CLI), messages."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from comptoir import cli
from services.auth.config import Settings
from services.auth.errors import HashingBusy
from services.auth.messages import SIGNATURE_HEADER, TIMESTAMP_HEADER, DeliveryFailed, JsonlSink, Message, WebhookSender
from services.auth.passwords import PasswordHasher, common_passwords
from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import DatabaseFixture, assert_problem

ADMIN_PASSWORD = "the very first admin passphrase"


def test_production_defaults_are_the_design_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AUTH_PBKDF2_ROUNDS", "AUTH_PASSWORD_MIN_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(database_url="postgresql://x@/y")
    assert s.pbkdf2_rounds == 600_000
    assert (s.password_min_length, s.password_max_length) == (12, 128)
    assert (s.access_token_ttl_seconds, s.refresh_token_ttl_seconds, s.refresh_idle_timeout_seconds) == (
        3600,
        604800,
        86400,
    )
    assert s.max_sessions_per_user == 5
    assert (s.login_delay_after_failures, s.login_delay_base_seconds, s.login_delay_max_seconds) == (5, 30, 900)
    assert s.login_account_delay_after_failures == 10
    assert (s.otp_digits, s.otp_ttl_seconds, s.otp_max_attempts, s.otp_max_per_window, s.otp_max_per_day) == (
        6,
        600,
        5,
        3,
        10,
    )
    assert s.password_reset_ttl_seconds == 1800
    assert s.service_token_ttl_seconds == 300
    assert s.resolved_messages_path == Path("var/messages.jsonl")
    assert s.resolved_keys_dir == Path("var/keys")


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_PBKDF2_ROUNDS", "700000")
    monkeypatch.setenv("AUTH_SERVICE_CLIENTS", json.dumps({"gateway": "A" * 64}))
    monkeypatch.setenv("BOOTSTRAP_ADMIN_EMAIL", "boss@example.cm")
    s = Settings()
    assert s.pbkdf2_rounds == 700_000
    assert s.service_clients == {"gateway": "a" * 64}
    assert s.bootstrap_admin_email == "boss@example.cm"
    monkeypatch.setenv("AUTH_SERVICE_CLIENTS", json.dumps({"gateway": "plain secret"}))
    with pytest.raises(ValueError, match="SHA-256"):
        Settings()


def test_the_common_password_list_is_bundled() -> None:
    words = common_passwords()
    assert len(words) >= 10_000
    assert {"password", "123456", "qwerty"} <= words


async def test_hashes_use_the_configured_rounds_and_a_128_bit_salt() -> None:
    hasher = PasswordHasher(1000, workers=1)
    try:
        first, second = await hasher.hash("same input"), await hasher.hash("same input")
    finally:
        hasher.close()
    assert first != second
    _, scheme, rounds, salt, _digest = first.split("$")
    assert (scheme, rounds) == ("pbkdf2-sha256", "1000")
    assert len(salt) >= 21  # 16 bytes in passlib's base64


async def test_hashing_never_blocks_the_event_loop() -> None:
    hasher = PasswordHasher(300_000, workers=2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        started = time.perf_counter()
        await asyncio.gather(*(hasher.hash(f"pw {i}") for i in range(4)))
        elapsed = time.perf_counter() - started
    finally:
        task.cancel()
        hasher.close()
    # The loop kept turning while PBKDF2 ran in the threads.
    assert ticks >= max(3, elapsed / 0.005 * 0.2), (ticks, elapsed)


def thread_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def thread_os_name() -> str:
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


async def test_hashing_threads_run_below_the_event_loops_priority() -> None:
    hasher = PasswordHasher(1000, workers=2, nice=10)
    try:
        loop_nice = thread_nice()
        nices = await asyncio.gather(*(hasher._run(thread_nice) for _ in range(4)))
        assert set(nices) == {min(19, loop_nice + 10)}
        assert thread_nice() == loop_nice  # the loop's own thread is untouched
        # The operating system sees them by name (top -H, ps -L): the benchmark reads their CPU that way.
        assert set(await asyncio.gather(*(hasher._run(thread_os_name) for _ in range(4)))) == {"pbkdf2"}
        assert thread_os_name() != "pbkdf2"
        assert (await hasher.verify("pw", await hasher.hash("pw")))[0]
    finally:
        hasher.close()
    plain = PasswordHasher(1000, workers=1, nice=0)
    try:
        assert await plain._run(thread_nice) == thread_nice()
    finally:
        plain.close()


async def test_the_auth_service_hashes_at_the_configured_nice(make_auth: MakeAuth) -> None:
    assert Settings(database_url="postgresql://x@/y").hash_nice == 10
    async with make_auth(hash_nice=7) as auth:
        await auth.register()  # a hash ran in the service's pool
        hasher = auth.app.state.auth.hasher
        assert await hasher._run(thread_nice) == min(19, thread_nice() + 7)


class ManualClock:
    """The hasher's timer, moved by the test only: a "hash" of ``seconds`` is a step of this clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, seconds: float) -> Callable[[], None]:
        def hash_taking() -> None:
            self.now += seconds

        return hash_taking


async def test_a_hash_that_would_wait_too_long_is_refused_at_once() -> None:
    clock = ManualClock()
    hasher = PasswordHasher(1000, workers=1, max_wait=2.0, timer=clock)
    release = threading.Event()
    try:
        await hasher._run(clock.step(1.0))  # the moving average now says one second a hash
        assert hasher.seconds_per_hash == 1.0
        running = asyncio.ensure_future(hasher._run(release.wait))
        queued = [asyncio.ensure_future(hasher.hash(f"pw {i}")) for i in range(2)]  # 1 s and 2 s ahead of them
        await asyncio.sleep(0)
        assert (hasher.pending, hasher.expected_wait()) == (3, 3.0)
        with pytest.raises(HashingBusy) as refused:
            await hasher.hash("one too many")
        assert refused.value.status == 503
        assert refused.value.headers["Retry-After"] == "1"
        assert hasher.pending == 3  # the refused one never entered the queue
        release.set()
        await asyncio.gather(running, *queued)
        assert hasher.pending == 0
        await hasher.hash("room again")
    finally:
        release.set()
        hasher.close()


async def test_a_hash_whose_turn_comes_too_late_is_refused_then_and_never_computed() -> None:
    clock = ManualClock()
    hasher = PasswordHasher(1000, workers=1, max_wait=2.0, timer=clock)
    started, release, computed = threading.Event(), threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        release.wait()

    try:
        await hasher._run(clock.step(0.1))  # hashes look quick: the next one is admitted
        running = asyncio.ensure_future(hasher._run(blocker))
        late = asyncio.ensure_future(hasher._run(computed.set))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        assert hasher.expected_wait() < hasher.max_wait  # admitted on the estimate...
        clock.now += 4.5  # ...but the hash ahead takes 4.5 s: more than twice max_wait when its turn comes
        release.set()
        await running
        with pytest.raises(HashingBusy) as refused:
            await late
        assert refused.value.headers["Retry-After"] == "1"  # nothing is queued now
        assert not computed.is_set()
        assert hasher.pending == 0
        assert hasher.seconds_per_hash == pytest.approx(0.1 * 0.8 + 4.5 * 0.2)  # the dropped one taught nothing
        on_time = asyncio.ensure_future(hasher._run(computed.set))
        await on_time
        assert computed.is_set()
    finally:
        release.set()
        hasher.close()


async def test_a_login_refused_for_want_of_hashing_capacity_counts_nothing(make_auth: MakeAuth) -> None:
    release = threading.Event()
    async with make_auth(hash_workers=1, hash_max_wait_seconds=1e-9) as auth:
        user = await auth.register()  # one real hash: the service knows how long a hash takes
        hasher = auth.app.state.auth.hasher
        hasher.timer = ManualClock()  # standing still: the blocker below is never late
        blocker = asyncio.ensure_future(hasher._run(release.wait))  # the only thread is busy
        try:
            await asyncio.sleep(0)
            response = await auth.login(user["email"])
            body = assert_problem(response, 503)
            assert body["type"] == "urn:comptoir:problem:hashing-busy"
            assert response.headers["Retry-After"] == "1"
            assert body["retry_after"] == 1
            # Nothing was counted against the account, the address or the device, and nothing audited.
            assert await auth.sql("SELECT * FROM auth.login_failures") == []
            assert await auth.events("auth.login.failed") == []
        finally:
            release.set()
            await blocker
        assert (await auth.login(user["email"])).status_code == 200


async def test_a_login_whose_hash_comes_too_late_is_refused_and_its_count_taken_back(make_auth: MakeAuth) -> None:
    started, release = threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        release.wait()

    async with make_auth(hash_workers=1, hash_max_wait_seconds=5) as auth:
        user = await auth.register()
        hasher = auth.app.state.auth.hasher
        clock = hasher.timer = ManualClock()
        running = asyncio.ensure_future(hasher._run(blocker))  # the only thread is busy...
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        try:
            login = asyncio.ensure_future(auth.login(user["email"], "not the password at all"))
            while hasher.pending < 2:  # admitted (a hash is quick), counted, queued behind the blocker
                await asyncio.sleep(0.01)
            rows = await auth.sql("SELECT ip, failures FROM auth.login_failures ORDER BY ip")
            assert [row["failures"] for row in rows] == [1, 1, 1]  # the attempt is counted while it waits
            clock.now += 11  # ...for 11 s: more than twice the 5 s allowed when the login's turn comes
            release.set()
            response = await login
        finally:
            release.set()
            await running
        body = assert_problem(response, 503)
        assert body["type"] == "urn:comptoir:problem:hashing-busy"
        assert response.headers["Retry-After"] == "1"  # the queue is empty now
        # The wrong password was never checked: the count is taken back and nothing is audited.
        rows = await auth.sql("SELECT ip, failures, locked_until FROM auth.login_failures")
        assert [(row["failures"], row["locked_until"]) for row in rows] == [(0, None)] * 3
        assert await auth.events("auth.login.failed") == []
        assert (await auth.login(user["email"])).status_code == 200


async def test_login_upgrades_a_hash_made_with_other_rounds(make_auth: MakeAuth) -> None:
    async with make_auth(pbkdf2_rounds=1000) as auth:
        user = await auth.register()
    async with make_auth(pbkdf2_rounds=1200) as auth:
        assert (await auth.login(user["email"])).status_code == 200
        row = (await auth.sql("SELECT password_hash FROM auth.users"))[0]
        assert row["password_hash"].startswith("$pbkdf2-sha256$1200$")
        assert (await auth.login(user["email"])).status_code == 200
        assert (await auth.events("auth.login.succeeded"))[0]["new_values"]["hash_upgraded"] is True


# ---- the first admin ----


async def test_bootstrap_admin_at_start_up_once(make_auth: MakeAuth) -> None:
    env = {"bootstrap_admin_email": "Boss@Example.cm", "bootstrap_admin_password": ADMIN_PASSWORD}
    async with make_auth(**env) as auth:
        pair = await auth.tokens("boss@example.cm", ADMIN_PASSWORD)
        me = (await auth.me(pair["access_token"])).json()
        assert me["role"] == "admin"
    async with make_auth(bootstrap_admin_email="other@example.cm", bootstrap_admin_password=ADMIN_PASSWORD) as auth:
        assert (await auth.sql("SELECT count(*) AS n FROM auth.users"))[0]["n"] == 1
        assert (await auth.events("auth.user.admin_created"))[0]["new_values"]["bootstrap"] is True
    assert ADMIN_PASSWORD not in await auth.outbox_text()
    # A bootstrap password a newer policy refuses, left set after the admin exists: auth still starts.
    async with make_auth(bootstrap_admin_email="boss@example.cm", bootstrap_admin_password="123456789012") as auth:
        assert (await auth.sql("SELECT count(*) AS n FROM auth.users"))[0]["n"] == 1


async def test_bootstrap_refuses_a_weak_password(make_auth: MakeAuth) -> None:
    with pytest.raises(RuntimeError, match="too common"):
        async with make_auth(bootstrap_admin_email="boss@example.cm", bootstrap_admin_password="password1234"):
            pass


def test_create_admin_refuses_weak_passwords_before_touching_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "PG_VERSION").write_text("16\n")  # DATA_DIR holds a system (never started here)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BOOTSTRAP_ADMIN_PASSWORD", "boss@example.cm rules")
    monkeypatch.setattr(cli, "_database_url", lambda _s: pytest.fail("no database for a refused password"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["create-admin", "--email", "boss@example.cm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "e-mail" in err
    assert "boss@example.cm rules" not in err


def test_create_admin_prompts_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOTSTRAP_ADMIN_PASSWORD", raising=False)
    answers = iter(["one passphrase here", "another passphrase"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(answers))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)  # a terminal: without one, stdin is read instead
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["create-admin", "--email", "boss@example.cm"])
    assert exit_info.value.code == 2


async def test_comptoir_create_admin_on_the_real_database(
    auth: AuthClient, database: DatabaseFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", database.admin_url)
    monkeypatch.setenv("DATA_DIR", str(database.data_dir))
    monkeypatch.setenv("BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)
    monkeypatch.setenv("AUTH_PBKDF2_ROUNDS", "1000")

    def run() -> object:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["create-admin", "--email", "Chief@Example.cm"])
        return exit_info.value.code

    assert await asyncio.to_thread(run) == 0
    pair = await auth.tokens("chief@example.cm", ADMIN_PASSWORD)
    assert (await auth.me(pair["access_token"])).json()["role"] == "admin"
    assert await asyncio.to_thread(run) == 1  # the e-mail exists now


# ---- messages ----


async def test_jsonl_sink_appends_private_lines(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "messages.jsonl")
    await sink.send(Message(channel="sms", to="+237671234567", body="code 123456"))
    await sink.send(Message(channel="email", to="a@example.cm", subject="Hi", body="link"))
    lines = [json.loads(line) for line in (tmp_path / "messages.jsonl").read_text().splitlines()]
    assert [set(line) for line in lines] == [
        {"channel", "to", "body", "sent_at"},
        {"channel", "to", "subject", "body", "sent_at"},
    ]
    assert (tmp_path / "messages.jsonl").stat().st_mode & 0o077 == 0


async def test_webhook_signs_the_body_and_retries() -> None:
    secret = "s" * 40
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) < 3 else 200)

    sender = WebhookSender(
        "https://sms.example.cm/hook", secret, retries=3, backoff=0, transport=httpx.MockTransport(handler)
    )
    try:
        await sender.send(Message(channel="sms", to="+237671234567", body="code 123456"))
    finally:
        await sender.aclose()
    assert len(seen) == 3
    request = seen[-1]
    body = request.content
    expected = hmac.new(secret.encode(), request.headers[TIMESTAMP_HEADER].encode() + b"." + body, hashlib.sha256)
    assert request.headers[SIGNATURE_HEADER] == "sha256=" + expected.hexdigest()
    assert json.loads(body)["to"] == "+237671234567"


async def test_webhook_stops_after_its_retries() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503)

    sender = WebhookSender(
        "https://sms.example.cm/hook", "s" * 40, retries=2, backoff=0, transport=httpx.MockTransport(handler)
    )
    try:
        with pytest.raises(DeliveryFailed, match="did not accept"):
            await sender.send(Message(channel="sms", to="+237671234567", body="x"))
    finally:
        await sender.aclose()
    assert len(seen) == 3  # the first try and two retries, no more


async def test_webhook_gives_up_and_refuses_plain_http() -> None:
    with pytest.raises(ValueError, match="https"):
        WebhookSender("http://sms.example.cm/hook", "s" * 40)
    sender = WebhookSender(
        "https://sms.example.cm/hook",
        "s" * 40,
        retries=1,
        backoff=0,
        transport=httpx.MockTransport(lambda _r: httpx.Response(400)),
    )
    try:
        with pytest.raises(DeliveryFailed):
            await sender.send(Message(channel="sms", to="+237671234567", body="x"))
    finally:
        await sender.aclose()


async def test_codes_and_tokens_never_reach_the_logs(auth: AuthClient, caplog: pytest.LogCaptureFixture) -> None:
    user, pair = await auth.user(phone="+237671234567")
    await auth.client.post("/api/v1/auth/otp/request", headers={"Authorization": f"Bearer {pair['access_token']}"})
    await auth.client.post("/api/v1/auth/password-reset/request", json={"email": user["email"]})
    code = auth.last_code("+237671234567")
    token = auth.last_reset_token(user["email"])
    logged = caplog.text
    for secret in (code, token, PASSWORD, pair["refresh_token"]):
        assert secret not in logged
    assert_problem(await auth.login(user["email"], "x" * 2000), 422)
