"""The standard middlewares' fast paths, driven as ASGI directly (the HTTP conventions are in test_http_conventions)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from common.middleware import (
    DEADLINE_TOLERANCE_SECONDS,
    SecurityHeaders,
    new_request_id,
    security_headers,
    standard_stack,
)


def http_scope(*, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None, version: str = "1.1") -> Scope:
    return {
        "type": "http",
        "http_version": version,
        "method": method,
        "scheme": "http",
        "path": "/things",
        "raw_path": b"/things",
        "query_string": b"",
        "headers": headers or [],
        "client": ("192.0.2.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def run(app: Any, scope: Scope, body_chunks: list[bytes] | None = None) -> list[Message]:
    chunks = list(body_chunks or [b""])
    sent: list[Message] = []

    async def receive() -> Message:
        if chunks:
            chunk = chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def answering(headers: list[tuple[bytes, bytes]]) -> Any:
    async def app(_scope: Scope, receive: Receive, send: Send) -> None:
        received = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            received += message.get("body", b"")
            more = message.get("more_body", False)
        body = json.dumps({"received": len(received)}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def stack(app: Any, **kwargs: Any) -> Any:
    return standard_stack(app, service="test", hsts_seconds=None, max_body_bytes=100, **kwargs)


def test_request_ids_are_random_version_4_uuids() -> None:
    ids = [new_request_id() for _ in range(2000)]  # across several refills of the random buffer
    assert len(set(ids)) == len(ids)
    for rid in ids:
        parsed = uuid.UUID(rid)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, rid)


def test_one_pass_sets_the_request_id_and_the_security_headers() -> None:
    app = answering(
        [
            (b"content-type", b"application/json"),
            (b"Server", b"leaky/1.0"),
            (b"x-request-id", b"chosen-by-the-app"),
            (b"X-Frame-Options", b"ALLOW"),
        ]
    )
    start = run(stack(app), http_scope())[0]
    headers: list[tuple[bytes, bytes]] = start["headers"]
    names = [name for name, _ in headers]
    assert all(name == name.lower() for name in names)
    assert b"server" not in names
    assert names.count(b"x-request-id") == 1
    uuid.UUID(dict(headers)[b"x-request-id"].decode())  # ours, not the app's
    assert names.count(b"x-frame-options") == 1
    assert dict(headers)[b"x-frame-options"] == b"DENY"
    for name, value in security_headers(hsts_seconds=None):
        assert dict(headers)[name] == value
    assert dict(headers)[b"cache-control"] == b"no-store"


def test_a_route_keeps_its_own_cache_control_and_resource_policy() -> None:
    app = answering([(b"cache-control", b"public, max-age=60"), (b"cross-origin-resource-policy", b"cross-origin")])
    headers: list[tuple[bytes, bytes]] = run(stack(app), http_scope())[0]["headers"]
    assert [v for k, v in headers if k == b"cache-control"] == [b"public, max-age=60"]
    assert [v for k, v in headers if k == b"cross-origin-resource-policy"] == [b"cross-origin"]


def test_the_security_headers_alone_keep_the_apps_request_id() -> None:
    headers = dict(SecurityHeaders().apply([(b"x-request-id", b"from-app"), (b"Server", b"x")]))
    assert headers[b"x-request-id"] == b"from-app"
    assert headers[b"cache-control"] == b"no-store"
    assert b"server" not in headers


def test_a_bodiless_http1_request_reaches_the_app_untouched() -> None:
    sent = run(stack(answering([])), http_scope())
    assert sent[0]["status"] == 200
    assert json.loads(sent[1]["body"]) == {"received": 0}


def test_a_body_without_length_headers_is_still_counted_outside_http1() -> None:
    """HTTP/2 frames a body without Content-Length or Transfer-Encoding: the bodiless fast path must not apply."""
    headers = [(b"content-type", b"application/json")]
    over = run(stack(answering([])), http_scope(method="POST", headers=headers, version="2"), [b"x" * 60, b"x" * 60])
    assert over[0]["status"] == 413
    under = run(stack(answering([])), http_scope(method="POST", headers=headers, version="2"), [b"x" * 40, b"x" * 40])
    assert under[0]["status"] == 200
    assert json.loads(under[1]["body"]) == {"received": 80}


def test_a_chunked_http1_body_over_the_limit_is_413() -> None:
    headers = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    sent = run(stack(answering([])), http_scope(method="POST", headers=headers), [b"x" * 60, b"x" * 60])
    assert sent[0]["status"] == 413


def test_a_request_whose_gateway_deadline_has_passed_is_not_run() -> None:
    ran: list[bool] = []
    inner = answering([(b"content-type", b"application/json")])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        ran.append(True)
        await inner(scope, receive, send)

    def status_with(deadline: bytes | None) -> int:
        headers = [(b"x-comptoir-deadline", deadline)] if deadline is not None else []
        return int(run(stack(app), http_scope(method="POST", headers=headers))[0]["status"])

    now = time.time()
    late = "%.3f" % (now - DEADLINE_TOLERANCE_SECONDS - 5)
    assert status_with(late.encode()) == 504
    assert ran == []
    # Within the clocks' tolerance, ahead, garbage or absent: run.
    for deadline in (b"%.3f" % (now - 0.5), b"%.3f" % (now + 15), b"soon", None):
        assert status_with(deadline) == 200, deadline
    assert len(ran) == 4
    # The gateway's own stack ignores the header: a client may not refuse its own requests through it.
    gateway = standard_stack(app, service="gateway", hsts_seconds=None, max_body_bytes=100)
    assert run(gateway, http_scope(headers=[(b"x-comptoir-deadline", late.encode())]))[0]["status"] == 200
