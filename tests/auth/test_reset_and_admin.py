"""Password reset (no enumeration, single use, expiry, revokes everything) and administration (RBAC)."""

from __future__ import annotations

import httpx
import jwt
import pytest

from tests.auth.conftest import PASSWORD, AuthClient
from tests.conftest import assert_problem
from tests.support.cursors import FORGED_TIME_CURSORS
from tests.support.tokens import bearer

NEW_PASSWORD = "a fresh and long passphrase"


def sid_of(access_token: str) -> str:
    return str(jwt.decode(access_token, options={"verify_signature": False})["sid"])


async def published_sids(auth: AuthClient) -> set[str]:
    """What the revocation feed carries (read from its table; the HTTP feed is tested in test_sessions)."""
    return {str(row["sid"]) for row in await auth.sql("SELECT sid FROM auth.revocations")}


async def request_reset(auth: AuthClient, email: str) -> httpx.Response:
    return await auth.client.post("/api/v1/auth/password-reset/request", json={"email": email})


async def confirm(auth: AuthClient, token: str, password: str = NEW_PASSWORD) -> httpx.Response:
    return await auth.client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": password}
    )


async def test_reset_request_answers_the_same_for_known_and_unknown_emails(auth: AuthClient) -> None:
    user = await auth.register()
    answers = [
        await request_reset(auth, user["email"]),
        await request_reset(auth, "nobody@example.cm"),
        await request_reset(auth, "not an e-mail at all"),
    ]
    assert {r.status_code for r in answers} == {202}
    assert len({r.text for r in answers}) == 1
    assert len({tuple(sorted((k, v) for k, v in r.headers.items() if k != "x-request-id")) for r in answers}) == 1
    assert [m["to"] for m in auth.messages()] == [user["email"]]
    message = auth.messages()[0]
    assert message["channel"] == "email"
    assert message["subject"]


async def test_reset_sets_the_password_once_and_ends_every_session(auth: AuthClient) -> None:
    user, pair = await auth.user()
    await request_reset(auth, user["email"].upper())
    token = auth.last_reset_token(user["email"])
    assert len(token) >= 43
    stored = await auth.sql("SELECT token_hash FROM auth.password_resets")
    assert stored[0]["token_hash"] != token
    assert (await confirm(auth, token)).status_code == 204
    assert_problem(await auth.me(pair["access_token"]), 401)
    assert_problem(await auth.refresh(pair["refresh_token"]), 401)
    assert_problem(await auth.login(user["email"]), 401)
    assert await published_sids(auth) == {sid_of(pair["access_token"])}
    assert (await auth.login(user["email"], NEW_PASSWORD)).status_code == 200
    body = assert_problem(await confirm(auth, token, "yet another passphrase"), 400)
    assert body["type"] == "urn:comptoir:problem:invalid-reset-token"
    text = await auth.outbox_text()
    assert token not in text
    assert NEW_PASSWORD not in text
    assert (await auth.events("auth.password.reset"))[0]["new_values"] == {"sessions_revoked": 1, "devices_revoked": 1}


async def test_reset_tokens_expire_after_thirty_minutes(auth: AuthClient) -> None:
    user = await auth.register()
    await request_reset(auth, user["email"])
    token = auth.last_reset_token(user["email"])
    auth.clock.advance(1800)
    assert_problem(await confirm(auth, token), 400)


async def test_a_weak_new_password_does_not_spend_the_token(auth: AuthClient) -> None:
    user = await auth.register()
    await request_reset(auth, user["email"])
    token = auth.last_reset_token(user["email"])
    body = assert_problem(await confirm(auth, token, "password"), 422)
    assert body["errors"][0]["loc"] == ["body", "new_password"]  # type: ignore[index]
    assert (await confirm(auth, token)).status_code == 204


