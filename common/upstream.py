"""The client to the other processes: keep-alive HTTP/1.1 connections parsed by httptools.

The gateway forwards through it, and orders calls inventory through it (``common.http.PooledTransport``).
The forwarding path runs on every request, and the client on it decides the gateway's throughput
(DESIGN.md, "Performance facts"). A general-purpose client does a lot per request that a proxy speaking
to a few known services does not need (URL objects, cookie jars, tracing hooks, header multidicts):
measured, aiohttp's client was a third of the gateway's CPU per request. This one writes the request in
one buffer, lets llhttp (the parser uvicorn itself uses) parse the answer, and hands the body over as it
arrives, with back-pressure, so large downloads stream without being held whole in memory.

Errors are typed for the proxy, which maps them to answers and to its circuit breaker:
``ConnectFailed`` (nothing was sent; transient), ``PoolExhausted`` (every connection of this process's
own pool stayed busy: local load, not the upstream's health), ``UpstreamTimeout`` (the request's
deadline passed, or the body fell silent) and ``BadResponse`` (the answer was not HTTP/1.1, or the
connection broke mid-answer; ``TLSFailed`` when the TLS handshake was refused: a configuration error
that retrying will not heal). A request that finds its pooled connection closed by the upstream before
any byte of the answer is retried once on a new connection when its method is idempotent; nothing else
is ever retried here.

Each request has one overall deadline (``deadline`` seconds): waiting for a pooled connection,
connecting, sending and waiting for the status line all come out of it. Once the head is in, the body
may take as long as it needs, as long as it never falls silent for ``read_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # buffered body bytes before the socket stops being read
_LOW_WATER = 64 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection could be opened: the upstream never saw the request."""


class PoolExhausted(UpstreamError):
    """No connection of this process's own pool came free in time: the upstream never saw the request."""


class UpstreamTimeout(UpstreamError):
    """The request's deadline passed before the status line arrived, or the body fell silent."""


class BadResponse(UpstreamError):
    """The connection broke or the answer was not valid HTTP/1.1."""


class TLSFailed(BadResponse):
    """The TLS handshake failed (certificate, protocol): a configuration error, not a passing one."""


class _Stale(BadResponse):
    """A reused connection was closed before any byte of the answer arrived."""


class Response:
    __slots__ = ("status", "headers", "complete", "_chunks", "_buffered", "_error", "_waiter", "_conn", "_timeout")

    def __init__(self, conn: _Connection, timeout: float) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn = conn
        self._timeout = timeout

    def body_if_complete(self) -> bytes | None:
        """The whole body when it has already arrived (the common case for small answers)."""
        if not self.complete:
            return None
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def whole_within(self, limit: int) -> bytes | None:
        """The whole body, waited for, when it is at most ``limit`` bytes (at most the high-water mark, where
        reading stops); None for a longer one, whose chunks stay buffered for ``iter_chunks``."""
        limit = min(limit, _HIGH_WATER)
        while not self.complete:
            if self._error is not None:
                raise self._error
            if self._buffered > limit:
                return None
            await self._conn.wait(self, self._timeout)
        return self.body_if_complete() if self._buffered <= limit else None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                self._conn.maybe_resume(self._buffered)
                yield chunk
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            await self._conn.wait(self, self._timeout)

    # Called by the connection.
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reused = False
        self.received = False
        self.head_only = False
        self.paused = False
        self.reusable = True
        self.counted = True  # holds one of the pool's slots until discarded
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - asyncio's signature
        self.closed = True
        self.pool.discard(self)
        response = self.response
        if response is not None and not response.complete and response._error is None:
            if self.reused and not self.received:
                response._error = _Stale("the pooled connection was closed by the upstream")
            else:
                response._error = BadResponse("the upstream closed the connection mid-answer")
            response._wake()

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("the upstream tried to switch protocols"))
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP from the upstream: {exc}"))

    # httptools callbacks

    def _current(self) -> Response:
        """The answer being parsed. Bytes with no request outstanding are a broken upstream: raised here,
        inside a parser callback, httptools turns it into the HttpParserError that ``data_received`` fails
        the connection with."""
        if self.response is None:
            raise BadResponse("the upstream answered with no request outstanding")
        return self.response

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current().headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        response = self._current()
        response.status = self.parser.get_status_code()
        if not self.parser.should_keep_alive():
            self.reusable = False
        if self.head_only:  # no body follows an answer to HEAD, whatever its Content-Length says
            self.reusable = False
            response.complete = True
        response._wake()

    def on_body(self, body: bytes) -> None:
        response = self._current()
        response._chunks.append(body)
        response._buffered += len(body)
        if response._buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        if response is not None and not response.complete:
            response.complete = True
            response._wake()

    # Used by the pool and the response

    def send(self, method: bytes, head: bytes, body: bytes, timeout: float) -> Response:
        if self.transport is None:  # lost between the pool's check and this send
            raise ConnectFailed("the connection to the upstream is closed")
        self.response = Response(self, timeout)
        self.received = False
        self.head_only = method == b"HEAD"
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return self.response

    async def wait(self, response: Response, timeout: float) -> None:
        if timeout <= 0:
            raise UpstreamTimeout("the upstream did not answer in time")
        waiter = self.loop.create_future()
        response._waiter = waiter
        handle = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            response._waiter = None

    def maybe_resume(self, buffered: int) -> None:
        if self.paused and buffered < _LOW_WATER and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _fail(self, error: BaseException) -> None:
        response = self.response
        if response is not None and response._error is None and not response.complete:
            response._error = error
            response._wake()
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout("the upstream did not answer in time"))


