"""Natural batching: work that arrives while the previous batches are out goes out together.

A ``Batcher`` is given one item at a time by many concurrent callers and hands them to ``send`` in lists.
While fewer than ``in_flight`` sends are running, an item goes out at once (alone, at low load); otherwise
it waits, and the next send to start takes everything waiting, up to ``size`` items. No timer: under load
the batches grow with the load, and a batch never waits for company that is not there.

``send`` answers one result per item, in order; a result that is an exception is raised to that item's
caller alone. When ``send`` itself raises, every caller of that batch gets ``failure(exc)``.
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
    ) -> None:
        if size < 1 or in_flight < 1:
            raise ValueError("a batch holds at least one item, and at least one batch is in flight")
        self._send = send
        self._failure = failure
        self.size = size
        self.in_flight = in_flight
        self._observe = observe
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
                results = await self._send([w.item for w in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(batch)} items sent, {len(results)} results")
            except BaseException as exc:
                if not isinstance(exc, asyncio.CancelledError):
                    log.warning("batch.failed", items=len(batch), error=repr(exc))
                for waiting in batch:
                    if not waiting.result.done():
                        waiting.result.set_exception(self._failure(exc))
                if not isinstance(exc, Exception):
                    raise  # cancelled (shutting down)
                continue
            for waiting, result in zip(batch, results, strict=True):
                if waiting.result.done():  # its caller went away
                    continue
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
