"""Login throttling with an injected clock: delays, bounded account delays, staff unlock, recovery by reset."""

from __future__ import annotations

import asyncio

from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import bearer

WRONG = "definitely not it"


def from_ip(ip: str) -> dict[str, dict[str, str]]:
    return {"headers": {"X-Forwarded-For": ip}}


async def fail(auth: AuthClient, email: str, times: int, **kwargs: object) -> list[int]:
    return [(await auth.login(email, WRONG, **kwargs)).status_code for _ in range(times)]


def retry_after(response: object) -> int:
    body = assert_problem(response, 429)  # type: ignore[arg-type]
    assert body["type"] == "urn:comptoir:problem:login-throttled"
    value = int(response.headers["retry-after"])  # type: ignore[attr-defined]
    assert body["retry_after"] == value
    return value


async def test_the_fifth_failure_starts_a_delay_that_doubles_up_to_fifteen_minutes(auth: AuthClient) -> None:
    user = await auth.register()
    assert await fail(auth, user["email"], 4) == [401] * 4
    assert retry_after(await auth.login(user["email"], WRONG)) == 30
    # During the delay even the right password is refused, with the time left.
    auth.clock.advance(10)
    assert retry_after(await auth.login(user["email"])) == 20
    expected = [60, 120, 240, 480, 900, 900]
    for delay in expected:
        auth.clock.advance(1000)
        assert retry_after(await auth.login(user["email"], WRONG)) == delay
    auth.clock.advance(899)
    assert retry_after(await auth.login(user["email"])) == 1
    auth.clock.advance(1)
    assert (await auth.login(user["email"])).status_code == 200
    # Success reset the counters: four free failures again.
    assert await fail(auth, user["email"], 4) == [401] * 4
    events = await auth.events("auth.login.throttled")
    assert events
    assert all(event["outcome"] == "denied" for event in events)
    assert await auth.events("auth.login.failed")


async def test_unknown_emails_are_throttled_the_same_way(auth: AuthClient) -> None:
    user = await auth.register()
    known = [await auth.login(user["email"], WRONG) for _ in range(5)]
    unknown = [await auth.login("ghost@example.cm", WRONG) for _ in range(5)]
    for a, b in zip(known, unknown, strict=True):
        assert a.status_code == b.status_code
        assert a.headers.get("retry-after") == b.headers.get("retry-after")
        body_a, body_b = a.json(), b.json()
        body_a.pop("request_id"), body_b.pop("request_id")
        assert body_a == body_b


async def test_an_attacker_elsewhere_does_not_delay_the_owner(auth: AuthClient) -> None:
    user = await auth.register()
    assert (await fail(auth, user["email"], 6, **from_ip("198.51.100.66")))[-2:] == [429, 429]
    owner = await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.10"})
    assert owner.status_code == 200
    # The owner's success does not clear the attacker's own delay.
    assert (await auth.login(user["email"], WRONG, **from_ip("198.51.100.66"))).status_code == 429


