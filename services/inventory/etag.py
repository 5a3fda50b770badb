"""Strong validators for the catalogue's JSON answers (RFC 9110 §8.8.3, §13.1.2).

Every 200 JSON answer under the catalogue gets ``ETag: "<sha256 of the body>"``; a GET whose
``If-None-Match`` names it is answered 304 with no body, so a client or cache that already holds the page
pays for the query but not for the transfer. Other answers (images, errors, writes) pass through as they are.
"""

from __future__ import annotations

import hashlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.conditional import if_none_match_names

CATALOGUE_PREFIX = "/api/v1/products"
# What a 304 keeps of the 200 it stands for (RFC 9110 §15.4.5).
_KEPT_ON_304 = frozenset({b"cache-control", b"content-location", b"etag", b"expires", b"vary"})


class CatalogueETags:
    def __init__(self, app: ASGIApp, prefix: str = CATALOGUE_PREFIX) -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def buffered(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                content_type = next((v for k, v in message.get("headers", ()) if k == b"content-type"), b"")
                if message["status"] == 200 and content_type.startswith(b"application/json"):
                    start = message
                    return
                await send(message)
                return
            if start is None:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            etag = b'"' + hashlib.sha256(body).hexdigest()[:40].encode("ascii") + b'"'
            headers = [*start.get("headers", ()), (b"etag", etag)]
            if if_none_match_names(scope, etag):
                kept = [(k, v) for k, v in headers if k in _KEPT_ON_304]
                await send({"type": "http.response.start", "status": 304, "headers": kept})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, buffered)
