"""Dynamic batching: what arrives within `max_wait_ms` is grouped, up to `max_batch_size` inputs, into one forward pass
on one worker thread, and each answer goes back to its own request, in order."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

log = logging.getLogger("lmtune")


@dataclass
class _Entry:
    items: list[Any]
    key: Hashable  # only entries with the same key share a pass (a decoder's max_new_tokens)
    future: asyncio.Future = field(repr=False)


class ItemsError(Exception):
    """`submit`'s items from `start` on failed with `error` (in a pass of their own)."""

    def __init__(self, start: int, error: BaseException) -> None:
        super().__init__(f"items {start}..: {error}")
        self.start, self.error = start, error


class Batcher:
    """`await submit(items, key)` -> one answer per item. `predict(items, key)` runs on a single worker thread (also
    used by `call`), so the model and the task's state are never used by two passes at once."""

    def __init__(self, predict: Callable[[list[Any], Hashable], list[Any]], max_batch_size: int,
                 max_wait_ms: float) -> None:
        self.predict, self.max_batch_size, self.max_wait = predict, max(1, max_batch_size), max_wait_ms / 1000
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmtune-model")
        self.queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.batches = 0  # passes run (for /v1/info and the tests)
        self.largest = 0

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the model's thread (the only one that touches the model and the task's per-call state)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def submit(self, items: list[Any], key: Hashable = None) -> list[Any]:
        """Answers for `items` (split into passes of at most max_batch_size), in order; an ItemsError where a part
        failed on its own (its `start`: where that part begins in `items`)."""
        loop = asyncio.get_running_loop()
        starts = range(0, len(items), self.max_batch_size)
        entries = [_Entry(items[i:i + self.max_batch_size], key, loop.create_future()) for i in starts]
        for entry in entries:
            self.queue.put_nowait(entry)
        answers = []
        try:
            for start, entry in zip(starts, entries):
                try:
                    answers += await entry.future
                except Exception as err:  # noqa: BLE001 - said with where it happened
                    raise ItemsError(start, err) from err
        finally:  # a failed part (or a caller gone) leaves the request's other parts unrun
            for entry in entries:
                if not entry.future.done():
                    entry.future.cancel()
        return answers

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held: _Entry | None = None  # taken from the queue but not fitting the last pass: first in the next
        while True:
            first = held or await self.queue.get()
            if first.future.done():  # cancelled: its request has already been answered
                held = None
                continue
            held, group, size = None, [first], len(first.items)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch_size:
                try:
                    entry = self.queue.get_nowait() if deadline <= loop.time() else \
                        await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if entry.future.done():
                    continue
                if entry.key != first.key or size + len(entry.items) > self.max_batch_size:
                    held = entry
                    break
                group.append(entry)
                size += len(entry.items)
            await self._answer(group)
            await asyncio.sleep(0)  # the answered requests run first: one that failed cancels its other parts

    async def _answer(self, group: list[_Entry]) -> None:
        """One pass for the group; if it fails, each request alone, so one bad request fails only itself."""
        group = [entry for entry in group if not entry.future.done()]  # (parts of requests answered meanwhile)
        if not group:
            return
        items = [item for entry in group for item in entry.items]
        self.batches += 1
        self.largest = max(self.largest, len(items))
        try:
            answers = await self.call(self.predict, items, group[0].key)
        except Exception as err:  # noqa: BLE001 - goes to the request it belongs to
            if len(group) > 1:  # which one: each alone
                for entry in group:
                    await self._answer([entry])
            elif not group[0].future.done():
                group[0].future.set_exception(err)
            return
        at = 0
        for entry in group:
            if not entry.future.done():  # (a caller that went away)
                entry.future.set_result(answers[at:at + len(entry.items)])
            at += len(entry.items)