async def test_concurrent_guesses_cannot_slip_past_the_threshold(auth: AuthClient) -> None:
    user = await auth.register()
    answers = await asyncio.gather(*(auth.login(user["email"], WRONG) for _ in range(12)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [401] * 4 + [429] * 8
    rows = await auth.sql("SELECT failures FROM auth.login_failures WHERE ip = ''")
    assert rows[0]["failures"] == 5


async def test_failures_from_many_addresses_delay_the_account_but_never_lock_it(make_auth: MakeAuth) -> None:
    async with make_auth() as auth:
        user = await auth.register()
        # Spread over many addresses: no pair reaches its delay, the account counter does at the 10th.
        statuses = []
        for i in range(10):
            statuses += await fail(auth, user["email"], 1, **from_ip(f"198.51.100.{i}"))
        assert statuses == [401] * 9 + [429]
        delayed = await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.99"})
        assert retry_after(delayed) == 30
        # Bounded: however long it goes on, the wait never exceeds 15 minutes, then the owner is back.
        for i in range(10, 30):
            auth.clock.advance(901)
            await fail(auth, user["email"], 1, **from_ip(f"198.51.100.{i}"))
        assert retry_after(await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.99"})) <= 900
        auth.clock.advance(900)
        assert (await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.99"})).status_code == 200
        assert not await auth.events("auth.account.locked")

        # Staff can still clear the counters at once.
        for i in range(10):
            await fail(auth, user["email"], 1, **from_ip(f"198.51.100.{100 + i}"))
        assert (await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.99"})).status_code == 429
        _, staff = await auth.user("staff")
        path = f"/api/v1/auth/admin/users/{user['id']}/unlock"
        response = await auth.client.post(path, headers=bearer(staff["access_token"]))
        assert response.status_code == 204
        assert (await auth.login(user["email"], headers={"X-Forwarded-For": "192.0.2.99"})).status_code == 200
        unlocked = await auth.events("auth.user.unlocked")
        assert unlocked[0]["resource_id"] == user["id"]
        assert unlocked[0]["actor_role"] == "staff"


async def test_a_locked_out_victim_recovers_by_password_reset(auth: AuthClient) -> None:
    user = await auth.register()
    await auth.sql(
        "INSERT INTO auth.login_failures (account_key, ip, failures, last_failure_at, locked_until) "
        # Locked for 899.5 s more: PostgreSQL keeps microseconds, so the whole-second answer is 900 however
        # the injected clock's float rounds there (900 s exactly could come back as 900.000001, i.e. 901).
        "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex'), '', 100, to_timestamp($2), to_timestamp($2 + 899.5)",
        user["email"],
        auth.clock.now,
    )
    assert retry_after(await auth.login(user["email"])) == 900
    response = await auth.client.post("/api/v1/auth/password-reset/request", json={"email": user["email"]})
    assert response.status_code == 202
    token = auth.last_reset_token(user["email"])
    new_password = "recovered and renewed"
    confirm = await auth.client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": new_password}
    )
    assert confirm.status_code == 204
    assert (await auth.login(user["email"], new_password)).status_code == 200


async def test_unlock_is_staff_only_and_404_for_unknown_users(auth: AuthClient) -> None:
    user, customer = await auth.user()
    _, staff = await auth.user("staff")
    path = f"/api/v1/auth/admin/users/{user['id']}/unlock"
    assert_problem(await auth.client.post(path, headers=bearer(customer["access_token"])), 403)
    assert_problem(await auth.client.post(path), 401)
    missing = "/api/v1/auth/admin/users/00000000-0000-4000-8000-000000000000/unlock"
    assert_problem(await auth.client.post(missing, headers=bearer(staff["access_token"])), 404)


async def test_only_an_admin_unlocks_staff_and_admin_accounts(auth: AuthClient) -> None:
    """Staff clearing an admin's (or a colleague's) counters could keep guessing at that account."""
    admin, admin_pair = await auth.user("admin")
    colleague, _ = await auth.user("staff")
    customer = await auth.register()
    _, staff = await auth.user("staff")
    for target in (admin, colleague, customer):
        assert await fail(auth, target["email"], 4) == [401] * 4
        retry_after(await auth.login(target["email"], WRONG))
    for target in (admin, colleague):
        refused = assert_problem(
            await auth.client.post(
                f"/api/v1/auth/admin/users/{target['id']}/unlock", headers=bearer(staff["access_token"])
            ),
            403,
        )
        assert refused["type"] == "urn:comptoir:problem:unlock-not-allowed"
        retry_after(await auth.login(target["email"]))  # still throttled
    assert not await auth.events("auth.user.unlocked")
    assert [e["resource_id"] for e in await auth.events("auth.user.unlock_denied")] == [admin["id"], colleague["id"]]
    for target, token in ((customer, staff), (colleague, admin_pair), (admin, admin_pair)):
        path = f"/api/v1/auth/admin/users/{target['id']}/unlock"
        assert (await auth.client.post(path, headers=bearer(token["access_token"]))).status_code == 204
        assert (await auth.login(target["email"])).status_code in (200, 401)  # 401: the admin's second factor
    assert len(await auth.events("auth.user.unlocked")) == 3


async def test_thresholds_are_settings(make_auth: MakeAuth) -> None:
    async with make_auth(login_delay_after_failures=2, login_delay_base_seconds=5, login_delay_max_seconds=7) as auth:
        user = await auth.register()
        assert (await auth.login(user["email"], WRONG)).status_code == 401
        assert retry_after(await auth.login(user["email"], WRONG)) == 5
        auth.clock.advance(5)
        assert retry_after(await auth.login(user["email"], WRONG)) == 7


async def test_password_guessing_through_password_change_is_throttled_too(auth: AuthClient) -> None:
    _, pair = await auth.user()
    headers = bearer(pair["access_token"])
    body = {"current_password": WRONG, "new_password": "some other long passphrase"}
    statuses = [
        (await auth.client.post("/api/v1/auth/me/password", json=body, headers=headers)).status_code for _ in range(6)
    ]
    assert statuses == [400] * 4 + [429, 429]
    right = {"current_password": PASSWORD, "new_password": "some other long passphrase"}
    assert (await auth.client.post("/api/v1/auth/me/password", json=right, headers=headers)).status_code == 429
