"""Strong validators for the catalogue's JSON answers (RFC 9110 §8.8.3, §13.1.2).

Every 200 JSON answer under the catalogue gets ``ETag: "<sha256 of the body>"``; a GET whose
``If-None-Match`` names it is answered 304 with no body, so a client or cache that already holds the page
pays for the query but not for the transfer. Other answers (images, errors, writes) pass through as they are.

The public reads (the product list and one product) build their body once and answer with
:func:`json_answer`; the middleware gives the same validator to the other JSON answers under the catalogue
(stock, stock movements), and leaves an answer that already carries an ETag as it is.
"""

from __future__ import annotations

import hashlib

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.conditional import if_none_match_names

CATALOGUE_PREFIX = "/api/v1/products"
# What a 304 keeps of the 200 it stands for (RFC 9110 §15.4.5).
_KEPT_ON_304 = frozenset({b"cache-control", b"content-location", b"etag", b"expires", b"vary"})


def strong_etag(body: bytes) -> bytes:
    """The validator of an answer's bytes: any change of the bytes changes it."""
    return b'"' + hashlib.sha256(body).hexdigest()[:40].encode("ascii") + b'"'


def json_answer(scope: Scope, body: bytes, headers: dict[str, str]) -> Response:
    """A 200 with ``body`` (JSON) and its ETag, or a bodiless 304 when the request's If-None-Match names it.

    ``headers`` are the answer's own (Cache-Control, Vary); a 304 repeats them (they are all kept on a 304).
    """
    etag = strong_etag(body)
    headers = {**headers, "ETag": etag.decode("ascii")}
    if if_none_match_names(scope, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


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
                headers = message.get("headers", ())
                content_type = next((v for k, v in headers if k == b"content-type"), b"")
                tagged = any(k == b"etag" for k, _ in headers)
                if message["status"] == 200 and content_type.startswith(b"application/json") and not tagged:
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
            etag = strong_etag(body)
            headers = [*start.get("headers", ()), (b"etag", etag)]
            if if_none_match_names(scope, etag):
                kept = [(k, v) for k, v in headers if k in _KEPT_ON_304]
                await send({"type": "http.response.start", "status": 304, "headers": kept})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        await self.app(scope, receive, buffered)
