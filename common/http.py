"""HTTP clients for service-to-service calls (created in lifespan, closed there).

Two kinds: ``create_client`` gives an httpx client for low-volume calls (service tokens, the audit relay,
revocation polls); ``Transport`` is the small interface a hot path is written against, with a pooled
implementation for production on the gateway's own httptools client (httpx costs several times more CPU
per call, aiohttp about three times more, see the README's benchmarks) and an httpx one so tests can
route calls to an in-process app.
"""

from __future__ import annotations

import json as jsonlib
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from common.middleware import REQUEST_ID_HEADER
from common.upstream import UpstreamError, UpstreamPool

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
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        json_bytes: bytes | None = None,
    ) -> Answer:
        """``json`` is encoded here; ``json_bytes`` is a body that is JSON already (sent as it is)."""
        ...

    async def aclose(self) -> None: ...


class PooledTransport:
    """The same interface over ``common.upstream``'s keep-alive httptools pool (the gateway's client):
    a third of aiohttp's CPU per call. Idle connections are dropped after 4 s, before uvicorn's 5 s
    keep-alive can close them under a request. ``timeout`` bounds connecting, sending and the first byte
    of the answer together, and then each silence while the body arrives."""

    def __init__(
        self, base_url: str, *, timeout: float = 5.0, connect_timeout: float = 2.0, max_connections: int = 50
    ) -> None:
        self.prefix = urlsplit(base_url).path.rstrip("/")
        self.pool = UpstreamPool.for_url(
            base_url, size=max_connections, connect_timeout=connect_timeout, read_timeout=timeout, deadline=timeout
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        json_bytes: bytes | None = None,
    ) -> Answer:
        sent = [(b"user-agent", USER_AGENT.encode())]
        sent += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
        body = b""
        if json is not None:
            json_bytes = jsonlib.dumps(json, separators=(",", ":")).encode()
        if json_bytes is not None:
            body = json_bytes
            sent.append((b"content-type", b"application/json"))
        try:
            response, conn = await self.pool.request(method.encode("ascii"), (self.prefix + path).encode(), sent, body)
            try:
                whole = response.body_if_complete()
                if whole is None:
                    whole = b"".join([chunk async for chunk in response.iter_chunks()])
            finally:
                self.pool.release(conn)
        except UpstreamError as exc:
            raise TransportError(type(exc).__name__) from exc
        return Answer(response.status, whole)

    async def aclose(self) -> None:
        await self.pool.close()


class HttpxTransport:
    """The same interface over an httpx client (tests route it to an in-process ASGI app)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        json_bytes: bytes | None = None,
    ) -> Answer:
        if json_bytes is not None:
            headers = {**(headers or {}), "content-type": "application/json"}
        try:
            response = await self.client.request(method, path, json=json, content=json_bytes, headers=headers)
        except httpx.TransportError as exc:
            raise TransportError(type(exc).__name__) from exc
        return Answer(response.status_code, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()
