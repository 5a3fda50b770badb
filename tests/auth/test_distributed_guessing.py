"""A botnet can neither guess an account's password nor lock its owner out (issue 18, deliverable 1).

The simulation is bench/login_guessing.py's (the bench prints the same figures): 1,000 client IPs,
set through the trusted-gateway X-Forwarded-For input, one guess every 3 s for an hour of the
injected clock, while the owner signs in from a known device every ten minutes.
"""

from __future__ import annotations

import hashlib

from bench.login_guessing import Clock, Verifications, attack
from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem

WRONG = "definitely not it"


def from_ip(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


async def device_of(auth: AuthClient, email: str, ip: str = "192.0.2.44") -> str:
    response = await auth.login(email, headers=from_ip(ip))
    assert response.status_code == 200, response.text
    token = response.json()["device_token"]
    assert isinstance(token, str)
    assert token
    return token


async def test_a_thousand_addresses_get_at_most_twenty_guesses_an_hour_and_the_owner_still_signs_in(
    make_auth: MakeAuth,
) -> None:
    clock = Clock()
    async with make_auth(clock=clock) as auth:
        user = await auth.register()
        device = await device_of(auth, user["email"])
        verifications = Verifications(auth.app)
        real = await attack(auth.client, clock, verifications, user["email"], owner=(user["email"], PASSWORD, device))
        ghost = await attack(auth.client, clock, verifications, "ghost-of-nobody@example.cm")

    assert len(real.addresses) == 1000
    assert real.sent == 1200
    assert real.accepted == 0
    # Every guess beyond these was refused before the password was looked at.
    assert 10 <= real.verified <= 20
    assert real.throttled >= real.sent - real.verified
    # The owner, on a device the account knows, got in at the first try every time.
    assert real.owner_tries == 6
    assert real.owner_first_try == real.owner_tries
    # An e-mail without an account answers exactly the same, guess for guess.
    assert ghost.verified == real.verified
    assert ghost.answers == real.answers


async def test_the_attack_stops_at_the_password_check_even_for_the_right_password(auth: AuthClient) -> None:
    user = await auth.register()
    for i in range(10):
        await auth.login(user["email"], WRONG, headers=from_ip(f"198.51.100.{i}"))
    # An unknown device now waits, even with the right password (Okta's model) ...
    throttled = await auth.login(user["email"], headers=from_ip("198.51.100.200"))
    body = assert_problem(throttled, 429)
    assert body["type"] == "urn:comptoir:problem:login-throttled"
    assert int(throttled.headers["retry-after"]) <= 30
    events = await auth.events("auth.login.throttled")
    assert events[-1]["new_values"]["scope"] == "account"
    # ... and after the bounded delay it gets in.
    auth.clock.advance(30)
    assert (await auth.login(user["email"], headers=from_ip("198.51.100.200"))).status_code == 200


async def test_a_device_token_counts_only_for_its_own_account(auth: AuthClient) -> None:
    alice, bob = await auth.register(), await auth.register()
    alice_device = await device_of(auth, alice["email"])
    for i in range(10):
        await auth.login(bob["email"], WRONG, headers=from_ip(f"198.51.100.{i}"))
    # Alice's token does not make Bob's account treat the caller as known.
    response = await auth.client.post(
        "/api/v1/auth/login",
        json={"email": bob["email"], "password": PASSWORD, "device_token": alice_device},
        headers=from_ip("192.0.2.44"),
    )
    assert response.status_code == 429
    # A forged or mangled token is just an unknown device (never an error that tells anything).
    for forged in (alice_device[:-4] + "AAAA", "x.y", ".", "", "a" * 512):
        answer = await auth.client.post(
            "/api/v1/auth/login",
            json={"email": bob["email"], "password": PASSWORD, "device_token": forged},
            headers=from_ip("192.0.2.44"),
        )
        assert answer.status_code == 429
    too_long = await auth.client.post(
        "/api/v1/auth/login", json={"email": bob["email"], "password": PASSWORD, "device_token": "a" * 513}
    )
    assert_problem(too_long, 422)
    # Alice's known device still signs Alice in.
    mine = await auth.client.post(
        "/api/v1/auth/login", json={"email": alice["email"], "password": PASSWORD, "device_token": alice_device}
    )
    assert mine.status_code == 200
    assert mine.json()["device_token"] == alice_device
    assert (await auth.events("auth.login.succeeded"))[-1]["new_values"]["known_device"] is True


async def test_a_known_device_is_throttled_on_its_own_counter(auth: AuthClient) -> None:
    user = await auth.register()
    device = await device_of(auth, user["email"])
    body = {"email": user["email"], "password": WRONG, "device_token": device}
    statuses = [(await auth.client.post("/api/v1/auth/login", json=body)).status_code for _ in range(6)]
    assert statuses == [401] * 4 + [429, 429]
    assert (await auth.events("auth.login.throttled"))[-1]["new_values"]["scope"] == "device"
    # The device's guesses did not touch the account's counter: another device is not delayed.
    assert (await auth.login(user["email"], headers=from_ip("192.0.2.99"))).status_code == 200


async def test_one_address_guessing_many_accounts_is_stopped_but_known_devices_behind_it_are_not(
    auth: AuthClient,
) -> None:
    owner = await auth.register()
    device = await device_of(auth, owner["email"], ip="198.51.100.77")
    # Three guesses at each of ten accounts: no account or (account, address) counter reaches its delay.
    victims = [await auth.register() for _ in range(10)]
    statuses = []
    for i in range(30):
        victim = victims[i % 10]
        statuses.append((await auth.login(victim["email"], WRONG, headers=from_ip("198.51.100.77"))).status_code)
    assert statuses[:29] == [401] * 29
    assert statuses[29] == 429
    # From that address: strangers wait, whatever account they try ...
    fresh = await auth.register()
    assert (await auth.login(fresh["email"], headers=from_ip("198.51.100.77"))).status_code == 429
    assert (await auth.events("auth.login.throttled"))[-1]["new_values"]["scope"] == "ip"
    # ... a user who signed in from there before does not, and other addresses are not affected.
    known = await auth.client.post(
        "/api/v1/auth/login",
        json={"email": owner["email"], "password": PASSWORD, "device_token": device},
        headers=from_ip("198.51.100.77"),
    )
    assert known.status_code == 200
    assert (await auth.login(fresh["email"], headers=from_ip("192.0.2.1"))).status_code == 200


async def test_a_password_reset_revokes_the_accounts_devices(auth: AuthClient) -> None:
    user = await auth.register()
    device = await device_of(auth, user["email"])
    await auth.client.post("/api/v1/auth/password-reset/request", json={"email": user["email"]})
    token = auth.last_reset_token(user["email"])
    new_password = "a brand new passphrase here"
    confirm = await auth.client.post(
        "/api/v1/auth/password-reset/confirm", json={"token": token, "new_password": new_password}
    )
    assert confirm.status_code == 204
    rows = await auth.sql("SELECT revoked_at FROM auth.devices WHERE user_id = $1", user["id"])
    assert len(rows) == 1
    assert rows[0]["revoked_at"] is not None
    response = await auth.client.post(
        "/api/v1/auth/login", json={"email": user["email"], "password": new_password, "device_token": device}
    )
    assert response.status_code == 200
    assert response.json()["device_token"] != device
    events = await auth.events("auth.password.reset")
    assert events[-1]["new_values"]["devices_revoked"] == 1


async def test_only_the_hash_of_a_device_id_is_stored(auth: AuthClient) -> None:
    user = await auth.register()
    device = await device_of(auth, user["email"])
    device_id = device.split(".", 1)[0]
    rows = await auth.sql("SELECT id_hash FROM auth.devices WHERE user_id = $1", user["id"])
    assert [row["id_hash"] for row in rows] == [hashlib.sha256(device_id.encode()).hexdigest()]
    assert device_id not in await auth.outbox_text()


async def test_a_user_lists_and_forgets_their_devices(auth: AuthClient) -> None:
    user, pair = await auth.user()
    device = await device_of(auth, user["email"])
    listed = await auth.get("/api/v1/auth/me/devices", pair["access_token"])
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert len(items) == 2  # the fixture's login and this one
    auth.clock.advance(10)
    mine = await auth.client.post(
        "/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD, "device_token": device}
    )
    newest = (await auth.get("/api/v1/auth/me/devices", pair["access_token"])).json()["items"][0]
    forget = await auth.client.delete(
        f"/api/v1/auth/me/devices/{newest['id']}", headers={"Authorization": f"Bearer {pair['access_token']}"}
    )
    assert forget.status_code == 204
    assert (await auth.events("auth.device.revoked"))[0]["resource_id"] == newest["id"]
    # Forgotten: that token is an unknown device again (it gets a new one at its next login).
    again = await auth.client.post(
        "/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD, "device_token": device}
    )
    assert again.json()["device_token"] != device
    assert mine.json()["device_token"] == device
    assert len((await auth.get("/api/v1/auth/me/devices", pair["access_token"])).json()["items"]) == 2
    # Someone else's device, or no such device: 404, nothing changes.
    _, other = await auth.user()
    path = f"/api/v1/auth/me/devices/{items[0]['id']}"
    assert_problem(await auth.client.delete(path, headers={"Authorization": f"Bearer {other['access_token']}"}), 404)
    assert_problem(
        await auth.client.delete(
            "/api/v1/auth/me/devices/not-a-uuid", headers={"Authorization": f"Bearer {other['access_token']}"}
        ),
        422,
    )
