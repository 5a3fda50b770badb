"""The rate-limit counters in Redis, over one pipelined connection (RESP on asyncio streams).

Measured on the development VM: one counter hit through ``limits``' Redis storage and redis-py's asyncio
client cost the gateway 133-142 µs of CPU, the same command written on an asyncio stream 17 µs. With limits
in Redis on every request (several workers or replicas), that client was the largest part of a request's
cost. The three calls ``RateLimits`` makes are done here with the same keys and the same script as ``limits``
(``LIMITS:`` prefix, INCRBY then EXPIRE on the window's first hit), so both can share one Redis.

One connection carries every command in flight: requests are written in order and Redis answers in order,
so each caller waits on its own future. A connection that fails, or whose oldest command waits longer than
the timeout, is closed with every command still waiting on it (their callers get the error: the policy
``RATE_LIMIT_STORAGE_FAILURE`` decides), and the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import unquote, urlsplit

KEY_PREFIX = "LIMITS"
# The same script as limits' incr_expire.lua: the window starts with its first hit.
_INCR_EXPIRE = (
    b"local current = redis.call('incrby', KEYS[1], tonumber(ARGV[2]))\n"
    b"if tonumber(current) == tonumber(ARGV[2]) then redis.call('expire', KEYS[1], ARGV[1]) end\n"
    b"return current"
)

Reply = int | bytes | None


class RedisReplyError(Exception):
    """Redis answered a command with an error."""


class RedisConnectionLost(ConnectionError):
    """The connection closed (or was closed after a timeout) before the answer came."""


def _command(*parts: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        # (caller's future, replies expected, replies so far, when it was sent)
        self.pending: deque[tuple[asyncio.Future[list[Reply]], int, list[Reply], float]] = deque()
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._read())
        # One watchdog per connection rather than a timer per command (asyncio.timeout cost ~25 µs a call).
        self.watchdog = self.loop.call_later(timeout / 4, self._watch)

    def send(self, payload: bytes, replies: int) -> asyncio.Future[list[Reply]]:
        if self.closed:
            raise RedisConnectionLost("the connection to Redis is closed")
        future: asyncio.Future[list[Reply]] = self.loop.create_future()
        self.pending.append((future, replies, [], time.monotonic()))
        self.writer.write(payload)
        return future

    def _watch(self) -> None:
        if self.closed:
            return
        if self.pending and time.monotonic() - self.pending[0][3] > self.timeout:
            # Every command waiting on it fails now; the next call opens a new connection.
            self.close(RedisConnectionLost(f"Redis did not answer within {self.timeout:g} s"))
            return
        self.watchdog = self.loop.call_later(self.timeout / 4, self._watch)

    async def _reply(self) -> Reply | RedisReplyError:
        line = await self.reader.readuntil(b"\r\n")
        kind, value = line[:1], line[1:-2]
        if kind == b":":
            return int(value)
        if kind == b"+":
            return value
        if kind == b"-":
            return RedisReplyError(value.decode("utf-8", "replace"))
        if kind == b"$":
            length = int(value)
            if length < 0:
                return None
            return (await self.reader.readexactly(length + 2))[:-2]
        raise RedisReplyError(f"unexpected reply from Redis: {line[:40]!r}")

    async def _read(self) -> None:
        error: BaseException = RedisConnectionLost("Redis closed the connection")
        try:
            while True:
                reply = await self._reply()
                if not self.pending:
                    raise RedisReplyError("a reply from Redis with no command waiting")
                future, expected, got, _ = self.pending[0]
                got.append(reply if not isinstance(reply, RedisReplyError) else None)
                if isinstance(reply, RedisReplyError) and not future.done():
                    future.set_exception(reply)
                if len(got) == expected:
                    self.pending.popleft()
                    if not future.done():
                        future.set_result(got)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, RedisReplyError, ValueError) as exc:
            error = exc if isinstance(exc, RedisReplyError) else RedisConnectionLost(str(exc) or type(exc).__name__)
        finally:
            self.close(error)

    def close(self, error: BaseException | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.watchdog.cancel()
            self.writer.close()
            if not self.task.done() and self.task is not asyncio.current_task():
                self.task.cancel()
        while self.pending:
            future = self.pending.popleft()[0]
            if not future.done():
                future.set_exception(error or RedisConnectionLost("the connection to Redis was closed"))


class RedisCounters:
    """``incr``/``get_expiry``/``check`` of ``limits``' async storages, for ``redis://`` and ``rediss://`` URLs
    (user, password and database number taken from the URL)."""

    def __init__(self, url: str, *, timeout: float = 2.0, key_prefix: str = KEY_PREFIX) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {parts.scheme}://")
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        database = parts.path.lstrip("/")
        self.database = int(database) if database else 0
        self.timeout = timeout
        self.prefix = key_prefix
        self._conn: _Connection | None = None
        self._opening: asyncio.Lock | None = None

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._conn is None or self._conn.closed:
                self._conn = await self._open()
            return self._conn

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=ssl.create_default_context() if self.tls else None),
            self.timeout,
        )
        conn = _Connection(reader, writer, self.timeout)
        setup = b""
        count = 0
        if self.password is not None:
            user = (self.username,) if self.username else ()
            setup += _command(b"AUTH", *user, self.password)
            count += 1
        if self.database:
            setup += _command(b"SELECT", self.database)
            count += 1
        if count:
            try:
                await conn.send(setup, count)
            except BaseException:
                conn.close()
                raise
        return conn

    async def _call(self, payload: bytes, replies: int = 1) -> list[Reply]:
        # A caller that gives up (cancelled) keeps its place in the queue, so later answers still reach
        # their own callers. A Redis that does not answer within the timeout loses the connection (its
        # watchdog), and the next call opens another.
        conn = await self._connection()
        return await conn.send(payload, replies)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        (count,) = await self._call(
            _command(b"EVAL", _INCR_EXPIRE, 1, f"{self.prefix}:{key}", int(expiry), int(amount))
        )
        if not isinstance(count, int):
            raise RedisReplyError(f"INCRBY answered {count!r}")
        return count

    async def get_expiry(self, key: str) -> float:
        (ttl,) = await self._call(_command(b"TTL", f"{self.prefix}:{key}"))
        return max(ttl if isinstance(ttl, int) else 0, 0) + time.time()

    async def check(self) -> bool:
        (pong,) = await self._call(_command(b"PING"))
        return pong == b"PONG"

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
