"""The gateway's own Redis client for its rate-limit counters, against a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from limits.aio.storage import RedisStorage
from pydantic import ValidationError

from gateway.config import GatewaySettings
from gateway.limits import LimitStorageUnavailable, RateLimits, make_storage
from gateway.redis_counters import RedisConnectionLost, RedisCounters, RedisReplyError
from tests.conftest import free_port
from tests.support.redis import redis_server
from tests.support.tls import self_signed

KEY = "LIMITER/all/user:someone/100/1/hour"


def start_redis(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        + list(extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


def test_redis_urls_get_the_gateways_client() -> None:
    assert isinstance(make_storage("redis://127.0.0.1:6379/0"), RedisCounters)
    assert isinstance(make_storage("rediss://user:secret@cache.internal:6380/2"), RedisCounters)
    client = RedisCounters("rediss://user:s%40cret@cache.internal:6380/2")
    assert (client.host, client.port, client.tls, client.username, client.password, client.database) == (
        "cache.internal",
        6380,
        True,
        "user",
        "s@cret",
        2,
    )


def test_two_clients_count_exactly_one_window_with_limits_own_storage(tmp_path: Path) -> None:
    """Two workers' clients hitting one key at once: every count from 1 to N given exactly once, one expiry,
    and the counts are the same keys ``limits``' own Redis storage reads and writes."""

    async def scenario(url: str) -> None:
        one, two = RedisCounters(url), RedisCounters(url)
        theirs = RedisStorage("async+" + url, implementation="redispy")
        try:
            counts = await asyncio.gather(*(client.incr(KEY, 3600) for _ in range(150) for client in (one, two)))
            assert sorted(counts) == list(range(1, 301))
            assert await theirs.incr(KEY, 3600) == 301
            assert await one.incr(KEY, 3600) == 302
            assert await theirs.get(KEY) == 302
            expires_in = await two.get_expiry(KEY) - time.time()
            assert 3590 < expires_in <= 3600
            assert await one.check() is True
        finally:
            await one.aclose()
            await two.aclose()

    with redis_server(tmp_path) as (url, _):
        asyncio.run(scenario(url))


def test_a_cancelled_caller_does_not_shift_the_answers_of_the_others(tmp_path: Path) -> None:
    async def scenario(url: str) -> None:
        client = RedisCounters(url)
        try:
            assert await client.check() is True  # the connection is open
            tasks = [asyncio.ensure_future(client.incr(KEY, 3600)) for _ in range(40)]
            await asyncio.sleep(0)  # every task ran up to its answer: all 40 commands are written
            for task in tasks[::2]:
                task.cancel()
            done = await asyncio.gather(*tasks[1::2])
            # Redis ran all 40; the callers that stayed got their own answers, the next caller the 41st.
            assert done == list(range(2, 41, 2))
            assert await client.incr(KEY, 3600) == 41
        finally:
            await client.aclose()

    with redis_server(tmp_path) as (url, _):
        asyncio.run(scenario(url))


def test_a_silent_redis_fails_the_check_within_the_timeout() -> None:
    """A Redis that accepts but never answers: the limit check fails (the storage-failure policy decides)
    within the client's timeout instead of holding the request."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    async def scenario() -> None:
        limits = RateLimits(
            GatewaySettings(environment="test", anonymous_rate_limit="5/hour"),
            storage=RedisCounters(f"redis://127.0.0.1:{port}/0", timeout=0.3),
        )
        started = time.monotonic()
        with pytest.raises(LimitStorageUnavailable) as caught:
            await limits.check("GET", "/api/v1/products", "ip:192.0.2.1", authenticated=False)
        assert isinstance(caught.value.__cause__, RedisConnectionLost)
        assert time.monotonic() - started < 2.0
        await limits.aclose()

    try:
        asyncio.run(scenario())
    finally:
        listener.close()


def test_a_restarted_redis_is_reached_again_and_a_stopped_one_fails_at_once(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    client = RedisCounters(url)
    loop = asyncio.new_event_loop()
    try:
        proc = start_redis(port, tmp_path)
        assert loop.run_until_complete(client.incr(KEY, 3600)) == 1
        proc.terminate()
        proc.wait(5)
        with pytest.raises((RedisConnectionLost, OSError)):
            loop.run_until_complete(client.incr(KEY, 3600))
        with pytest.raises(ConnectionRefusedError):  # nothing listens: refused, not waited for
            loop.run_until_complete(client.incr(KEY, 3600))
        proc = start_redis(port, tmp_path)
        try:
            assert loop.run_until_complete(client.incr(KEY, 3600)) == 1  # a new server, a new count
        finally:
            proc.terminate()
            proc.wait(5)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


def test_password_and_database_come_from_the_url(tmp_path: Path) -> None:
    port = free_port()
    proc = start_redis(port, tmp_path, "--requirepass", "s3cret/pass")

    async def scenario() -> None:
        good = RedisCounters(f"redis://:s3cret%2Fpass@127.0.0.1:{port}/3")
        wrong = RedisCounters(f"redis://:nope@127.0.0.1:{port}/3")
        try:
            assert await good.incr(KEY, 60) == 1
            assert await good.incr(KEY, 60) == 2
            with pytest.raises(RedisReplyError):
                await wrong.incr(KEY, 60)
        finally:
            await good.aclose()
            await wrong.aclose()
        # The counter is in database 3, under limits' prefix.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"AUTH s3cret/pass\r\nSELECT 3\r\nGET LIMITS:" + KEY.encode() + b"\r\n")
        assert await reader.readline() == b"+OK\r\n"
        assert await reader.readline() == b"+OK\r\n"
        assert await reader.readline() == b"$1\r\n"
        assert await reader.readline() == b"2\r\n"
        writer.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(5)


def test_rediss_checks_the_servers_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production reaches Redis over TLS (``rediss://``): counts go through when the certificate is trusted
    (here through OpenSSL's ``SSL_CERT_FILE``, as an operator's CA bundle would be), and a server whose
    certificate nobody vouches for is refused before a command is sent."""
    cert, key = self_signed(tmp_path)
    tls_port = free_port()
    proc = start_redis(
        tls_port,
        tmp_path,
        "--tls-port",
        str(tls_port),
        "--port",
        "0",
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    url = f"rediss://127.0.0.1:{tls_port}/0"

    async def counts() -> list[int]:
        client = RedisCounters(url)
        try:
            return [await client.incr(KEY, 60) for _ in range(3)]
        finally:
            await client.aclose()

    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "no-such-bundle.pem"))
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(counts())
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert asyncio.run(counts()) == [1, 2, 3]
    finally:
        proc.terminate()
        proc.wait(5)


def test_a_redis_url_with_options_the_client_does_not_take_is_refused_at_start() -> None:
    for url in ("rediss://cache.internal:6380/0?ssl_cert_reqs=none", "redis://cache.internal/0#x", "redis://h/db"):
        with pytest.raises(ValidationError, match="REDIS_URL"):
            GatewaySettings(environment="test", redis_url=url)
    assert GatewaySettings(environment="test", redis_url="rediss://:pw@cache.internal:6380/2").redis_url
