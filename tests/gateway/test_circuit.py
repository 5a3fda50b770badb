"""The circuit breaker: every admitted call settles exactly once, as success, failure or neutral.

The first tests drive ``Circuit`` alone with an injected clock; the others drive the real ``Proxy`` against
a scripted upstream on a real socket (still with the circuit's clock injected), so that each way a call can
end (answered, refused, too slow, garbage, cancelled, client gone mid-body, own pool full) is seen to leave
the circuit in the right state. The real-process scenario is ``tests/e2e/test_circuit_recovery.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from common.upstream import BadResponse, ConnectFailed, PoolExhausted, UpstreamTimeout
from gateway.config import GatewaySettings
from gateway.proxy import Attempt, Circuit, CircuitOpen, Proxy
from gateway.routes import Route
from tests.conftest import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def opened(clock: Clock, threshold: int = 2, open_seconds: float = 10.0, probe_seconds: float = 3.0) -> Circuit:
    circuit = Circuit(threshold, open_seconds, probe_seconds, clock=clock, name="inventory")
    for _ in range(threshold):
        with pytest.raises(ConnectFailed), circuit.admit():
            raise ConnectFailed("refused")
    assert circuit.is_open
    return circuit


def half_open(clock: Clock) -> Circuit:
    circuit = opened(clock)
    clock.now += 10.0
    return circuit


# The circuit alone


def test_consecutive_failures_open_it_and_it_refuses_until_the_pause_is_over() -> None:
    clock = Clock()
    circuit = Circuit(3, 10.0, 3.0, clock=clock)
    for _ in range(2):
        with pytest.raises(UpstreamTimeout), circuit.admit():
            raise UpstreamTimeout("slow")
    with circuit.admit():
        pass  # a success in between: the count starts again
    for _ in range(2):
        with pytest.raises(ConnectFailed), circuit.admit():
            raise ConnectFailed("refused")
    assert not circuit.is_open
    with pytest.raises(ConnectFailed), circuit.admit():
        raise ConnectFailed("refused")
    assert circuit.is_open
    clock.now += 4.0
    with pytest.raises(CircuitOpen) as refused:
        circuit.admit()
    assert refused.value.retry_after == pytest.approx(6.0)


def test_half_open_admits_one_probe_and_its_success_closes_the_circuit() -> None:
    clock = Clock()
    circuit = half_open(clock)
    probe = circuit.admit()
    with pytest.raises(CircuitOpen) as refused:
        circuit.admit()  # one probe at a time
    assert refused.value.retry_after == pytest.approx(3.0)  # at the latest when the probe's deadline passes
    with probe:
        pass
    assert not circuit.is_open
    for _ in range(5):
        with circuit.admit():
            pass


def test_a_failed_probe_opens_the_circuit_for_another_pause() -> None:
    clock = Clock()
    circuit = half_open(clock)
    with pytest.raises(UpstreamTimeout), circuit.admit():
        raise UpstreamTimeout("still slow")
    assert circuit.is_open
    clock.now += 9.9
    with pytest.raises(CircuitOpen):
        circuit.admit()
    clock.now += 0.1
    with circuit.admit():
        pass
    assert not circuit.is_open


@pytest.mark.parametrize(
    "error", [asyncio.CancelledError, BadResponse, PoolExhausted, ConnectionResetError, KeyboardInterrupt]
)
def test_a_probe_that_ends_neutral_frees_the_slot_at_once(error: type[BaseException]) -> None:
    clock = Clock()
    circuit = half_open(clock)
    failures = circuit.failures
    with pytest.raises(error), circuit.admit():
        raise error()
    assert circuit.is_open  # nothing was learnt about the upstream
    assert circuit.failures == failures
    with circuit.admit():  # the very next request probes, without waiting for any deadline
        pass
    assert not circuit.is_open


def test_a_probe_never_settled_is_abandoned_at_its_deadline() -> None:
    clock = Clock()
    circuit = half_open(clock)
    abandoned = circuit.admit()
    abandoned.__enter__()  # and then its caller hangs for ever
    clock.now += 2.9
    with pytest.raises(CircuitOpen):
        circuit.admit()
    clock.now += 0.1
    second = circuit.admit()
    # The abandoned probe failing late neither frees the new probe's slot nor takes it over...
    abandoned.__exit__(UpstreamTimeout, UpstreamTimeout("late"), None)
    with pytest.raises(CircuitOpen):
        circuit.admit()
    # ...the new probe decides.
    with second:
        pass
    assert not circuit.is_open


def test_answers_that_are_broken_and_a_full_local_pool_never_open_the_circuit() -> None:
    circuit = Circuit(2, 10.0, 3.0, clock=Clock())
    for error in (BadResponse, PoolExhausted, BadResponse, PoolExhausted, asyncio.CancelledError):
        with pytest.raises(error), circuit.admit():
            raise error()
    assert not circuit.is_open
    assert circuit.failures == 0


# The real proxy against a scripted upstream


class Upstream:
    """An HTTP/1.1 upstream on a real socket whose behaviour the test sets: ``answer`` (the bytes to send,
    or None to stay silent until ``release`` is set). ``arrived`` is set when a request's head is in."""

    OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    def __init__(self) -> None:
        self.answer: bytes | None = self.OK
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                self.requests += 1
                self.arrived.set()
                answer = self.answer
                if answer is None:
                    await self.release.wait()
                    answer = self.OK
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def proxied(clock: Clock, **settings: Any) -> AsyncIterator[tuple[Upstream, Proxy]]:
    upstream = Upstream()
    listener = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    values: dict[str, Any] = {
        "environment": "test",
        "inventory_url": url,
        "circuit_failure_threshold": 2,
        "circuit_open_seconds": 10.0,
    } | settings
    proxy = Proxy(GatewaySettings(**values))
    proxy.circuits["inventory"].clock = clock
    await proxy.start()
    try:
        yield upstream, proxy
    finally:
        await proxy.close()
        listener.close()


