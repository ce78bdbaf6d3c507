"""A fast, bounded-by-backpressure event queue feeding ``Service.events()``."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from crust.events import Event


class EventQueue:
    """FIFO of events with one async consumer side.

    Producers never block: when more than ``high`` events wait, ``on_pause`` is called (the
    service stops reading from the network) and ``on_resume`` once the consumer drained the
    queue below half of that.  Getting an already-queued event costs no suspension.
    """

    def __init__(
        self,
        high: int,
        on_pause: Callable[[], None] = lambda: None,
        on_resume: Callable[[], None] = lambda: None,
    ) -> None:
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._high = high
        self._low = high // 2
        self._paused = False
        self._closed = False
        self._on_pause = on_pause
        self._on_resume = on_resume

    def __len__(self) -> int:
        return len(self._items)

    @property
    def paused(self) -> bool:
        return self._paused

    def put(self, event: Event) -> None:
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if not self._paused and len(self._items) > self._high:
            self._paused = True
            self._on_pause()

    def close(self) -> None:
        """No more events will come: consumers finish after draining what is queued."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event:
        """The next event; raises StopAsyncIteration once closed and drained."""
        while not self._items:
            if self._closed:
                raise StopAsyncIteration
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
        item = self._items.popleft()
        if self._paused and len(self._items) <= self._low:
            self._paused = False
            self._on_resume()
        return item

    def get_nowait(self) -> Event | None:
        if not self._items:
            return None
        item = self._items.popleft()
        if self._paused and len(self._items) <= self._low:
            self._paused = False
            self._on_resume()
        return item


class EventStream:
    """``async for event in svc.events()``: yields queued events without suspending."""

    __slots__ = ("_queue",)

    def __init__(self, queue: EventQueue) -> None:
        self._queue = queue

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        item = self._queue.get_nowait()
        if item is not None:
            return item
        return await self._queue.get()
