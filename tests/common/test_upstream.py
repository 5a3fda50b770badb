"""The gateway's upstream client against a scripted HTTP server on a real socket: framing, keep-alive,
stale pooled connections, back-pressure, broken answers and time limits."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from common.upstream import (
    BadResponse,
    ConnectFailed,
    PoolExhausted,
    Response,
    TLSFailed,
    UpstreamPool,
    UpstreamTimeout,
)
from tests.conftest import assert_problem, assert_security_headers
from tests.gateway.conftest import running_gateway
from tests.support.servers import Echo, raw_request, serve
from tests.support.tls import self_signed

OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello"

# A script answers one request: it gets the request's head and the connection's request count, and
# returns the bytes to send back, or None to close the connection without answering.
Script = Callable[[bytes, int], bytes | None]


class ScriptedServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                served += 1
                answer = self.script(head, served)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def scripted(script: Script, **pool_options: float) -> AsyncIterator[tuple[ScriptedServer, UpstreamPool]]:
    server = ScriptedServer(script)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    options = {"size": 10, "connect_timeout": 2.0, "read_timeout": 2.0} | pool_options
    pool = UpstreamPool("127.0.0.1", port, **options)  # type: ignore[arg-type]
    try:
        yield server, pool
    finally:
        await pool.close()
        for writer in server.writers:
            writer.close()
        listener.close()


async def fetch(pool: UpstreamPool, method: bytes = b"GET", body: bytes = b"") -> tuple[int, bytes]:
    response, conn = await pool.request(method, b"/x", [(b"accept", b"*/*")], body)
    try:
        whole = response.body_if_complete()
        if whole is None:
            whole = b"".join([chunk async for chunk in response.iter_chunks()])
        return response.status, whole
    finally:
        pool.release(conn)


async def drain(response: Response) -> None:
    async for _ in response.iter_chunks():
        pass


async def test_keep_alive_connections_are_reused() -> None:
    async with scripted(lambda _head, _n: OK) as (server, pool):
        for _ in range(20):
            assert await fetch(pool) == (200, b"hello")
        results = await asyncio.gather(*(fetch(pool) for _ in range(30)))
        assert all(result == (200, b"hello") for result in results)
    assert server.connections <= 10  # never more than the pool's size
    assert len(server.requests) == 50


async def test_the_request_is_framed_with_host_and_length() -> None:
    async with scripted(lambda _head, _n: OK) as (server, pool):
        await fetch(pool, b"POST", b'{"a":1}')
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /x HTTP/1.1"
    assert lines[1].startswith(b"host: 127.0.0.1:")
    assert b"content-length: 7" in lines
    assert body == b'{"a":1}'


async def test_chunked_answers_are_reassembled() -> None:
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    async with scripted(lambda _head, _n: chunked) as (_server, pool):
        assert await fetch(pool) == (200, b"abcde")
        assert await fetch(pool) == (200, b"abcde")


async def test_a_pooled_connection_closed_by_the_upstream_is_retried_for_idempotent_methods() -> None:
    # Every connection answers one request, then closes on the next without a byte: a stale keep-alive.
    def one_per_connection(_head: bytes, served: int) -> bytes | None:
        return OK if served == 1 else None

    async with scripted(one_per_connection, idle_seconds=60) as (server, pool):
        response, conn = await pool.request(b"GET", b"/x", [], b"")
        pool.release(conn)
        # Reuse the connection before its close is noticed: the GET goes to a new connection.
        assert await fetch(pool) == (200, b"hello")
        assert server.connections == 2
        with pytest.raises(BadResponse):  # a POST is never sent twice
            await fetch(pool, b"POST", b"{}")


async def test_answers_to_head_have_no_body_and_do_not_poison_the_connection() -> None:
    head_answer = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    async with scripted(lambda head, _n: head_answer if head.startswith(b"HEAD") else OK) as (_server, pool):
        assert await fetch(pool, b"HEAD") == (200, b"")
        assert await fetch(pool) == (200, b"hello")


async def test_invalid_http_is_a_bad_response() -> None:
    async with scripted(lambda _head, _n: b"SMTP ready\r\n\r\n") as (_server, pool):
        with pytest.raises(BadResponse):
            await fetch(pool)


async def test_an_answer_cut_short_is_a_bad_response_not_a_hang() -> None:
    cut = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\nonly-this"

    def then_close(_head: bytes, _n: int) -> bytes:
        return cut

    async with scripted(then_close) as (server, pool):
        response, conn = await pool.request(b"GET", b"/x", [], b"")
        server.writers[0].close()  # the upstream dies mid-body
        with pytest.raises(BadResponse):
            await asyncio.wait_for(drain(response), 5)
        pool.release(conn)
        assert pool.open == 0


async def test_silence_is_a_timeout_before_and_during_the_body() -> None:
    async with scripted(lambda _head, _n: b"", read_timeout=0.2) as (_server, pool):
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
    partial = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    async with scripted(lambda _head, _n: partial, read_timeout=0.2) as (_server, pool):
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
        assert pool.open == 0  # a connection in an unknown state is never reused


async def test_nobody_listening_is_connect_failed() -> None:
    listener = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    pool = UpstreamPool("127.0.0.1", port, size=2, connect_timeout=1.0, read_timeout=1.0)
    with pytest.raises(ConnectFailed):
        await pool.request(b"GET", b"/", [], b"")
    assert pool.open == 0


async def test_requests_beyond_the_pool_size_wait_for_a_free_connection() -> None:
    async with scripted(lambda _head, _n: OK, size=2) as (server, pool):
        results = await asyncio.gather(*(fetch(pool) for _ in range(12)))
    assert results == [(200, b"hello")] * 12
    assert server.connections <= 2


async def test_large_bodies_are_read_with_back_pressure() -> None:
    """A body far larger than every socket buffer on the way: while nobody consumes it, the client stops
    reading (a state it must reach, waited for, not slept on) and the upstream cannot hand more than those
    buffers can hold to the network; consuming it then resumes reading and brings every byte."""
    size = 64 * 1024 * 1024
    big = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"z" * size
    async with scripted(lambda _head, _n: big) as (server, pool):
        response, conn = await pool.request(b"GET", b"/x", [], b"")
        transport = conn.transport
        assert transport is not None
        deadline = asyncio.get_running_loop().time() + 10
        while transport.is_reading():
            assert asyncio.get_running_loop().time() < deadline, "the client never stopped reading"
            await asyncio.sleep(0.01)
        # Paused: what left the upstream is bounded by the two sockets' kernel buffers plus the client's
        # high-water mark (1 MiB is ample), whatever the body's size.
        upstream = server.writers[0].transport
        received = transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sent = upstream.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert received + sent + 1024 * 1024 < size
        assert size - upstream.get_write_buffer_size() <= received + sent + 1024 * 1024
        total = 0
        async for chunk in response.iter_chunks():
            total += len(chunk)
        pool.release(conn)
    assert total == size


async def _sized(scope: dict[str, object], receive: object, send: Callable[..., object]) -> None:
    """An upstream that states Content-Length itself, as FastAPI's JSON responses do."""
    if scope["type"] != "http":
        return
    body = b'{"items":[],"next_cursor":null}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[misc]
    await send({"type": "http.response.body", "body": body})  # type: ignore[misc]


