"""Bootstrapping for the CLI until :meth:`crust.Service.bootstrap` exists.

API.md promises ``await svc.bootstrap()`` (bootstrap cache, hard-coded contacts, LAN). The
Service does not have it yet, so :func:`bootstrap` falls back to the hard-coded contacts only,
dialled concurrently; once the library grows the method, :func:`native_bootstrap` finds it and
this fallback is no longer used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

from crust import errors
from crust.identity import PeerId
from crust.service import Service


def native_bootstrap(svc: Service) -> Callable[[], Awaitable[PeerId]] | None:
    """The service's own ``bootstrap`` method, when the library provides one."""
    method = getattr(svc, "bootstrap", None)
    if method is None or not callable(method):
        return None
    return cast("Callable[[], Awaitable[PeerId]]", method)


async def bootstrap(svc: Service) -> PeerId:
    """Connect to every hard-coded contact at once; the first to succeed wins, the others are
    cancelled. Raises :class:`crust.errors.BootstrapFailed` carrying every attempt's error."""
    contacts = svc.config.hard_coded_contacts
    if not contacts:
        raise errors.BootstrapFailed("no bootstrap contacts (hard_coded_contacts / --contact)")
    attempts = [asyncio.create_task(svc.connect(c)) for c in contacts]
    failures: list[BaseException] = []
    try:
        for next_done in asyncio.as_completed(attempts):
            try:
                return await next_done
            except errors.CrustError as exc:
                failures.append(exc)
    finally:
        for task in attempts:
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
    raise errors.BootstrapFailed(
        f"none of {len(contacts)} bootstrap contact(s) could be reached", failures
    )
