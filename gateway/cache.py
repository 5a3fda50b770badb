"""A short shared cache of anonymous GET answers that their service marked ``Cache-Control: public``.

The catalogue is what a shop serves most, and the same page is asked for by every anonymous visitor. The
gateway keeps such an answer for ``GATEWAY_PUBLIC_CACHE_SECONDS`` (at most one second, so a price or stock
change is never hidden longer than that), keyed by path and query, and answers conditional requests
(``If-None-Match``) with 304 from it. What it never holds: an answer to a request that carried credentials
(``Authorization`` or a cookie), an answer its service did not mark ``public`` (staff and personal answers
are ``no-store`` or ``private``), one that sets a cookie, or one larger than ``max_body_bytes``. A write
through the gateway to a cached prefix drops that prefix's entries at once; a change made behind the
gateway (an order reserving stock) shows when the entry expires.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter
from starlette.types import Message, Scope, Send

from common.conditional import if_none_match_names

CACHE_LOOKUPS = Counter(
    "comptoir_gateway_public_cache_total", "Anonymous GETs looked up in the gateway's public cache.", ["result"]
)
_HIT, _MISS = CACHE_LOOKUPS.labels("hit"), CACHE_LOOKUPS.labels("miss")
_CREDENTIALS = (b"authorization", b"cookie")
# Headers of a stored answer that belong to one exchange, not to the content.
_NOT_STORED = frozenset({b"date", b"x-request-id", b"age"})


@dataclass(slots=True)
class _Entry:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: bytes | None
    stored_at: float
    prefix: str


class PublicCache:
    def __init__(
        self,
        ttl_seconds: float,
        *,
        max_entries: int = 2048,
        max_body_bytes: int = 256 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()

    @staticmethod
    def key_of(scope: Scope) -> bytes | None:
        """The cache key of a request that may be served from the cache, else None."""
        if scope["method"] != "GET":
            return None
        for name, _ in scope.get("headers", ()):
            if name in _CREDENTIALS:
                return None
        path: bytes = scope.get("raw_path") or scope["path"].encode("latin-1")
        query: bytes = scope.get("query_string", b"")
        return path + b"?" + query if query else path

    async def serve(self, key: bytes, scope: Scope, send: Send) -> bool:
        """Answer from the cache when a fresh entry exists (304 when the client already has it)."""
        entry = self._entries.get(key)
        if entry is None:
            _MISS.inc()
            return False
        age = self.clock() - entry.stored_at
        if age >= self.ttl:
            del self._entries[key]
            _MISS.inc()
            return False
        _HIT.inc()
        headers = [*entry.headers, (b"age", str(int(age)).encode("ascii"))]
        if entry.etag is not None and if_none_match_names(scope, entry.etag):
            kept = [(k, v) for k, v in headers if k not in (b"content-length", b"content-type")]
            await send({"type": "http.response.start", "status": 304, "headers": kept})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        await send({"type": "http.response.start", "status": entry.status, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body, "more_body": False})
        return True

    def recording(self, key: bytes, prefix: str, send: Send) -> Send:
        """``send``, also storing the answer when it may be shared."""
        state: dict[str, object] = {}
        chunks: list[bytes] = []
        size = 0

        async def record(message: Message) -> None:
            nonlocal size
            if message["type"] == "http.response.start":
                headers: list[tuple[bytes, bytes]] = list(message.get("headers", ()))
                if message["status"] == 200 and _shareable(headers):
                    state["headers"] = [(k, v) for k, v in headers if k not in _NOT_STORED]
            elif "headers" in state:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    state.clear()
                else:
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        self._store(key, prefix, state["headers"], b"".join(chunks))  # type: ignore[arg-type]
            await send(message)

        return record

    def invalidate(self, prefix: str) -> None:
        """Drop every entry under a prefix (a write went through the gateway)."""
        for key in [k for k, entry in self._entries.items() if entry.prefix == prefix]:
            del self._entries[key]

    def _store(self, key: bytes, prefix: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        etag = next((v for k, v in headers if k == b"etag"), None)
        self._entries[key] = _Entry(200, headers, body, etag, self.clock(), prefix)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def _shareable(headers: list[tuple[bytes, bytes]]) -> bool:
    public = False
    for name, value in headers:
        if name == b"set-cookie" or name == b"content-encoding":
            return False
        if name == b"cache-control":
            directives = {d.strip().split(b"=", 1)[0].lower() for d in value.split(b",")}
            if directives & {b"no-store", b"private", b"no-cache"}:
                return False
            public = public or b"public" in directives
        if name == b"vary" and any(v.strip().lower() not in (b"authorization", b"origin") for v in value.split(b",")):
            return False
    return public