async def test_only_the_newest_link_works_and_requests_are_capped(auth: AuthClient) -> None:
    user = await auth.register()
    await request_reset(auth, user["email"])
    first = auth.last_reset_token(user["email"])
    for _ in range(3):
        await request_reset(auth, user["email"])
    assert len(auth.messages(user["email"])) == 3
    newest = auth.last_reset_token(user["email"])
    assert_problem(await confirm(auth, first), 400)
    assert (await confirm(auth, newest)).status_code == 204
    assert await auth.events("auth.password.reset_throttled")


async def test_a_password_change_ends_the_links_asked_for_before_it(auth: AuthClient) -> None:
    """A link asked for before the change (by whoever could read the mailbox then) must not undo it."""
    user, pair = await auth.user()
    await request_reset(auth, user["email"])
    token = auth.last_reset_token(user["email"])
    changed = await auth.client.post(
        "/api/v1/auth/me/password",
        json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
        headers=bearer(pair["access_token"]),
    )
    assert changed.status_code == 204
    body = assert_problem(await confirm(auth, token, "an attackers own passphrase"), 400)
    assert body["type"] == "urn:comptoir:problem:invalid-reset-token"
    assert (await auth.login(user["email"], NEW_PASSWORD)).status_code == 200
    await request_reset(auth, user["email"])  # a link asked for after the change works
    assert (await confirm(auth, auth.last_reset_token(user["email"]), "yet another passphrase")).status_code == 204


async def test_forged_reset_tokens_are_400(auth: AuthClient) -> None:
    assert_problem(await confirm(auth, "forged"), 400)


# ---- administration ----


async def test_staff_list_users_with_pagination(auth: AuthClient) -> None:
    for _ in range(3):
        await auth.register()
        auth.clock.advance(1)
    _, staff = await auth.user("staff")
    _, admin = await auth.user("admin")
    token = staff["access_token"]
    page = (await auth.get("/api/v1/auth/admin/users", token, params={"limit": 2})).json()
    assert len(page["items"]) == 2
    rest = (await auth.get("/api/v1/auth/admin/users", token, params={"cursor": page["next_cursor"]})).json()
    assert rest["next_cursor"] is None
    # Staff see the customers (whom they may unlock), never a colleague's or an admin's e-mail and phone.
    assert [u["role"] for u in page["items"] + rest["items"]] == ["customer"] * 3
    for role in ("staff", "admin"):
        assert_problem(await auth.get("/api/v1/auth/admin/users", token, params={"role": role}), 403)
    everyone = (await auth.get("/api/v1/auth/admin/users", admin["access_token"], params={"limit": 10})).json()
    assert sorted(u["role"] for u in everyone["items"]) == ["admin", "customer", "customer", "customer", "staff"]
    staff_only = (await auth.get("/api/v1/auth/admin/users", admin["access_token"], params={"role": "staff"})).json()
    assert [u["role"] for u in staff_only["items"]] == ["staff"]
    assert_problem(await auth.get("/api/v1/auth/admin/users", token, params={"cursor": "garbage"}), 400)
    for forged in FORGED_TIME_CURSORS:
        assert_problem(await auth.get("/api/v1/auth/admin/users", token, params={"cursor": forged}), 400)


async def test_customers_cannot_list_users(auth: AuthClient) -> None:
    user, pair = await auth.user()
    assert_problem(await auth.get("/api/v1/auth/admin/users", pair["access_token"]), 403)
    denied = await auth.events("auth.access.denied")
    assert [(e["actor_id"], e["outcome"], e["resource_id"]) for e in denied] == [
        (user["id"], "denied", "GET /api/v1/auth/admin/users")
    ]


