"""Finding the network: :meth:`crust.Service.bootstrap` and the bootstrap cache it feeds.

A :class:`Bootstrapper` belongs to one service. It

- loads the bootstrap cache (``Config.bootstrap_cache``; ``None`` disables it) when the
  service starts and writes it back when the service closes;
- records every *direct outbound* connection the service keeps (the remote proved it can be
  dialled) as the newest cache entry; inbound, punched or relayed connections prove nothing
  about reachability and are not recorded;
- bootstraps: dials the cached nodes (newest first, each entry's contacts pinned to its peer
  id and raced), then the hard-coded contacts, then peers found by LAN discovery,
  :data:`PARALLELISM` at a time; the first
  node reached wins, the attempts still running are cancelled, and the connection stays up.
  Failures count against cache entries (an entry that fails ``max_failures`` times in a row
  is dropped) — except failures that may be our own fault (time-outs, unreachable networks)
  in a round where nothing at all was reached: an offline laptop must not forget its cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crust import errors
from crust.aio.cachefile import CacheStore
from crust.config import Config
from crust.events import BootstrapConnected, Event
from crust.events import BootstrapFailed as BootstrapFailedEvent
from crust.identity import PeerId

log = logging.getLogger("crust.bootstrap")

PARALLELISM = 8
"""Bootstrap attempts running at the same time."""
CLOSE_FLUSH_TIMEOUT = 10.0
MAX_MESSAGE_ATTEMPTS = 8
"""Attempts spelled out in a BootstrapFailed message (``.attempts`` has all of them)."""

Connect = Callable[[str | PeerId | Sequence[str]], Awaitable[PeerId]]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One thing to try: a cached node (all its contacts, pinned) or a hard-coded contact."""

    contacts: tuple[str, ...]
    cached: PeerId | None = None
    """The cache entry this attempt comes from."""

    @property
    def label(self) -> str:
        return ",".join(self.contacts)


