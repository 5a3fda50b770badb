"""The background loops that talk to another process retry through stamina and never die of a failure:
the revocation poller (every process) and the gateway's security events. stamina's test mode removes the
waits, so these tests wait only on what the peer saw."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import stamina

from common.http import HttpxTransport
from common.revocation import RevocationPoller, RevocationSet
from gateway.events import SecurityEvents


class Tokens:
    def __init__(self) -> None:
        self.forgotten: list[str] = []

    async def headers_for(self, audience: str) -> dict[str, str]:
        return {"Authorization": f"Bearer token-for-{audience}"}

    def forget(self, audience: str) -> None:
        self.forgotten.append(audience)


class Peer:
    """Answers ``failures`` requests with 503 (or a 401 first, when asked), then ``answer``."""

    def __init__(self, failures: int, answer: dict[str, object], *, refuse_token_first: bool = False) -> None:
        self.failures = failures
        self.answer = answer
        self.refuse_token_first = refuse_token_first
        self.calls: list[httpx.Request] = []
        self.answered = asyncio.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if self.refuse_token_first and len(self.calls) == 1:
            return httpx.Response(401)
        if len(self.calls) <= self.failures:
            return httpx.Response(503)
        self.answered.set()
        return httpx.Response(200, json=self.answer)

    def client(self) -> HttpxTransport:
        return HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(self), base_url="http://peer"))


@pytest.fixture
def no_waits() -> Iterator[None]:
    # Two attempts per round: the loops must also survive stamina giving up, and start a new round.
    with stamina.set_testing(True, attempts=2):
        yield


@pytest.mark.usefixtures("no_waits")
async def test_the_revocation_poller_keeps_trying_until_the_feed_answers() -> None:
    feed = Peer(5, {"items": [{"seq": 7, "sid": "s-1", "expires_at": 4e9}], "has_more": False})
    revocations = RevocationSet()
    poller = RevocationPoller(feed.client(), Tokens(), revocations, interval=0.01)  # type: ignore[arg-type]
    poller.start()
    try:
        await asyncio.wait_for(feed.answered.wait(), 10)
    finally:
        await poller.stop()
    assert revocations.is_revoked("s-1")
    assert revocations.cursor == 7
    assert len(feed.calls) >= 6
    assert feed.calls[0].url.path == "/internal/revocations"
    assert feed.calls[0].url.params["after"] == "0"
    assert feed.calls[-1].headers["authorization"] == "Bearer token-for-auth"


@pytest.mark.usefixtures("no_waits")
async def test_security_events_wait_in_the_queue_until_audit_takes_them() -> None:
    audit = Peer(4, {"stored": 2}, refuse_token_first=True)
    tokens = Tokens()
    events = SecurityEvents(audit.client(), tokens, interval=0.01)  # type: ignore[arg-type]
    for path in ("/api/v1/orders", "/internal/x"):
        events.record({"method": "GET", "path": path, "headers": []}, "gateway.path.blocked")
    events.start()
    try:
        await asyncio.wait_for(audit.answered.wait(), 10)
    finally:
        await events.stop()
    assert not events.queue
    assert tokens.forgotten[0] == "audit"  # a refused service token is dropped and fetched again
    sent = json.loads(audit.calls[-1].content)["events"]
    assert [e["path"] for e in sent] == ["/api/v1/orders", "/internal/x"]
    assert all(json.loads(call.content)["events"] == sent for call in audit.calls)  # the same batch each time
