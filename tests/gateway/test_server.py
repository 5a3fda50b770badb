"""The gateway's answer writer (gateway.server) on a real uvicorn server, read byte by byte from a socket."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway.server import GatewayHttpProtocol
from tests.support.servers import serve

WRITES: list[bytes] = []


class CountingProtocol(GatewayHttpProtocol):
    """Records every write to the client's socket (asyncio's own transport: its methods can be wrapped)."""

    def connection_made(self, transport: Any) -> None:
        write = transport.write

        def recording(data: bytes) -> None:
            WRITES.append(bytes(data))
            write(data)

        transport.write = recording
        super().connection_made(transport)


RELEASE = threading.Event()


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/whole":
        headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"ok":true}'})
    elif path == "/slow-stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while not RELEASE.is_set():  # the client releases the body once it has read the head
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/injected":
        headers = [(b"x-note", b"ok\r\nset-cookie: stolen=1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/bad-name":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x note", b"1")]})
        await send({"type": "http.response.body", "body": b""})


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode()


def test_a_whole_answer_leaves_in_one_write_and_the_connection_stays_open() -> None:
    with serve(app, http=CountingProtocol) as server, socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        for _ in range(2):
            WRITES.clear()
            sock.sendall(request("GET", "/whole"))
            answer = read_until(sock, b'{"ok":true}')
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-length: 11" in head.split(b"\r\n")
            assert body == b'{"ok":true}'
            assert WRITES == [answer]  # head and body in one system call
        sock.sendall(request("HEAD", "/whole"))
        head = read_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"content-length: 11\r\n\r\n")  # no body follows an answer to HEAD
        sock.sendall(request("GET", "/empty"))
        empty = read_until(sock, b"\r\n\r\n")
        assert empty.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"transfer-encoding" not in empty


def test_a_head_whose_body_waits_is_sent_at_once() -> None:
    RELEASE.clear()
    with serve(app, http=CountingProtocol) as server, socket.create_connection(("127.0.0.1", server.port), 5) as sock:
        sock.sendall(request("GET", "/slow-stream"))
        head = read_until(sock, b"\r\n\r\n")  # would time out if the head waited for the body
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding: chunked" in head
        RELEASE.set()
        rest = read_until(sock, b"0\r\n\r\n", head.partition(b"\r\n\r\n")[2])
        assert rest == b"5\r\nfirst\r\n0\r\n\r\n"


def test_a_header_that_would_split_the_answer_is_never_written() -> None:
    with serve(app, http=CountingProtocol) as server:
        for path in ("/injected", "/bad-name"):
            with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
                sock.sendall(request("GET", path))
                assert read_until(sock, b"\r\n\r\n") == b""  # the connection is closed, nothing written


def test_a_request_the_parser_refuses_gets_a_problem_document() -> None:
    """Not HTTP the parser can read: 400 as application/problem+json with the usual headers, like every
    other error, and the connection closes. The parser's own message is not sent."""
    with serve(app, http=GatewayHttpProtocol) as server:
        for raw in (
            b"FOO /whole HTTP/1.1\r\nhost: test\r\n\r\n",  # not a method
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nhost: test\r\n\r\n",  # raw bytes in the target
            b"POST /whole HTTP/1.1\r\nhost: test\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc",
            b"POST /whole HTTP/1.1\r\nhost: test\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabc",
        ):
            with socket.create_connection(("127.0.0.1", server.port), 5) as sock:
                sock.sendall(raw)
                answer = read_until(sock, b"\x00never")  # everything, until the server closes
            head, _, body = answer.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            assert lines[0] == b"HTTP/1.1 400 Bad Request", raw
            fields = dict(line.split(b": ", 1) for line in lines[1:])
            assert fields[b"content-type"] == b"application/problem+json"
            assert fields[b"connection"] == b"close"
            assert fields[b"x-content-type-options"] == b"nosniff"
            assert fields[b"cache-control"] == b"no-store"
            assert int(fields[b"content-length"]) == len(body)
            problem = json.loads(body)
            assert (problem["status"], problem["type"]) == (400, "urn:comptoir:problem:bad-request")
            assert problem["detail"] == "The request is not valid HTTP/1.1."
            assert problem["request_id"] == fields[b"x-request-id"].decode()
