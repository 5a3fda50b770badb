"""Natural batching: work that arrives while the previous batches are out goes out together.

A ``Batcher`` is given one item at a time by many concurrent callers and hands them to ``send`` in lists.
While fewer than ``in_flight`` sends are running, an item goes out at once (alone, at low load); otherwise
it waits, and the next send to start takes everything waiting, up to ``size`` items. No timer: under load
the batches grow with the load, and a batch never waits for company that is not there.

``send`` answers one result per item, in order; a result that is an exception is raised to that item's
caller alone. When ``send`` itself raises, every caller of that batch gets ``failure(exc)`` — unless
``isolate`` is set (for sends that are all or nothing and safe to repeat, such as one SQL statement): then
a failed batch is sent again one item at a time, so that an item that makes the batch fail (a poison
pill) fails alone, not everybody who happened to arrive with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("comptoir.batching")

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class _Waiting(Generic[In, Out]):
    item: In
    result: asyncio.Future[Out]


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        send: Callable[[list[In]], Awaitable[Sequence[Out | Exception]]],
        *,
        failure: Callable[[BaseException], Exception],
        size: int = 100,
        in_flight: int = 1,
        observe: Callable[[int], None] | None = None,
        isolate: bool = False,
    ) -> None:
        if size < 1 or in_flight < 1:
            raise ValueError("a batch holds at least one item, and at least one batch is in flight")
        self._send = send
        self._failure = failure
        self.size = size
        self.in_flight = in_flight
        self._observe = observe
        self._isolate = isolate
        self._waiting: deque[_Waiting[In, Out]] = deque()
        self._flights: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """How many items wait for a batch to go out."""
        return len(self._waiting)

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        waiting: _Waiting[In, Out] = _Waiting(item, loop.create_future())
        self._waiting.append(waiting)
        if len(self._flights) < self.in_flight:
            flight = loop.create_task(self._fly())
            self._flights.add(flight)
            flight.add_done_callback(self._flights.discard)
        return await waiting.result

    async def _fly(self) -> None:
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(self.size, len(self._waiting)))]
            if self._observe is not None:
                self._observe(len(batch))
            try:
                results = await self._send_checked([w.item for w in batch])
            except BaseException as exc:
                if isinstance(exc, Exception) and self._isolate and len(batch) > 1:
                    log.warning("batch.failed.isolating", items=len(batch), error=repr(exc))
                    for waiting in batch:
                        await self._send_alone(waiting)
                    continue
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("batch.failed", items=len(batch), error=repr(exc))
                for waiting in batch:
                    if not waiting.result.done():
                        waiting.result.set_exception(self._failure(exc))
                if not isinstance(exc, Exception):
                    raise  # cancelled (shutting down)
                continue
            for waiting, result in zip(batch, results, strict=True):
                self._settle(waiting, result)

    async def _send_checked(self, items: list[In]) -> Sequence[Out | Exception]:
        results = await self._send(items)
        if len(results) != len(items):
            raise RuntimeError(f"{len(items)} items sent, {len(results)} results")
        return results

    async def _send_alone(self, waiting: _Waiting[In, Out]) -> None:
        if waiting.result.done():  # its caller went away
            return
        try:
            (result,) = await self._send_checked([waiting.item])
        except Exception as exc:
            log.warning("batch.item_failed", error=repr(exc))
            result = self._failure(exc)
        self._settle(waiting, result)

    @staticmethod
    def _settle(waiting: _Waiting[In, Out], result: Out | Exception) -> None:
        if waiting.result.done():  # its caller went away
            return
        if isinstance(result, Exception):
            waiting.result.set_exception(result)
        else:
            waiting.result.set_result(result)

    async def close(self) -> None:
        """Stop the batches in flight; every caller still waiting gets ``failure``."""
        for flight in list(self._flights):
            flight.cancel()
        await asyncio.gather(*self._flights, return_exceptions=True)
        stopped = asyncio.CancelledError("shutting down")
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.result.done():
                waiting.result.set_exception(self._failure(stopped))
