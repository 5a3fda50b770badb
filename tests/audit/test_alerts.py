"""Security alerts: rules over incoming events raise an alert record, a metric and an error log line."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from tests.audit.support import AuditClient, event


def alerts_total(rule: str) -> float:
    return REGISTRY.get_sample_value("comptoir_audit_alerts_total", {"rule": rule}) or 0.0


def failed_login(account: str | None, at: datetime) -> dict[str, object]:
    return event(
        "auth",
        "auth.login.failed",
        outcome="failure",
        resource_type="user",
        resource_id=account,
        occurred_at=at,
        ip="198.51.100.9",
        new_values={"reason": "bad_credentials"},
    )


async def test_ten_failed_logins_for_one_account_in_five_minutes(
    audit: AuditClient, capsys: pytest.CaptureFixture[str]
) -> None:
    account, spread = str(uuid.uuid4()), str(uuid.uuid4())
    now = datetime.now(UTC)
    before = alerts_total("auth.login.failed_burst")
    # Nine within the window, and ten for another account spread over an hour: no alert.
    await audit.send("auth", [failed_login(account, now - timedelta(seconds=30 * i)) for i in range(9)])
    await audit.send("auth", [failed_login(spread, now - timedelta(minutes=6 * i)) for i in range(10)])
    await audit.send("auth", [failed_login(None, now) for _ in range(12)])  # unknown e-mails: no account
    assert await audit.alerts() == []
    # The tenth within five minutes opens one alert; more failures count up on it.
    await audit.send("auth", [failed_login(account, now)])
    await audit.send("auth", [failed_login(account, now), failed_login(account, now)])
    (alert,) = await audit.alerts()
    assert alert["rule"] == "auth.login.failed_burst"
    assert alert["subject"].startswith("psn_")  # the account, pseudonymised like in the chain
    assert alert["occurrences"] == 2
    assert alert["detail"]["failures"] == 12
    assert alerts_total("auth.login.failed_burst") == before + 1
    assert '"event": "audit.alert.raised"' in capsys.readouterr().out


async def test_token_reuse_and_role_changes_raise_alerts(audit: AuditClient) -> None:
    user, admin = str(uuid.uuid4()), str(uuid.uuid4())
    await audit.send(
        "auth",
        [
            event(
                "auth",
                "auth.token.reuse_detected",
                outcome="denied",
                actor_id=user,
                resource_type="session",
                resource_id=str(uuid.uuid4()),
            ),
            event(
                "auth",
                "auth.user.role_changed",
                actor_id=admin,
                actor_role="admin",
                resource_type="user",
                resource_id=user,
                old_values={"role": "customer"},
                new_values={"role": "admin"},
            ),
        ],
    )
    alerts = {a["rule"]: a for a in await audit.alerts()}
    assert set(alerts) == {"auth.token.reuse_detected", "auth.user.role_changed"}
    assert alerts["auth.user.role_changed"]["detail"]["new_role"] == "admin"
    assert user not in str(alerts)  # pseudonyms only
    # Only the auth service's events count: another service cannot trip (or fake) auth rules.
    await audit.send("orders", [event("orders", "auth.token.reuse_detected", resource_id="x")])
    assert len(await audit.alerts()) == 2

    resolved = await audit.http.post(
        f"/api/v1/audit/alerts/{alerts['auth.user.role_changed']['id']}/resolve", headers=audit.admin()
    )
    assert resolved.status_code == 200
    assert resolved.json()["status"] == "resolved"
    assert [a["rule"] for a in await audit.alerts()] == ["auth.token.reuse_detected"]
    assert len(await audit.alerts(status="all")) == 2
    assert (await audit.http.post("/api/v1/audit/alerts/999999/resolve", headers=audit.admin())).status_code == 404
    assert (await audit.events(action="audit.alert.resolved"))[0]["actor_user_id"] == audit.admin_id


async def test_a_service_refused_by_an_internal_endpoint_raises_an_alert(audit: AuditClient) -> None:
    """A valid service token that an internal endpoint does not take: a service misconfigured or taken over."""

    def denied(service: str, actor_role: str | None) -> dict[str, object]:
        return event(
            service,
            f"{service}.internal.denied",
            outcome="denied",
            actor_id="gateway" if actor_role else None,
            actor_role=actor_role,
            resource_type="route",
            resource_id="POST /internal/reservations/batch",
        )

    await audit.send("inventory", [denied("inventory", None)])  # no valid token: nothing to say who
    assert await audit.alerts() == []
    await audit.send("inventory", [denied("inventory", "service"), denied("inventory", "service")])
    (alert,) = await audit.alerts()
    assert (alert["rule"], alert["subject"], alert["severity"]) == ("internal.denied", "gateway inventory", "high")
    assert alert["detail"]["route"] == "POST /internal/reservations/batch"
    assert alert["occurrences"] == 2


async def test_an_alert_that_keeps_repeating_keeps_counting(audit: AuditClient) -> None:
    """The upsert of an open alert runs again and again on the same pooled connection: PostgreSQL's generic
    plan of the prepared statement (from the sixth run on it) must still match the partial unique index."""
    reuse = {"outcome": "denied", "actor_id": str(uuid.uuid4()), "resource_type": "session"}
    session = str(uuid.uuid4())
    before = {a["id"] for a in await audit.alerts()}
    for _ in range(20):
        await audit.send("auth", [event("auth", "auth.token.reuse_detected", resource_id=session, **reuse)])
    (alert,) = [a for a in await audit.alerts() if a["id"] not in before]
    assert alert["occurrences"] == 20
