"""Natural batching: work that arrives while the previous batches are out goes out together.

A ``Batcher`` is given one item at a time by many concurrent callers and hands them to ``send`` in lists.
While fewer than ``in_flight`` sends are running, an item goes out at once (alone, at low load); otherwise
it waits, and the next send to start takes everything waiting, up to ``size`` items (and up to
``max_weight`` by ``weigh``, but always at least one). No timer: under load the batches grow with the
load, and a batch never waits for company that is not there. An item whose caller went away before its
batch left is not sent.

``send`` answers one result per item, in order; a result that is an exception is raised to that item's
caller alone. When ``send`` itself raises, every caller of that batch gets ``failure(exc)`` — unless
``isolate(exc)`` says the failure was caused by the batch's contents (say, a statement the database
refused for one row's data, which is all or nothing and so changed nothing): then the batch is sent again
one item at a time, so that the item that made it fail (a poison pill) fails alone, not everybody who
happened to arrive with it. ``isolate`` must not accept failures after which the batch may have taken
effect (a lost answer): sending those again could act twice.
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


def _never(_exc: Exception) -> bool:
    return False


class Batcher(Generic[In, Out]):
    def __init__(
        self,
        send: Callable[[list[In]], Awaitable[Sequence[Out | Exception]]],
        *,
        failure: Callable[[BaseException], Exception],
        size: int = 100,
        in_flight: int = 1,
        weigh: Callable[[In], int] | None = None,
        max_weight: int | None = None,
        observe: Callable[[int], None] | None = None,
        isolate: Callable[[Exception], bool] = _never,
    ) -> None:
        if size < 1 or in_flight < 1:
            raise ValueError("a batch holds at least one item, and at least one batch is in flight")
        self._send = send
        self._failure = failure
        self.size = size
        self.in_flight = in_flight
        self._weigh = weigh
        self._max_weight = max_weight
        self._observe = observe
        self._isolate = isolate
        self._waiting: deque[_Waiting[In, Out]] = deque()
        self._flights: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """How many items wait for a batch to go out."""
        return len(self._waiting)

    async def submit(self, item: In) -> Out:
        if self._closed:
            raise self._failure(asyncio.CancelledError("closed"))
        loop = asyncio.get_running_loop()
        waiting: _Waiting[In, Out] = _Waiting(item, loop.create_future())
        self._waiting.append(waiting)
        if len(self._flights) < self.in_flight:
            self._flights.add(loop.create_task(self._fly()))
        return await waiting.result

    def _next_batch(self) -> list[_Waiting[In, Out]]:
        batch: list[_Waiting[In, Out]] = []
        weight = 0
        while self._waiting and len(batch) < self.size:
            waiting = self._waiting[0]
            if waiting.result.done():  # its caller went away: not sent
                self._waiting.popleft()
                continue
            if self._weigh is not None and self._max_weight is not None:
                weight += self._weigh(waiting.item)
                if batch and weight > self._max_weight:
                    break
            batch.append(self._waiting.popleft())
        return batch

    async def _fly(self) -> None:
        try:
            while self._waiting:
                batch = self._next_batch()
                if batch:
                    await self._carry(batch)
        finally:
            # Here, not in a done-callback: between the loop's last look at the queue and this line there is
            # no await, so no submit can queue an item that no flight will carry.
            task = asyncio.current_task()
            if task is not None:
                self._flights.discard(task)

    async def _carry(self, batch: list[_Waiting[In, Out]]) -> None:
        if self._observe is not None:
            self._observe(len(batch))
        try:
            try:
                results = await self._send_checked([w.item for w in batch])
            except Exception as exc:
                if len(batch) > 1 and self._isolate(exc):
                    log.warning("batch.failed.isolating", items=len(batch), error=repr(exc))
                    for waiting in batch:
                        await self._send_alone(waiting)
                    return
                log.warning("batch.failed", items=len(batch), error=repr(exc))
                for waiting in batch:
                    self._settle(waiting, self._failure(exc))
                return
            for waiting, result in zip(batch, results, strict=True):
                self._settle(waiting, result)
        except BaseException as exc:  # cancelled (closing): nobody in this batch is left waiting
            for waiting in batch:
                self._settle(waiting, self._failure(exc))
            raise

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
        if waiting.result.done():  # its caller went away, or it is settled already
            return
        if isinstance(result, Exception):
            waiting.result.set_exception(result)
        else:
            waiting.result.set_result(result)

    async def close(self) -> None:
        """Refuse new items, stop the batches in flight; every caller still waiting gets ``failure``."""
        self._closed = True
        for flight in list(self._flights):
            flight.cancel()
        await asyncio.gather(*self._flights, return_exceptions=True)
        stopped = asyncio.CancelledError("closed")
        while self._waiting:
            self._settle(self._waiting.popleft(), self._failure(stopped))
