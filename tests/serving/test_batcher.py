"""The replica's batcher: batches grow while the sampler is busy, results reach their callers,
a caller that gave up costs no work, a failing call fails only its own batch."""

from __future__ import annotations

import asyncio

import pytest

from starflow.serving.batcher import Batcher


class Sampler:
    """A slow `run` that records the batches it was given."""

    def __init__(self, seconds: float = 0.05, fail_on: int | None = None):
        self.seconds, self.fail_on, self.calls = seconds, fail_on, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise RuntimeError(f"item {self.fail_on}")
        return [10 * i for i in items]


def test_batches_grow_while_the_sampler_is_busy():
    async def scenario() -> tuple[list[int], Sampler]:
        sampler = Sampler()
        batcher = Batcher(sampler, max_batch_size=4, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the sampler is now busy with [0]
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 10)]
        return await asyncio.gather(first, *rest), sampler

    results, sampler = asyncio.run(scenario())
    assert results == [10 * i for i in range(10)]
    assert sampler.calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_an_idle_sampler_waits_for_a_burst_and_skips_callers_that_left():
    async def scenario() -> Sampler:
        sampler = Sampler()
        batcher = Batcher(sampler, max_batch_size=8, wait_s=0.05)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()  # gave up before the call
        assert await tasks[0] == 0 and await tasks[2] == 20
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        return sampler

    assert asyncio.run(scenario()).calls == [[0, 2]]


def test_a_failing_call_fails_only_its_batch():
    async def scenario() -> list[object]:
        batcher = Batcher(Sampler(fail_on=2), max_batch_size=2, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
        return await asyncio.gather(first, *rest, return_exceptions=True)

    zero, one, two, three = asyncio.run(scenario())
    assert (zero, three) == (0, 30)
    assert str(one) == str(two) == "item 2"