def test_proxied_answers_carry_at_most_one_content_length(issuer) -> None:  # noqa: ANN001
    with serve(_sized) as sized, running_gateway(sized.url, issuer) as (url, _app):
        port = int(url.rsplit(":", 1)[1])
        raw = raw_request(port, b"GET /api/v1/products HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    assert lengths == [b"content-length: %d" % len(body)]
    with serve(Echo()) as chunked, running_gateway(chunked.url, issuer) as (url, _app):
        answer = httpx.get(url + "/api/v1/products")
        streamed = httpx.get(url + "/api/v1/products/x/images/stream")
    assert answer.status_code == 200
    assert len(answer.headers.get_list("content-length")) <= 1
    assert len(streamed.content) == 48 * 65536


def test_an_upstream_speaking_garbage_is_a_502_problem(issuer) -> None:  # noqa: ANN001
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer_garbage() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    threading.Thread(target=answer_garbage, daemon=True).start()
    try:
        with running_gateway(f"http://127.0.0.1:{port}", issuer) as (url, _app):
            response = httpx.get(url + "/api/v1/products")
    finally:
        listener.close()
    assert_problem(response, 502)
    assert_security_headers(response)
    assert response.headers["x-request-id"]


async def test_a_full_pool_is_the_callers_own_limit_not_a_connect_failure() -> None:
    async with scripted(lambda _head, _n: b"", size=1, connect_timeout=0.2) as (_server, pool):
        holder = asyncio.create_task(pool.request(b"GET", b"/x", [], b""))  # the only connection, never answered
        while pool.open == 0:
            await asyncio.sleep(0)
        with pytest.raises(PoolExhausted):
            await pool.request(b"GET", b"/x", [], b"")
        holder.cancel()
        with pytest.raises(asyncio.CancelledError):
            await holder


async def test_one_deadline_bounds_everything_before_the_first_byte_whatever_the_read_timeout() -> None:
    async with scripted(lambda _head, _n: b"", read_timeout=30.0, deadline=0.3) as (_server, pool):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(UpstreamTimeout):
            await fetch(pool)
        assert loop.time() - started < 2.0


async def test_an_untrusted_certificate_is_a_tls_failure_not_a_passing_outage(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = ScriptedServer(lambda _head, _n: OK)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, ssl=context)
    port = listener.sockets[0].getsockname()[1]
    pool = UpstreamPool.for_url(f"https://127.0.0.1:{port}", size=2, connect_timeout=2.0, read_timeout=2.0)
    try:
        with pytest.raises(TLSFailed):
            await pool.request(b"GET", b"/", [], b"")
        assert pool.open == 0
    finally:
        await pool.close()
        listener.close()


async def test_a_connection_misused_raises_named_errors_not_asserts() -> None:
    """What ``python -O`` would have let through: bytes parsed with no request outstanding, and a send on a
    connection whose transport is gone."""
    from common.upstream import _Connection

    pool = UpstreamPool.for_url("http://127.0.0.1:9", size=1, connect_timeout=1, read_timeout=1)
    conn = _Connection(pool)
    with pytest.raises(BadResponse, match="no request outstanding"):
        conn.on_header(b"content-type", b"text/plain")
    with pytest.raises(BadResponse, match="no request outstanding"):
        conn.on_body(b"stray")
    with pytest.raises(ConnectFailed, match="closed"):
        conn.send(b"GET", b"GET / HTTP/1.1\r\n\r\n", b"", 1.0)


async def test_an_answer_that_arrived_whole_while_reading_was_paused_leaves_a_reading_connection() -> None:
    """The whole answer lands in the client's socket at once and crosses the high-water mark in the read
    that completes it: the client stops reading with nothing left to read. Taking that body whole must
    still hand the connection back reading, or the next request on it waits for an answer that sits unread
    in the socket (seen as auth's 504s after a large `/me/export` in the long fuzz)."""
    size = 300 * 1024  # more than the high-water mark, delivered in two of asyncio's 256 KiB reads
    big = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size + b"z" * size
    listener = socket.create_server(("127.0.0.1", 0))
    all_sent = threading.Event()

    def serve_three() -> None:  # blocking, on its own thread, so it can write while the client's loop is held
        conn, _ = listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        with conn, conn.makefile("rb") as requests:
            for answer in (OK, big, OK):
                while requests.readline() not in (b"\r\n", b""):
                    pass
                conn.sendall(answer)
                if answer is big:
                    all_sent.set()

    server = threading.Thread(target=serve_three, daemon=True)
    server.start()
    pool = UpstreamPool("127.0.0.1", listener.getsockname()[1], size=1, connect_timeout=2.0, read_timeout=2.0)
    try:
        assert await fetch(pool) == (200, b"hello")  # the connection, now pooled and idle
        (conn,) = pool.idle
        assert conn.transport is not None
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        # Hold the loop (the request is written before it yields) until every byte of the answer is in the
        # client's socket buffer, so the client reads it in as few reads as it can.
        asyncio.get_running_loop().call_soon(all_sent.wait, 10)
        response, conn = await pool.request(b"GET", b"/x", [], b"")
        while not response.complete and conn.transport.is_reading():
            await asyncio.sleep(0)
        assert response.complete, "the client stopped reading before the answer was whole: nothing to prove"
        assert not conn.transport.is_reading()  # the state that used to leak into the pool
        assert response.body_if_complete() == b"z" * size
        pool.release(conn)
        assert conn.transport.is_reading()
        assert await fetch(pool) == (200, b"hello")
    finally:
        await pool.close()
        listener.close()
        server.join(5)
