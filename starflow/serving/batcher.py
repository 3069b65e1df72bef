"""`Batcher`: requests gathered into one sampler call while the previous call runs.

Ray Serve's `@serve.batch` closes a batch every `batch_wait_timeout_s` whether or not the
handler is free, so batches then queue behind a busy sampler instead of growing: measured with
`benchmarks/serve_load.py` (digits 16x16, 2 threads, concurrency 32) its batches held 3.3
requests on average and the server reached 0.78x the in-process batch-8 throughput. Here the
next batch is cut when the sampler frees up, from everything that arrived meanwhile (up to
`max_batch_size`); an idle sampler first waits `wait_s` for company (0 by default). One call runs at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """`await submit(item)` -> its result from `run(items)`, one call at a time, in batches."""

    def __init__(
        self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_batch_size: int, wait_s: float
    ):
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.pending: list[tuple[Item, asyncio.Future[Result]]] = []
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._serve())
        return await future

    async def _serve(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            if len(self.pending) < self.max_batch_size and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)  # an idle sampler: let a burst's others arrive
            while self.pending:
                batch = [(i, f) for i, f in self.pending[: self.max_batch_size] if not f.cancelled()]
                del self.pending[: self.max_batch_size]
                if batch:
                    await self._call(batch)

    async def _call(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self.run([item for item, _ in batch])
        except Exception as err:  # every caller of the batch sees the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