ROUTE = Route("/api/v1/products", "inventory")


def scope(method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": "/api/v1/products",
        "raw_path": b"/api/v1/products",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "state": {"request_id": "r-1"},
    }


def body_then(messages: list[dict[str, Any]]) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that sends nothing more
        raise AssertionError("unreachable")

    return receive


WHOLE = [{"type": "http.request", "body": b"", "more_body": False}]


async def forward(proxy: Proxy, messages: list[dict[str, Any]] = WHOLE, method: str = "GET") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await proxy.forward(scope(method), body_then(messages), send, ROUTE, "127.0.0.1")
    return sent


def status_of(sent: list[dict[str, Any]]) -> int | None:
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), None)


def header(sent: list[dict[str, Any]], name: bytes) -> bytes | None:
    start = next(m for m in sent if m["type"] == "http.response.start")
    return next((v for k, v in start["headers"] if k == name), None)


async def test_a_client_gone_mid_body_while_half_open_is_never_admitted() -> None:
    clock = Clock()
    async with proxied(clock) as (upstream, proxy):
        circuit = opened_proxy_circuit(proxy, clock)
        partial = [
            {"type": "http.request", "body": b'{"sku": "A', "more_body": True},
            {"type": "http.disconnect"},
        ]
        assert await forward(proxy, partial, "POST") == []  # nothing to answer: the client is gone
        assert upstream.requests == 0
        assert not circuit.probing
        assert status_of(await forward(proxy)) == 200  # the next request is the probe, and it closes it
        assert not circuit.is_open


async def test_a_probe_cancelled_while_it_waits_frees_the_slot() -> None:
    clock = Clock()
    async with proxied(clock) as (upstream, proxy):
        circuit = opened_proxy_circuit(proxy, clock)
        upstream.answer = None  # the probe's answer never comes
        probe = asyncio.create_task(forward(proxy))
        await upstream.arrived.wait()
        assert circuit.probing
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert not circuit.probing
        upstream.answer = Upstream.OK
        assert status_of(await forward(proxy)) == 200
        assert not circuit.is_open


async def test_a_probe_answered_with_garbage_is_502_and_frees_the_slot() -> None:
    clock = Clock()
    async with proxied(clock) as (upstream, proxy):
        circuit = opened_proxy_circuit(proxy, clock)
        upstream.answer = b"NOT HTTP\r\n\r\n"
        sent = await forward(proxy)
        assert status_of(sent) == 502
        assert header(sent, b"retry-after") is None  # not announced as passing
        assert circuit.is_open
        assert not circuit.probing
        upstream.answer = Upstream.OK
        assert status_of(await forward(proxy)) == 200
        assert not circuit.is_open


async def test_a_slow_probe_is_504_at_its_deadline_and_the_circuit_stays_open() -> None:
    clock = Clock()
    async with proxied(clock, upstream_deadline_seconds=0.3) as (upstream, proxy):
        circuit = opened_proxy_circuit(proxy, clock)
        upstream.answer = None
        sent = await forward(proxy)  # the real deadline ends it
        assert status_of(sent) == 504
        assert circuit.is_open
        assert not circuit.probing
        refused = await forward(proxy)  # opened again for a whole pause, counted from the probe's failure
        assert status_of(refused) == 503
        assert header(refused, b"retry-after") == b"10"


