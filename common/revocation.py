"""The revocation feed: sessions revoked at the auth service, polled so every process rejects them fast.

Auth appends ``{seq, sid, expires_at}`` rows when a session is revoked (logout, logout-all, password
change or reset, session delete, deactivation, refresh-token reuse). Pollers ask
``GET /internal/revocations?after=<seq>`` with a service token and keep the revoked session ids until
the last access token of that session has expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import stamina
import structlog

from common.http import Transport
from common.service_tokens import ServiceTokenClient
from common.tasks import BackgroundLoop

log = structlog.get_logger("comptoir.revocation")

FEED_PATH = "/internal/revocations"


class FeedUnavailable(Exception):
    pass


class RevocationSet:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.revoked: dict[str, float] = {}
        self.cursor = 0
        self.synced_at: float | None = None

    def add(self, sid: str, expires_at: float) -> None:
        self.revoked[sid] = max(expires_at, self.revoked.get(sid, 0.0))

    def is_revoked(self, sid: str | None) -> bool:
        return sid is not None and sid in self.revoked

    def prune(self) -> None:
        now = self.clock()
        for sid in [sid for sid, until in self.revoked.items() if until < now]:
            del self.revoked[sid]


class RevocationPoller(BackgroundLoop):
    """Polls the feed every ``interval`` seconds; a failed poll keeps what it knows and retries."""

    task_name = "revocation-poller"

    def __init__(
        self,
        client: Transport,
        tokens: ServiceTokenClient,
        revocations: RevocationSet,
        *,
        interval: float,
    ) -> None:
        self.client = client
        self.tokens = tokens
        self.revocations = revocations
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def poll_once(self) -> int:
        """Fetch every entry after the cursor; returns how many arrived."""
        arrived = 0
        while True:
            headers = await self.tokens.headers_for("auth")
            answer = await self.client.request("GET", f"{FEED_PATH}?after={self.revocations.cursor}", headers=headers)
            if answer.status == 401:
                self.tokens.forget("auth")
            if answer.status != 200:
                raise FeedUnavailable(f"the auth service answered {answer.status}")
            body = answer.json()
            for item in body["items"]:
                self.revocations.add(str(item["sid"]), float(item["expires_at"]))
                self.revocations.cursor = max(self.revocations.cursor, int(item["seq"]))
                arrived += 1
            self.revocations.synced_at = self.revocations.clock()
            if not body.get("has_more"):
                return arrived

    async def _run(self) -> None:
        while True:
            # A failed poll keeps what is known and is tried again with a short backoff (at most 1 s, or
            # the interval if longer: a revoked session must still be refused within about a second of
            # auth answering again). Should stamina ever give up (its test mode caps attempts), the loop
            # goes on with a new round.
            try:
                async for attempt in stamina.retry_context(
                    on=Exception,
                    attempts=None,
                    timeout=None,
                    wait_initial=self.interval,
                    wait_max=max(1.0, self.interval),
                    wait_jitter=self.interval / 2,
                ):
                    with attempt:
                        if attempt.num == 2:
                            log.warning("revocation.poll_failing")
                        await self.poll_once()
                        if attempt.num > 1:
                            log.info("revocation.poll_recovered", attempts=attempt.num)
            except Exception as exc:
                log.warning("revocation.poll_failing", error=type(exc).__name__)
            self.revocations.prune()
            await asyncio.sleep(self.interval)