class UpstreamPool:
    """Keep-alive connections to one upstream (``host:port``), at most ``size`` open at once."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        size: int,
        connect_timeout: float,
        read_timeout: float,
        deadline: float | None = None,
        idle_seconds: float = 4.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.tls = tls
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host = host
        self.port = port
        self.host_header = (f"{host}:{port}" if ":" not in host else f"[{host}]:{port}").encode("ascii")
        self.size = size
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline = deadline if deadline is not None else read_timeout
        # Below uvicorn's default keep-alive (5 s), so an idle connection is dropped here first.
        self.idle_seconds = idle_seconds
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the pool's connections live on: the running one at first use (a pool may be made
        before any loop runs: the gateway makes its clients to auth and audit in ``create_app``)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    @classmethod
    def for_url(
        cls, url: str, *, size: int, connect_timeout: float, read_timeout: float, deadline: float | None = None
    ) -> UpstreamPool:
        """A pool to ``http(s)://host[:port]`` (any path in the URL is the caller's business)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"URL must be http(s)://host[:port]: {url!r}")
        tls = ssl.create_default_context() if parts.scheme == "https" else None
        return cls(
            parts.hostname,
            parts.port or (443 if tls else 80),
            size=size,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            deadline=deadline,
            tls=tls,
        )

    async def request(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> tuple[Response, _Connection]:
        """Send the request; returns once the answer's status and headers are in, within the deadline."""
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", self.host_header, b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if body or method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            parts += (b"content-length: ", str(len(body)).encode("ascii"), b"\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        loop = self.loop
        expires = loop.time() + self.deadline
        for attempt in (1, 2):
            conn = await self._acquire(expires)
            response = conn.send(method, head, body, self.read_timeout)
            try:
                while response.status == 0:
                    if response._error is not None:
                        raise response._error
                    await conn.wait(response, expires - loop.time())
            except _Stale:
                self.release(conn)
                if attempt == 1 and method in IDEMPOTENT:
                    continue
                raise
            except BaseException:
                self.release(conn)
                raise
            return response, conn
        raise AssertionError("unreachable")

    def release(self, conn: _Connection) -> None:
        """Give the connection back after its answer was read whole (or close it if it can't be reused)."""
        response = conn.response
        conn.response = None
        if conn.closed or not conn.reusable or response is None or not response.complete or self.closing:
            conn.close()
            self.discard(conn)
            return
        # Reading stops at the high-water mark, and the read that crossed it may also have completed the
        # answer: taken whole (``body_if_complete``), nothing resumed it. A connection goes back reading, or
        # the next answer on it would sit unread in the socket until its deadline.
        conn.maybe_resume(0)
        conn.reused = True
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self._wake_one()

    def discard(self, conn: _Connection) -> None:
        """The connection is closed or closing: it leaves the pool and frees its slot (once)."""
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _acquire(self, expires: float) -> _Connection:
        while True:
            now = time.monotonic()
            while self.idle:
                conn = self.idle.pop()
                if conn.closed or conn.transport is None or conn.transport.is_closing():
                    self.discard(conn)
                    continue
                if now - conn.idle_since > self.idle_seconds:
                    conn.close()
                    self.discard(conn)
                    continue
                return conn
            if self.open < self.size:
                self.open += 1
                try:
                    return await self._connect(expires)
                except BaseException:
                    self.open -= 1
                    raise
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(min(expires, self.loop.time() + self.connect_timeout)):
                    await waiter
            except TimeoutError:
                raise PoolExhausted("no free connection to the upstream in time") from None

    async def _connect(self, expires: float) -> _Connection:
        connect_by = self.loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(min(expires, connect_by)):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
        except TimeoutError:
            if expires < connect_by:
                raise UpstreamTimeout("the request's deadline passed while connecting") from None
            raise ConnectFailed("connecting to the upstream timed out") from None
        except ssl.SSLError as exc:  # before OSError: SSLError is one
            if isinstance(exc, ssl.SSLEOFError | ssl.SSLSyscallError | ssl.SSLZeroReturnError):
                raise ConnectFailed("the upstream closed the connection during the TLS handshake") from None
            raise TLSFailed(f"TLS with the upstream failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to the upstream: {exc.strerror or exc}") from None
        return conn

    async def close(self) -> None:
        self.closing = True
        for conn in list(self.idle):
            conn.close()
            self.discard(conn)