async def test_the_overall_deadline_covers_connect_send_and_first_byte() -> None:
    clock = Clock()
    async with proxied(clock, upstream_deadline_seconds=0.3, upstream_timeout_seconds=30) as (upstream, proxy):
        upstream.answer = None  # silent: only the deadline can end the wait (the read timeout is 30 s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = await forward(proxy)
        assert status_of(sent) == 504
        assert loop.time() - started < 2.0


async def test_the_gateways_own_full_pool_is_503_and_never_opens_the_circuit() -> None:
    clock = Clock()
    async with proxied(
        clock, upstream_pool_size=1, upstream_connect_timeout_seconds=0.2, circuit_failure_threshold=1
    ) as (upstream, proxy):
        upstream.answer = None
        holder = asyncio.create_task(forward(proxy))  # takes the only connection and keeps it
        await upstream.arrived.wait()
        sent = await forward(proxy)
        assert status_of(sent) == 503
        assert header(sent, b"retry-after") == b"1"
        assert not proxy.circuits["inventory"].is_open
        upstream.release.set()
        assert status_of(await holder) == 200
        assert status_of(await forward(proxy)) == 200


async def test_a_refused_connection_is_503_with_retry_after_and_counts() -> None:
    clock = Clock()
    settings = {"inventory_url": f"http://127.0.0.1:{free_port()}"}
    async with proxied(clock, **settings) as (_upstream, proxy):
        for _ in range(2):
            sent = await forward(proxy)
            assert status_of(sent) == 503
            assert header(sent, b"retry-after") == b"1"
        assert proxy.circuits["inventory"].is_open
        refused = await forward(proxy)
        assert status_of(refused) == 503
        assert header(refused, b"retry-after") == b"10"


async def test_an_upstreams_own_503_is_passed_on_and_never_counts() -> None:
    """A service that answers 503 itself (auth's hashing-busy during a login storm) answered: its problem and
    its Retry-After reach the client as they are, and however many there are, the circuit stays closed."""
    clock = Clock()
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 3\r\n"
        b'content-length: 28\r\n\r\n{"type":"x","retry_after":3}'
    )
    async with proxied(clock, circuit_failure_threshold=1) as (upstream, proxy):
        upstream.answer = busy
        for _ in range(5):
            sent = await forward(proxy)
            assert status_of(sent) == 503
            assert header(sent, b"retry-after") == b"3"
            assert b"".join(m.get("body", b"") for m in sent) == b'{"type":"x","retry_after":3}'
        assert not proxy.circuits["inventory"].is_open
        assert upstream.requests == 5
        upstream.answer = upstream.OK
        assert status_of(await forward(proxy)) == 200


def opened_proxy_circuit(proxy: Proxy, clock: Clock) -> Circuit:
    """The proxy's circuit opened by two failures, then its pause over: the next request is the probe."""
    circuit = proxy.circuits["inventory"]
    for _ in range(circuit.threshold):
        with pytest.raises(ConnectFailed), circuit.admit():
            raise ConnectFailed("as if the upstream had been down")
    clock.now += circuit.open_seconds
    return circuit


async def test_every_admitted_call_is_settled_exactly_once_whatever_its_end(monkeypatch: pytest.MonkeyPatch) -> None:
    settled: list[type[BaseException] | None] = []
    settle = Attempt.__exit__

    def counted(attempt: Attempt, error: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        settled.append(error)
        settle(attempt, error, exc, tb)

    monkeypatch.setattr(Attempt, "__exit__", counted)
    clock = Clock()
    async with proxied(
        clock, upstream_deadline_seconds=0.3, upstream_pool_size=1, upstream_connect_timeout_seconds=0.2
    ) as (upstream, proxy):
        assert status_of(await forward(proxy)) == 200
        upstream.answer = b"NOT HTTP\r\n\r\n"
        assert status_of(await forward(proxy)) == 502
        upstream.answer = None
        assert status_of(await forward(proxy)) == 504  # the deadline
        upstream.arrived.clear()
        held = asyncio.create_task(forward(proxy))
        await upstream.arrived.wait()
        assert status_of(await forward(proxy)) == 503  # the only pooled connection is held
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        gone = [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
        assert await forward(proxy, gone, "POST") == []  # never admitted: nothing to settle
        assert settled == [None, BadResponse, UpstreamTimeout, PoolExhausted, asyncio.CancelledError]
