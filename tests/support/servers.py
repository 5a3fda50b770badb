"""Real HTTP servers on loopback for tests: uvicorn in a background thread, and an echo upstream."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from tests.conftest import free_port


class ThreadedServer:
    def __init__(self, app: Any, port: int | None = None, http: Any = "auto") -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            server_header=False,
            proxy_headers=False,
            loop="asyncio",
            http=http,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextmanager
def serve(app: Any, port: int | None = None, http: Any = "auto") -> Iterator[ThreadedServer]:
    """``app`` on a real uvicorn server; ``http``: uvicorn's protocol (the gateway runs on its own)."""
    server = ThreadedServer(app, port, http).start()
    try:
        yield server
    finally:
        server.stop()


async def request_body(scope: Any, receive: Any, send: Any) -> bytes | None:
    """For a hand-written ASGI test app: the lifespan protocol answered (None: nothing more to do), or the
    request's whole body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


class Echo:
    """An upstream that answers with what it received. ``/slow`` waits, ``/stream`` sends 3 MiB chunked,
    ``/page`` sends a 200 KiB JSON answer (a large catalogue page)."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await request_body(scope, receive, send)
        if body is None:
            return
        path = scope["path"]
        self.hits.append(path)
        if path.endswith("/slow"):
            await asyncio.sleep(3)
        if path.endswith("/stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            for _ in range(48):
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if path.endswith("/page"):
            page = json.dumps({"items": ["x" * 1000] * 200}).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": page})
            return
        payload = json.dumps(
            {
                "method": scope["method"],
                "path": path,
                "query": scope.get("query_string", b"").decode(),
                "headers": [[k.decode(), v.decode("latin-1")] for k, v in scope["headers"]],
                "body_length": len(body),
            }
        ).encode()
        status = 201 if scope["method"] == "POST" else 200
        headers = [
            (b"content-type", b"application/json"),
            (b"server", b"echo/1.0"),
            (b"connection", b"keep-alive, x-upstream-hop"),
            (b"x-upstream-hop", b"secret-topology"),
            (b"keep-alive", b"timeout=5"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def echoed_headers(response_json: dict[str, Any]) -> dict[str, str]:
    return dict(response_json["headers"])


def raw_request(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes as they are (no client-side path normalisation) and return the whole answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)
