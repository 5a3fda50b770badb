"""HTTP clients for service-to-service calls (created in lifespan, closed there).

Two kinds: ``create_client`` gives an httpx client for low-volume calls (service tokens, the audit relay,
revocation polls); ``Transport`` is the small interface a hot path is written against, with a pooled
aiohttp implementation for production (httpx costs several times more CPU per call, see the README's
benchmarks) and an httpx one so tests can route calls to an in-process app.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx

from common.middleware import REQUEST_ID_HEADER

USER_AGENT = "comptoir-internal"


def create_client(
    base_url: str,
    *,
    timeout: float = 5.0,
    connect_timeout: float = 2.0,
    max_connections: int = 50,
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        headers={"user-agent": USER_AGENT},
    )


def forward_headers(request_id: str | None) -> dict[str, str]:
    """Headers that carry the caller's context to the next service."""
    return {REQUEST_ID_HEADER.decode(): request_id} if request_id else {}


class TransportError(Exception):
    """The peer could not be reached or did not answer in time (nothing is known about the outcome)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not JSON."""
        return jsonlib.loads(self.body)


class Transport(Protocol):
    async def request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Answer: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """A pooled keep-alive aiohttp session bound to one base URL. Create it inside a running loop."""

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0, max_connections: int = 50
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=timeout, connect=connect_timeout),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Answer:
        data = None
        sent = dict(headers or {})
        if json is not None:
            data = jsonlib.dumps(json, separators=(",", ":")).encode()
            sent["Content-Type"] = "application/json"
        try:
            async with self.session.request(
                method, self.base_url + path, data=data, headers=sent, allow_redirects=False
            ) as response:
                return Answer(response.status, await response.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(type(exc).__name__) from exc

    async def aclose(self) -> None:
        await self.session.close()


class HttpxTransport:
    """The same interface over an httpx client (tests route it to an in-process ASGI app)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self, method: str, path: str, *, json: Any = None, headers: dict[str, str] | None = None
    ) -> Answer:
        try:
            response = await self.client.request(method, path, json=json, headers=headers)
        except httpx.TransportError as exc:
            raise TransportError(type(exc).__name__) from exc
        return Answer(response.status_code, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()
