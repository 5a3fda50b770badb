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

from common.audit import AuditEvent, scrub
from common.http import Transport
from common.relay import EVENTS_PATH, DeliveryFailed
from common.service_tokens import ServiceTokenClient
from common.tasks import BackgroundLoop

log = structlog.get_logger("gateway.events")

GATEWAY_EVENTS = Counter("comptoir_gateway_security_events_total", "Security events seen by the gateway.", ["action"])
GATEWAY_EVENTS_DROPPED = Counter(
    "comptoir_gateway_security_events_dropped_total", "Security events dropped because the queue was full."
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
            user_agent=(_header(scope, b"user-agent") or "")[:512] or None,
            method=scope.get("method"),
            path=str(scope.get("path", ""))[:512],
            request_id=scope.get("state", {}).get("request_id"),
            new_values=details or None,
            outcome="denied" if outcome == "denied" else "failure",
        )
        if len(self.queue) >= self.capacity:
            self.queue.popleft()
            GATEWAY_EVENTS_DROPPED.inc()
        self.queue.append(scrub(event.model_dump(mode="json")))

    async def flush(self) -> int:
        """Send the oldest batch; returns how many events audit stored. A failure raises and keeps them queued."""
        if not self.queue:
            return 0
        batch = [self.queue[i] for i in range(min(self.batch_size, len(self.queue)))]
        headers = await self.tokens.headers_for("audit")
        answer = await self.client.request("POST", EVENTS_PATH, json={"events": batch}, headers=headers)
        if answer.status == 401:
            self.tokens.forget("audit")
        if not 200 <= answer.status < 300:
            raise DeliveryFailed(f"audit answered {answer.status}")
        for _ in batch:
            self.queue.popleft()
        return len(batch)

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
