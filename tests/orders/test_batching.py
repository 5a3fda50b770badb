"""Natural batching: what arrives while a batch is out goes out together, and each caller gets its own result."""

from __future__ import annotations

import asyncio

import pytest

from services.orders.batching import Batcher


class Refused(Exception):
    pass


class Sender:
    """Records each batch; a batch is answered when the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.out = asyncio.Event()
        self.fail_batch: int | None = None

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(items)
        gate = asyncio.Event()
        self.gates.append(gate)
        self.out.set()
        await gate.wait()
        if self.fail_batch == len(self.batches) - 1:
            raise ConnectionError("the other side is down")
        return [Refused(str(i)) if i < 0 else i * 10 for i in items]

    async def wait_out(self, count: int) -> None:
        while len(self.batches) < count:
            self.out.clear()
            await self.out.wait()


def batcher(sender: Sender, **kwargs: int) -> Batcher[int, int]:
    return Batcher(sender, failure=lambda exc: Refused(f"batch failed: {exc!r}"), **kwargs)


async def test_at_low_load_an_item_goes_out_at_once_alone() -> None:
    sender = Sender()
    batches = batcher(sender)
    task = asyncio.create_task(batches.submit(4))
    await sender.wait_out(1)
    sender.gates[0].set()
    assert await task == 40
    assert sender.batches == [[4]]


async def test_what_arrives_while_a_batch_is_out_goes_together_in_order_up_to_the_size() -> None:
    sender = Sender()
    batches = batcher(sender, size=3)
    first = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    later = [asyncio.create_task(batches.submit(n)) for n in range(2, 9)]
    await asyncio.sleep(0)
    assert batches.waiting == 7
    sender.gates[0].set()
    for expected in (2, 3, 4):
        await sender.wait_out(expected)
        sender.gates[expected - 1].set()
    assert await asyncio.gather(first, *later) == [10, 20, 30, 40, 50, 60, 70, 80]
    assert sender.batches == [[1], [2, 3, 4], [5, 6, 7], [8]]


async def test_an_items_own_error_reaches_only_its_caller() -> None:
    sender = Sender()
    batches = batcher(sender)
    first = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    bad, good = asyncio.create_task(batches.submit(-2)), asyncio.create_task(batches.submit(3))
    sender.gates[0].set()
    await sender.wait_out(2)
    sender.gates[1].set()
    assert await first == 10
    assert await good == 30
    with pytest.raises(Refused, match="-2"):
        await bad


async def test_a_failed_send_fails_every_caller_of_that_batch_and_only_those() -> None:
    sender = Sender()
    sender.fail_batch = 1
    batches = batcher(sender)
    first = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    doomed = [asyncio.create_task(batches.submit(n)) for n in (2, 3)]
    await asyncio.sleep(0)
    sender.gates[0].set()
    await sender.wait_out(2)
    after = asyncio.create_task(batches.submit(4))
    sender.gates[1].set()
    await sender.wait_out(3)
    sender.gates[2].set()
    assert await first == 10
    for task in doomed:
        with pytest.raises(Refused, match="the other side is down"):
            await task
    assert await after == 40
    assert sender.batches == [[1], [2, 3], [4]]


async def test_several_batches_may_be_in_flight() -> None:
    sender = Sender()
    batches = batcher(sender, in_flight=2)
    one = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    two = asyncio.create_task(batches.submit(2))
    await sender.wait_out(2)  # out while the first is still out
    three = asyncio.create_task(batches.submit(3))
    await asyncio.sleep(0)
    assert batches.waiting == 1
    sender.gates[1].set()
    assert await two == 20
    await sender.wait_out(3)
    sender.gates[0].set()
    sender.gates[2].set()
    assert await asyncio.gather(one, three) == [10, 30]


async def test_closing_fails_what_is_out_and_what_waits() -> None:
    sender = Sender()
    batches = batcher(sender)
    out = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    waits = asyncio.create_task(batches.submit(2))
    await asyncio.sleep(0)
    await batches.close()
    for task in (out, waits):
        with pytest.raises(Refused, match="batch failed"):
            await task


def test_sizes_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Batcher(Sender(), failure=Refused, size=0)
    with pytest.raises(ValueError, match="at least one"):
        Batcher(Sender(), failure=Refused, in_flight=0)


async def test_with_isolation_a_poison_item_fails_alone() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int | Exception]:
        sent.append(items)
        await asyncio.sleep(0)
        if 13 in items:
            raise ValueError("a statement that one bad row makes fail as a whole")
        return [i * 10 for i in items]

    batches: Batcher[int, int] = Batcher(
        send, failure=lambda exc: Refused(repr(exc)), isolate=lambda exc: isinstance(exc, ValueError)
    )
    results = await asyncio.gather(*(batches.submit(n) for n in (1, 12, 13, 14)), return_exceptions=True)
    assert results[:2] == [10, 120]
    assert isinstance(results[2], Refused)
    assert results[3] == 140
    assert sent == [[1, 12, 13, 14], [1], [12], [13], [14]]


async def test_a_failure_isolate_does_not_accept_is_not_sent_again() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int | Exception]:
        sent.append(items)
        await asyncio.sleep(0)
        raise ConnectionError("the answer was lost: the batch may have taken effect")

    batches: Batcher[int, int] = Batcher(
        send, failure=lambda exc: Refused(repr(exc)), isolate=lambda exc: isinstance(exc, ValueError)
    )
    results = await asyncio.gather(*(batches.submit(n) for n in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, Refused) for r in results)
    assert sent == [[1, 2, 3]]


async def test_one_after_the_other_each_item_goes_out() -> None:
    """A caller woken by its result submits again at once, while its flight is finishing: still carried."""
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int | Exception]:
        sent.append(items)
        await asyncio.sleep(0)
        return list(items)

    for in_flight in (1, 2):
        batches: Batcher[int, int] = Batcher(send, failure=Refused, in_flight=in_flight)
        for n in range(5):
            assert await asyncio.wait_for(batches.submit(n), 5) == n
    assert sent == [[n] for n in range(5)] * 2


async def test_closing_while_isolating_leaves_nobody_waiting() -> None:
    gate, isolating = asyncio.Event(), asyncio.Event()

    async def send(items: list[int]) -> list[int | Exception]:
        if items == [0]:
            await gate.wait()
            return [0]
        if len(items) > 1:
            raise ValueError("refused")
        isolating.set()
        await asyncio.Event().wait()  # a lone re-send that never answers
        return list(items)

    batches: Batcher[int, int] = Batcher(send, failure=lambda exc: Refused(repr(exc)), isolate=lambda _exc: True)
    first = asyncio.create_task(batches.submit(0))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(batches.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0)
    gate.set()  # the three go out together, are refused, and are re-sent one by one: the first never answers
    await isolating.wait()
    assert await first == 0
    await batches.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, Refused) for r in results), results
    with pytest.raises(Refused):
        await batches.submit(4)  # closed


async def test_a_caller_that_goes_away_is_not_sent_and_does_not_disturb_the_others() -> None:
    sender = Sender()
    batches = batcher(sender)
    first = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    gone, stays = asyncio.create_task(batches.submit(2)), asyncio.create_task(batches.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    sender.gates[0].set()
    await sender.wait_out(2)
    sender.gates[1].set()
    assert await asyncio.gather(first, stays) == [10, 30]
    assert sender.batches == [[1], [3]]


async def test_a_batch_stops_at_its_weight_but_always_carries_one() -> None:
    sender = Sender()
    batches = Batcher(sender, failure=Refused, size=10, weigh=lambda n: n, max_weight=10)
    first = asyncio.create_task(batches.submit(1))
    await sender.wait_out(1)
    later = [asyncio.create_task(batches.submit(n)) for n in (4, 5, 2, 30, 1)]
    await asyncio.sleep(0)
    for n in range(4):
        sender.gates[n].set()
        await sender.wait_out(n + 2)
    sender.gates[4].set()
    assert await asyncio.gather(first, *later) == [10, 40, 50, 20, 300, 10]
    assert sender.batches == [[1], [4, 5], [2], [30], [1]]