class Bootstrapper:
    """The bootstrap logic of one service (see the module documentation)."""

    def __init__(
        self,
        config: Config,
        peer_id: PeerId,
        *,
        connect: Connect,
        emit: Callable[[Event], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        parallelism: int = PARALLELISM,
    ) -> None:
        self.config = config
        self.peer_id = peer_id
        self._connect = connect
        self._emit = emit
        self._spawn = spawn
        self.parallelism = parallelism
        self.store: CacheStore | None = None
        if config.bootstrap_cache is not None:
            self.store = CacheStore(
                config.bootstrap_cache,
                config.network_name,
                max_entries=config.bootstrap_cache_size,
            )
        self._flush_scheduled = False
        self.lan_peers: Callable[[], Mapping[PeerId, Sequence[str]]] = dict
        """Peers found by LAN discovery (pinned contacts): the last source of a bootstrap."""

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        if self.store is not None:
            await self.store.load()

    async def aclose(self) -> None:
        """Write what is still pending (bounded in time)."""
        if self.store is not None:
            try:
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    await self.store.flush()
            except TimeoutError:
                log.warning("bootstrap cache %s: not saved (took too long)", self.store.path)

    # ------------------------------------------------------------------ cache feed

    def connection_kept(self, peer: PeerId, remote: str, path: str, outbound: bool) -> None:
        """The service keeps a connection to ``peer``: a direct outbound one becomes the
        newest cache entry."""
        if self.store is None or not outbound or path != "direct":
            return
        self.store.reached(peer, remote)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._spawn(self._flush_soon())

    async def _flush_soon(self) -> None:
        try:
            while self.store is not None and self.store.dirty:
                if not await self.store.flush():
                    return  # logged; retried by the next bootstrap or at close
        finally:
            self._flush_scheduled = False

    # ------------------------------------------------------------------ bootstrap

    def attempts(self) -> list[Attempt]:
        """What a bootstrap tries, in order: cached nodes newest first, then the hard-coded
        contacts (each once), then peers found on the LAN."""
        out: list[Attempt] = []
        seen: set[str] = set()
        if self.store is not None:
            for entry in self.store.entries():
                if entry.peer == self.peer_id:
                    continue
                attempt = Attempt(tuple(entry.pinned_contacts()), entry.peer)
                out.append(attempt)
                seen.update(attempt.contacts)
        for contact in self.config.hard_coded_contacts:
            if contact not in seen:
                seen.add(contact)
                out.append(Attempt((contact,)))
        cached = {a.cached for a in out}
        for peer, contacts in self.lan_peers().items():
            fresh = tuple(c for c in contacts if c not in seen)
            if peer != self.peer_id and peer not in cached and fresh:
                seen.update(fresh)
                out.append(Attempt(fresh))
        return out

    async def run(self) -> PeerId:
        """Reach the first node; emit and return, or emit and raise BootstrapFailed."""
        if self.store is not None:
            await self.store.refresh()  # what other services saved since we started
        attempts = self.attempts()
        try:
            peer = await self._race(attempts)
        except errors.BootstrapFailed as exc:
            await self._flush()
            self._emit(BootstrapFailedEvent(exc))
            raise
        await self._flush()
        self._emit(BootstrapConnected(peer))
        return peer

    async def _flush(self) -> None:
        if self.store is not None:
            await self.store.flush()  # also waits for a save in progress

    async def _race(self, attempts: list[Attempt]) -> PeerId:
        if not attempts:
            raise errors.BootstrapFailed(
                "nothing to bootstrap from: the bootstrap cache is empty and there are no "
                "hard_coded_contacts"
            )
        queue = list(reversed(attempts))
        running: dict[asyncio.Task[PeerId], Attempt] = {}
        failures: list[tuple[Attempt, BaseException]] = []
        winner: PeerId | None = None
        try:
            while queue or running:
                while queue and len(running) < self.parallelism:
                    attempt = queue.pop()
                    target = attempt.contacts[0] if len(attempt.contacts) == 1 else attempt.contacts
                    running[asyncio.ensure_future(self._connect(target))] = attempt
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    attempt = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        winner = task.result()
                        break
                    if not isinstance(exc, errors.CrustError):
                        raise exc
                    failures.append((attempt, exc))
                if winner is not None:
                    break
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
        self._count_failures(failures, reached=winner is not None)
        if winner is not None:
            return winner
        raise errors.BootstrapFailed(
            _failure_message(len(attempts), failures),
            [(a.label, e) for a, e in failures],
        )

    def _count_failures(
        self, failures: list[tuple[Attempt, BaseException]], *, reached: bool
    ) -> None:
        if self.store is None:
            return
        for attempt, exc in failures:
            if attempt.cached is not None and (reached or node_is_gone(exc)):
                self.store.failed(attempt.cached)


def node_is_gone(exc: BaseException) -> bool:
    """The failure proves that no usable node answers there (our network works): the port is
    closed, or something answered that is not the cached node of our network. Time-outs and
    unreachable networks prove nothing (we may be offline)."""
    if isinstance(exc, errors.ConnectError) and exc.errors:
        return all(node_is_gone(e) for e in exc.errors)
    if isinstance(exc, TimeoutError):
        return False
    if isinstance(exc, errors.HandshakeError | errors.Refused | errors.Blacklisted):
        return True
    if isinstance(exc, errors.ConnectError):
        return isinstance(exc.__cause__, ConnectionRefusedError)
    return False


def _failure_message(tried: int, failures: list[tuple[Attempt, BaseException]]) -> str:
    lines = [f"{a.label}: {type(e).__name__}: {e}" for a, e in failures[:MAX_MESSAGE_ATTEMPTS]]
    if len(failures) > MAX_MESSAGE_ATTEMPTS:
        lines.append(f"… and {len(failures) - MAX_MESSAGE_ATTEMPTS} more")
    return f"none of {tried} bootstrap contact(s) could be reached: " + "; ".join(lines)
