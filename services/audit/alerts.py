"""Security alert rules over incoming events, and the alert record, metric and log line they raise.

Rules (each opens one alert per rule and subject; repeats while it is open count up):
- ``auth.login.failed_burst``: at least ``failed_login_threshold`` (10) ``auth.login.failed`` events for
  one account within ``failed_login_window_seconds`` (5 min);
- ``auth.token.reuse_detected``: any refresh-token reuse;
- ``auth.user.role_changed``: any change of a user's role;
- ``internal.denied``: a valid service token refused by an internal endpoint (``<service>.internal.denied``):
  a service calling what it never calls is misconfigured or taken over;
- ``audit.chain.integrity``: a verification (API, CLI or before signing a checkpoint) that failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import Database
from services.audit.chain import parse_timestamp
from services.audit.metrics import ALERTS
from services.audit.repository import AlertRepository, EventRepository

log = structlog.get_logger("comptoir.audit.alerts")

FAILED_LOGIN_BURST = "auth.login.failed_burst"
TOKEN_REUSE = "auth.token.reuse_detected"  # noqa: S105 - an action name
ROLE_CHANGED = "auth.user.role_changed"
CHAIN_INTEGRITY = "audit.chain.integrity"
INTERNAL_DENIED = "internal.denied"


@dataclass(frozen=True)
class Raised:
    rule: str
    subject: str
    severity: str
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)
    event_sequence: int | None = None


@dataclass(frozen=True)
class Opened:
    alert_id: int
    raised: Raised


def _auth_events(docs: Sequence[Mapping[str, Any]], action: str) -> list[Mapping[str, Any]]:
    return [d for d in docs if d["service"] == "auth" and d["action"] == action]


class AlertRules:
    def __init__(self, *, failed_login_threshold: int, failed_login_window_seconds: int) -> None:
        self.threshold = failed_login_threshold
        self.window = timedelta(seconds=failed_login_window_seconds)

    async def evaluate(self, session: AsyncSession, docs: Sequence[Mapping[str, Any]]) -> list[Raised]:
        """The alerts that the newly stored ``docs`` (already in ``session``'s transaction) raise."""
        raised = await self._failed_logins(session, docs)
        for doc in _auth_events(docs, "auth.token.reuse_detected"):
            raised.append(
                Raised(
                    rule=TOKEN_REUSE,
                    subject=doc["resource_id"] or doc["id"],
                    severity="high",
                    summary="A rotated refresh token was presented again; its session was revoked.",
                    detail={"event_id": doc["id"], "actor_id": doc["actor_id"], "ip": doc["ip"]},
                    event_sequence=doc["sequence"],
                )
            )
        for doc in _auth_events(docs, "auth.user.role_changed"):
            old, new = doc["old_values"] or {}, doc["new_values"] or {}
            raised.append(
                Raised(
                    rule=ROLE_CHANGED,
                    subject=doc["resource_id"] or doc["id"],
                    severity="medium",
                    summary="A user's role was changed.",
                    detail={
                        "event_id": doc["id"],
                        "changed_by": doc["actor_id"],
                        "old_role": old.get("role"),
                        "new_role": new.get("role"),
                    },
                    event_sequence=doc["sequence"],
                )
            )
        for doc in docs:
            if doc["action"] == f"{doc['service']}.internal.denied" and doc["actor_role"] == "service":
                raised.append(
                    Raised(
                        rule=INTERNAL_DENIED,
                        subject=f"{doc['actor_id']} {doc['service']}",
                        severity="high",
                        summary="A service called an internal endpoint it may not use.",
                        detail={"event_id": doc["id"], "caller": doc["actor_id"], "route": doc["resource_id"]},
                        event_sequence=doc["sequence"],
                    )
                )
        return raised

    async def _failed_logins(self, session: AsyncSession, docs: Sequence[Mapping[str, Any]]) -> list[Raised]:
        latest: dict[str, Mapping[str, Any]] = {}
        for doc in _auth_events(docs, "auth.login.failed"):
            account = doc["resource_id"]
            if doc["resource_type"] != "user" or not account:
                continue  # an unknown e-mail: nothing identifies an account
            if account not in latest or doc["occurred_at"] > latest[account]["occurred_at"]:
                latest[account] = doc
        raised = []
        seconds = int(self.window.total_seconds())
        events = EventRepository(session)
        for account, doc in latest.items():
            until = parse_timestamp(doc["occurred_at"])
            failures = await events.count_recent(
                action="auth.login.failed",
                resource_type="user",
                resource_id=account,
                since=until - self.window,
                until=until,
            )
            if failures >= self.threshold:
                raised.append(
                    Raised(
                        rule=FAILED_LOGIN_BURST,
                        subject=account,
                        severity="high",
                        summary=f"{failures} failed logins for one account within {seconds} s.",
                        detail={
                            "failures": failures,
                            "window_seconds": seconds,
                            "last_event_id": doc["id"],
                            "last_ip": doc["ip"],
                        },
                        event_sequence=doc["sequence"],
                    )
                )
        return raised


def integrity_alert(first_bad_sequence: int | None, problems: Sequence[Mapping[str, Any]], source: str) -> Raised:
    return Raised(
        rule=CHAIN_INTEGRITY,
        subject="",
        severity="critical",
        summary="The audit chain failed verification: events were altered, removed or re-signed.",
        detail={"source": source, "first_bad_sequence": first_bad_sequence, "problems": list(problems)[:5]},
        event_sequence=first_bad_sequence,
    )


async def store_alerts(session: AsyncSession, raised: Sequence[Raised]) -> list[Opened]:
    """Write the alerts in ``session``'s transaction; returns the ones that were newly opened."""
    repo = AlertRepository(session)
    now = datetime.now(UTC)
    opened = []
    for alert in raised:
        alert_id, is_new = await repo.raise_alert(
            {
                "rule": alert.rule,
                "subject": alert.subject,
                "severity": alert.severity,
                "summary": alert.summary,
                "detail": alert.detail,
                "status": "open",
                "occurrences": 1,
                "first_seen_at": now,
                "last_seen_at": now,
                "event_sequence": alert.event_sequence,
            }
        )
        if is_new:
            opened.append(Opened(alert_id, alert))
    return opened


def announce(opened: Sequence[Opened]) -> None:
    """After the commit: the metric and the log line (an operator's pager watches both)."""
    for item in opened:
        ALERTS.labels(item.raised.rule).inc()
        log.error(
            "audit.alert.raised",
            alert_id=item.alert_id,
            rule=item.raised.rule,
            severity=item.raised.severity,
            subject=item.raised.subject,
            summary=item.raised.summary,
        )


async def raise_alerts(db: Database, raised: Sequence[Raised]) -> None:
    """Store alerts in their own transaction, then announce the new ones."""
    async with db.sessionmaker() as session, session.begin():
        opened = await store_alerts(session, raised)
    announce(opened)
