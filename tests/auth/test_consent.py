"""Consent: required acceptance of the terms version at registration, optional marketing, changes, export, audit."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.accounts import TERMS_VERSION
from tests.support.tokens import bearer


async def test_registration_records_the_terms_version_and_marketing_consent_with_times(auth: AuthClient) -> None:
    user, pair = await auth.user(marketing_consent=True)
    consent = (await auth.get("/api/v1/auth/me/consent", pair["access_token"])).json()
    assert consent["terms_version"] == TERMS_VERSION
    assert consent["current_terms_version"] == TERMS_VERSION
    assert consent["marketing_consent"] is True
    assert datetime.fromisoformat(consent["terms_accepted_at"]) == datetime.fromtimestamp(auth.clock.now, UTC)
    assert consent["marketing_consent_at"] == consent["terms_accepted_at"]
    registered = (await auth.events("auth.user.registered"))[0]
    assert registered["new_values"]["terms_version"] == TERMS_VERSION
    assert registered["new_values"]["marketing_consent"] is True
    # Without marketing consent: off, and no time.
    _, other = await auth.user()
    plain = (await auth.get("/api/v1/auth/me/consent", other["access_token"])).json()
    assert (plain["marketing_consent"], plain["marketing_consent_at"]) == (False, None)


async def test_registration_without_accepting_the_terms_in_force_is_refused(auth: AuthClient) -> None:
    base = {"email": "nadia@example.cm", "password": PASSWORD}
    for body in (
        base,
        base | {"accept_terms": False, "terms_version": TERMS_VERSION},
        base | {"accept_terms": True},
        base | {"accept_terms": True, "terms_version": "2019-01-01"},
        base | {"accept_terms": True, "terms_version": ""},
    ):
        problem = assert_problem(await auth.client.post("/api/v1/auth/register", json=body), 422)
        assert problem["errors"]
    assert await auth.sql("SELECT 1 FROM auth.users") == []


async def test_marketing_consent_can_be_given_and_withdrawn_and_each_change_is_audited(auth: AuthClient) -> None:
    user, pair = await auth.user()
    headers = bearer(pair["access_token"])
    auth.clock.advance(60)
    given = await auth.client.patch("/api/v1/auth/me/consent", json={"marketing_consent": True}, headers=headers)
    assert given.status_code == 200
    assert given.json()["marketing_consent"] is True
    assert datetime.fromisoformat(given.json()["marketing_consent_at"]) == datetime.fromtimestamp(auth.clock.now, UTC)
    auth.clock.advance(60)
    withdrawn = await auth.client.patch("/api/v1/auth/me/consent", json={"marketing_consent": False}, headers=headers)
    assert withdrawn.json()["marketing_consent"] is False
    assert datetime.fromisoformat(withdrawn.json()["marketing_consent_at"]) == datetime.fromtimestamp(
        auth.clock.now, UTC
    )
    # The same answer again changes nothing and is not audited again.
    await auth.client.patch("/api/v1/auth/me/consent", json={"marketing_consent": False}, headers=headers)
    events = await auth.events("auth.consent.changed")
    assert [e["new_values"] for e in events] == [{"marketing_consent": True}, {"marketing_consent": False}]
    assert all(e["resource_id"] == user["id"] and e["actor_id"] == user["id"] for e in events)


async def test_a_new_terms_version_is_accepted_through_the_consent_endpoint(make_auth: MakeAuth) -> None:
    async with make_auth() as auth:
        user, _ = await auth.user()
    async with make_auth(terms_version="2027-03-01") as auth:
        pair = await auth.tokens(user["email"])
        headers = bearer(pair["access_token"])
        consent = (await auth.get("/api/v1/auth/me/consent", pair["access_token"])).json()
        assert (consent["terms_version"], consent["current_terms_version"]) == (TERMS_VERSION, "2027-03-01")
        stale = await auth.client.patch(
            "/api/v1/auth/me/consent", json={"accept_terms_version": TERMS_VERSION + "x"}, headers=headers
        )
        assert_problem(stale, 422)
        accepted = await auth.client.patch(
            "/api/v1/auth/me/consent", json={"accept_terms_version": "2027-03-01"}, headers=headers
        )
        assert accepted.json()["terms_version"] == "2027-03-01"
        event = (await auth.events("auth.consent.changed"))[-1]
        assert event["old_values"] == {"terms_version": TERMS_VERSION}
        assert event["new_values"] == {"terms_version": "2027-03-01"}


async def test_bad_consent_changes_get_422_and_change_nothing(auth: AuthClient) -> None:
    _, pair = await auth.user(marketing_consent=True)
    headers = bearer(pair["access_token"])
    for body in ({"marketing_consent": "maybe"}, {"terms_version": "x"}, {"accept_terms_version": "1999-01-01"}):
        assert_problem(await auth.client.patch("/api/v1/auth/me/consent", json=body, headers=headers), 422)
    # Fields left out, or null, stay as they are: an empty change is answered with the consent, unchanged.
    for body in ({}, {"marketing_consent": None}):
        unchanged = await auth.client.patch("/api/v1/auth/me/consent", json=body, headers=headers)
        assert unchanged.status_code == 200
        assert unchanged.json()["marketing_consent"] is True
    assert_problem(await auth.client.patch("/api/v1/auth/me/consent", json={"marketing_consent": False}), 401)
    consent = (await auth.get("/api/v1/auth/me/consent", pair["access_token"])).json()
    assert consent["marketing_consent"] is True
    assert await auth.events("auth.consent.changed") == []


async def test_consent_is_in_the_gdpr_export(make_auth: MakeAuth) -> None:
    async with make_auth(gdpr_services=[]) as auth:
        _, pair = await auth.user(marketing_consent=True)
        export = await auth.get("/api/v1/auth/me/export", pair["access_token"])
        assert export.status_code == 200, export.text
        consent = export.json()["consent"]
        assert consent["terms_version"] == TERMS_VERSION
        assert consent["marketing_consent"] is True
        assert consent["terms_accepted_at"]
        assert export.json()["devices"][0]["last_seen_at"]
