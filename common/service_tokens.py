"""Obtaining service tokens (client credentials at the auth service), cached until shortly before expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from common.errors import ServiceUnavailable
from common.http import Transport, TransportError

TOKEN_PATH = "/internal/token"  # noqa: S105 - a URL path
# A cached token is used past its renewal time only while at least this much of its lifetime is left.
STILL_VALID_SECONDS = 5.0


class CachedServiceTokens:
    """Service tokens per audience, each reused until ``refresh_margin_seconds`` before it expires.

    A subclass says how a token is obtained (``_obtain``: the token and its lifetime in seconds); callers
    that wait for the same audience share one request, and its outcome: when it fails (auth down or
    hung), those that queued behind it get the failure at once instead of each waiting on auth in turn.
    While a renewal is out or has failed, a token that has not expired yet is still used.
    """

    def __init__(self, *, clock: Callable[[], float], refresh_margin_seconds: float) -> None:
        self.clock = clock
        self.margin = refresh_margin_seconds
        self._cache: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, tuple[int, str]] = {}  # audience -> (failed requests so far, the last why)

    def _cached(self, audience: str, margin: float | None = None) -> str | None:
        cached = self._cache.get(audience)
        if cached and cached[1] - (self.margin if margin is None else margin) > self.clock():
            return cached[0]
        return None

    def _unexpired(self, audience: str) -> str | None:
        """A token still inside its lifetime (with a little room for the call it goes with)."""
        return self._cached(audience, margin=STILL_VALID_SECONDS)

    async def _obtain(self, audience: str) -> tuple[str, float]:
        raise NotImplementedError

    async def token_for(self, audience: str) -> str:
        token = self._cached(audience)
        if token is not None:
            return token
        lock = self._locks.setdefault(audience, asyncio.Lock())
        if lock.locked() and (token := self._unexpired(audience)) is not None:
            return token  # a renewal is out: the token it replaces still works meanwhile
        failed_before, _ = self._failures.get(audience, (0, ""))
        async with lock:
            token = self._cached(audience)
            if token is not None:
                return token
            failed, why = self._failures.get(audience, (0, ""))
            if failed > failed_before:  # the request this caller waited for failed: its outcome is ours
                return self._unexpired_or(audience, why)
            try:
                token, lifetime = await self._obtain(audience)
            except asyncio.CancelledError:  # its caller ran out of time: so would the ones behind it
                self._failures[audience] = (failed + 1, "The auth service did not answer in time.")
                raise
            except ServiceUnavailable as exc:
                self._failures[audience] = (failed + 1, exc.detail)
                if self._unexpired(audience) is None:
                    raise
                return self._unexpired_or(audience, exc.detail)
            self._cache[audience] = (token, self.clock() + lifetime)
            return token

    def _unexpired_or(self, audience: str, failure: str) -> str:
        token = self._unexpired(audience)
        if token is None:
            raise ServiceUnavailable(failure)
        return token

    async def headers_for(self, audience: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token_for(audience)}"}

    def forget(self, audience: str) -> None:
        """Drop a cached token the callee refused (rotated keys, revoked client)."""
        self._cache.pop(audience, None)


class ServiceTokenClient(CachedServiceTokens):
    """Tokens from the auth service (client credentials)."""

    def __init__(
        self,
        client: Transport,
        *,
        client_id: str,
        client_secret: str,
        clock: Callable[[], float] = time.time,
        refresh_margin_seconds: float = 30.0,
    ) -> None:
        super().__init__(clock=clock, refresh_margin_seconds=refresh_margin_seconds)
        self.client = client  # base_url = the auth service
        self.client_id = client_id
        self.client_secret = client_secret

    async def _obtain(self, audience: str) -> tuple[str, float]:
        try:
            answer = await self.client.request(
                "POST",
                TOKEN_PATH,
                json={"client_id": self.client_id, "client_secret": self.client_secret, "audience": audience},
            )
            if answer.status != 200:
                raise ValueError(f"the auth service answered {answer.status}")
            body = answer.json()
            return str(body["access_token"]), float(body["expires_in"])
        except (TransportError, KeyError, ValueError, TypeError) as exc:
            raise ServiceUnavailable("Could not obtain a service token from the auth service.") from exc