@pytest.mark.parametrize("change", [{"role": "admin"}, {"role": "staff"}, {"is_active": False}])
async def test_staff_cannot_do_admin_actions(auth: AuthClient, change: dict[str, object]) -> None:
    target, _ = await auth.user()
    me, staff = await auth.user("staff")
    for user_id in (target["id"], me["id"]):
        response = await auth.client.patch(
            f"/api/v1/auth/admin/users/{user_id}", json=change, headers=bearer(staff["access_token"])
        )
        assert_problem(response, 403)
    rows = await auth.sql("SELECT role, is_active FROM auth.users ORDER BY role")
    assert [(r["role"], r["is_active"]) for r in rows] == [("customer", True), ("staff", True)]
    denied = await auth.events("auth.access.denied")
    assert [(e["actor_id"], e["new_values"]) for e in denied] == [
        (me["id"], {"required_role": "admin", "role": "staff"})
    ] * 2


async def test_admin_changes_a_role_and_the_old_tokens_stop(auth: AuthClient) -> None:
    target, target_pair = await auth.user("staff")
    _, admin = await auth.user("admin")
    response = await auth.client.patch(
        f"/api/v1/auth/admin/users/{target['id']}", json={"role": "customer"}, headers=bearer(admin["access_token"])
    )
    assert response.status_code == 200
    assert response.json()["role"] == "customer"
    # The demoted staff token carried role=staff: it must not keep working for an hour.
    assert_problem(await auth.get("/api/v1/auth/admin/users", target_pair["access_token"]), 401)
    fresh = await auth.tokens(target["email"])
    assert_problem(await auth.get("/api/v1/auth/admin/users", fresh["access_token"]), 403)
    event = (await auth.events("auth.user.role_changed"))[0]
    assert (event["old_values"], event["new_values"]["role"]) == ({"role": "staff"}, "customer")
    assert event["actor_role"] == "admin"


async def test_nobody_changes_their_own_role_or_disables_themselves(auth: AuthClient) -> None:
    me, admin = await auth.user("admin")
    for change in ({"role": "customer"}, {"is_active": False}):
        response = await auth.client.patch(
            f"/api/v1/auth/admin/users/{me['id']}", json=change, headers=bearer(admin["access_token"])
        )
        assert_problem(response, 403)
    same = await auth.client.patch(
        f"/api/v1/auth/admin/users/{me['id']}", json={"role": "admin"}, headers=bearer(admin["access_token"])
    )
    assert same.status_code == 200


async def test_deactivation_revokes_every_session_and_blocks_login(auth: AuthClient) -> None:
    target, pair = await auth.user()
    _, admin = await auth.user("admin")
    response = await auth.client.patch(
        f"/api/v1/auth/admin/users/{target['id']}", json={"is_active": False}, headers=bearer(admin["access_token"])
    )
    assert response.json()["is_active"] is False
    assert_problem(await auth.me(pair["access_token"]), 401)
    assert await published_sids(auth) == {sid_of(pair["access_token"])}
    assert_problem(await auth.refresh(pair["refresh_token"]), 401)
    assert_problem(await auth.login(target["email"]), 401)
    await request_reset(auth, target["email"])
    assert auth.messages(target["email"]) == []
    assert (await auth.events("auth.user.deactivated"))[0]["resource_id"] == target["id"]


async def test_admin_update_validation(auth: AuthClient) -> None:
    _, admin = await auth.user("admin")
    headers = bearer(admin["access_token"])
    missing = "/api/v1/auth/admin/users/00000000-0000-4000-8000-000000000000"
    assert_problem(await auth.client.patch(missing, json={"role": "staff"}, headers=headers), 404)
    target = await auth.register()
    path = f"/api/v1/auth/admin/users/{target['id']}"
    for body in ({"role": "root"}, {"email": "x@example.cm"}, {"phone_verified": True}):
        assert_problem(await auth.client.patch(path, json=body, headers=headers), 422)
    assert_problem(await auth.client.patch("/api/v1/auth/admin/users/nope", json={}, headers=headers), 422)


async def test_the_password_is_never_in_any_response(auth: AuthClient) -> None:
    user, pair = await auth.user()
    for path in ("/api/v1/auth/me", "/api/v1/auth/sessions"):
        text = (await auth.get(path, pair["access_token"])).text
        assert PASSWORD not in text
        assert "pbkdf2" not in text
    assert "password" not in user
