"""Wait for a service's events in tests, without sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from crust.events import Event, MessageReceived
from crust.service import Service

E = TypeVar("E", bound=Event)
TIMEOUT = 10.0


class EventWatcher:
    """Collects a service's events so a test can wait for one (never sleeps)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.seen: list[Event] = []
        self._cond = asyncio.Condition()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for ev in self.svc.events():
            async with self._cond:
                self.seen.append(ev)
                self._cond.notify_all()

    async def wait(
        self, kind: type[E], pred: Callable[[E], bool] = lambda e: True, timeout: float = TIMEOUT
    ) -> E:
        async with asyncio.timeout(timeout), self._cond:
            while True:
                for ev in self.seen:
                    if isinstance(ev, kind) and pred(ev):
                        return ev
                await self._cond.wait()

    async def count(self, kind: type[E], n: int, timeout: float = TIMEOUT) -> list[E]:
        async with asyncio.timeout(timeout), self._cond:
            while True:
                got = [e for e in self.seen if isinstance(e, kind)]
                if len(got) >= n:
                    return got
                await self._cond.wait()

    async def messages(self, n: int, timeout: float = TIMEOUT) -> list[MessageReceived]:
        return await self.count(MessageReceived, n, timeout)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.seen if isinstance(e, kind)]

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
