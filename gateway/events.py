"""The gateway's own security events, sent to the audit service without a database.

Events wait in a bounded in-memory queue (the oldest are dropped, and counted, if audit is away for
long); a background task sends them in batches with a service token. These are signals (bad tokens,
throttling on auth routes, probing of /internal), not business records: losing some under a flood is
acceptable where blocking requests would not be.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import stamina
import structlog
from prometheus_client import Counter
from starlette.types import Scope

from common.audit import AuditEvent, outbox_payload
from common.http import Transport
from common.relay import EVENTS_PATH, EventsRefused, check_delivery
from common.service_tokens import ServiceTokenClient
from common.tasks import BackgroundLoop

log = structlog.get_logger("gateway.events")

GATEWAY_EVENTS = Counter("comptoir_gateway_security_events_total", "Security events seen by the gateway.", ["action"])
GATEWAY_EVENTS_DROPPED = Counter(
    "comptoir_gateway_security_events_dropped_total", "Security events dropped because the queue was full."
)
EVENTS_NOT_RECORDED = Counter(
    "comptoir_gateway_security_events_unrecorded_total",
    "Refusals answered but not recorded: their address had used up its events (see Pipeline._refusal_event).",
    ["action"],
)
GATEWAY_EVENTS_REFUSED = Counter(
    "comptoir_gateway_security_events_refused_total", "Security events the audit service refused (dropped)."
)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class SecurityEvents(BackgroundLoop):
    task_name = "gateway-security-events"

    def __init__(
        self,
        client: Transport,
        tokens: ServiceTokenClient,
        *,
        capacity: int = 10_000,
        batch_size: int = 200,
        interval: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.client = client
        self.tokens = tokens
        self.queue: deque[dict[str, Any]] = deque()
        self.capacity = capacity
        self.batch_size = batch_size
        self.interval = interval
        self.max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None

    def record(self, scope: Scope, action: str, *, outcome: str = "denied", **details: Any) -> None:
        GATEWAY_EVENTS.labels(action).inc()
        claims = scope.get("comptoir.claims")
        event = AuditEvent(
            service="gateway",
            action=action,
            actor_id=getattr(claims, "sub", None),
            actor_role=getattr(claims, "role", None),
            ip=scope.get("comptoir.client_ip") or (scope.get("client") or (None,))[0],
            user_agent=_header(scope, b"user-agent") or None,
            method=scope.get("method"),
            path=str(scope.get("path", "")),
            request_id=scope.get("state", {}).get("request_id"),
            new_values=details or None,
            outcome="denied" if outcome == "denied" else "failure",
        )
        if len(self.queue) >= self.capacity:
            self.queue.popleft()
            GATEWAY_EVENTS_DROPPED.inc()
        self.queue.append(outbox_payload(event))

    async def flush(self) -> int:
        """Send the oldest batch; returns how many events audit took. A failure raises and keeps them queued.

        A batch audit refuses for what it holds (413, 422: an event from a newer gateway, a batch over
        ``AUDIT_MAX_BATCH_EVENTS``) is sent again one event at a time, and only the events refused alone are
        dropped (logged and counted): otherwise one of them would hold back every event behind it."""
        if not self.queue:
            return 0
        batch = [self.queue[i] for i in range(min(self.batch_size, len(self.queue)))]
        try:
            await self._post(batch)
        except EventsRefused:
            sent = 0
            for event in batch:
                try:
                    await self._post([event])
                    sent += 1
                except EventsRefused as exc:
                    GATEWAY_EVENTS_REFUSED.inc()
                    log.error("gateway.security_events.refused", action=event.get("action"), error=str(exc)[:300])
                self._taken(event)
            return sent
        for event in batch:
            self._taken(event)
        return len(batch)

    def _taken(self, event: dict[str, Any]) -> None:
        if self.queue and self.queue[0] is event:  # unless the full queue has dropped it meanwhile
            self.queue.popleft()

    async def _post(self, events: list[dict[str, Any]]) -> None:
        headers = await self.tokens.headers_for("audit")
        check_delivery(
            await self.client.request("POST", EVENTS_PATH, json={"events": events}, headers=headers), self.tokens
        )

    async def _run(self) -> None:
        while True:
            delivered = 0
            # Audit away: back off (exponential, jittered, up to max_backoff) instead of knocking every
            # second. Should stamina ever give up (its test mode caps attempts), a new round begins.
            try:
                async for attempt in stamina.retry_context(
                    on=Exception,
                    attempts=None,
                    timeout=None,
                    wait_initial=self.interval,
                    wait_max=self.max_backoff,
                    wait_jitter=self.interval,
                ):
                    with attempt:
                        delivered = await self.flush()
            except Exception as exc:
                log.warning("gateway.security_events.delivery_failed", error=type(exc).__name__, queued=len(self.queue))
            if delivered < self.batch_size:
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if not self.running:
            return
        await super().stop()
        with contextlib.suppress(Exception):
            await self.flush()  # a last try on shutdown
