"""Obtaining service tokens (client credentials at the auth service), cached until shortly before expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from common.errors import ServiceUnavailable
from common.http import Transport, TransportError

TOKEN_PATH = "/internal/token"  # noqa: S105 - a URL path


class ServiceTokenClient:
    def __init__(
        self,
        client: Transport,
        *,
        client_id: str,
        client_secret: str,
        clock: Callable[[], float] = time.time,
        refresh_margin_seconds: float = 30.0,
    ) -> None:
        self.client = client  # base_url = the auth service
        self.client_id = client_id
        self.client_secret = client_secret
        self.clock = clock
        self.margin = refresh_margin_seconds
        self._cache: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def token_for(self, audience: str) -> str:
        cached = self._cache.get(audience)
        if cached and cached[1] - self.margin > self.clock():
            return cached[0]
        lock = self._locks.setdefault(audience, asyncio.Lock())
        async with lock:
            cached = self._cache.get(audience)
            if cached and cached[1] - self.margin > self.clock():
                return cached[0]
            try:
                answer = await self.client.request(
                    "POST",
                    TOKEN_PATH,
                    json={"client_id": self.client_id, "client_secret": self.client_secret, "audience": audience},
                )
                if answer.status != 200:
                    raise ValueError(f"the auth service answered {answer.status}")
                body = answer.json()
                token, lifetime = str(body["access_token"]), float(body["expires_in"])
            except (TransportError, KeyError, ValueError, TypeError) as exc:
                raise ServiceUnavailable("Could not obtain a service token from the auth service.") from exc
            self._cache[audience] = (token, self.clock() + lifetime)
            return token

    async def headers_for(self, audience: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token_for(audience)}"}

    def forget(self, audience: str) -> None:
        """Drop a cached token the callee refused (rotated keys, revoked client)."""
        self._cache.pop(audience, None)
