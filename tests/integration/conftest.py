"""Shared fixtures of the loopback integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

import crust
from crust.service import Service
from crust.testing.watcher import EventWatcher

BOTH = ("tcp://127.0.0.1:0", "quic://127.0.0.1:0")


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    async with AsyncExitStack() as stack:
        watchers: list[EventWatcher] = []

        async def factory(**overrides: Any) -> tuple[Service, EventWatcher | None]:
            overrides.setdefault("listen", BOTH)
            identity = overrides.pop("identity", None)
            watch = overrides.pop("watch", True)
            svc = await stack.enter_async_context(
                Service(crust.Config.for_testing(**overrides), identity=identity)
            )
            if not watch:
                return svc, None
            w = EventWatcher(svc)
            watchers.append(w)
            return svc, w

        yield factory
        for w in watchers:
            await w.stop()
