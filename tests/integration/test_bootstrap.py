"""Service.bootstrap() and the bootstrap cache, on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import crust
from crust import errors
from crust.aio.cachefile import CacheFile
from crust.bootstrap import Bootstrapper, Connect, node_is_gone
from crust.events import BootstrapConnected, BootstrapFailed, Event, PeerConnected
from crust.identity import Identity, PeerId
from crust.proto.cache import BootstrapCache, CacheEntry, Reached
from crust.service import Service
from crust.testing.watcher import EventWatcher

NET = "crust"  # Config.for_testing()'s network_name
Make = Callable[..., Any]


def dead_tcp() -> str:
    """A loopback TCP port nobody listens on (connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def of(svc: Service, scheme: str) -> str:
    return next(c for c in svc.contacts() if c.startswith(scheme + "://"))


def on_disk(path: Path) -> BootstrapCache:
    return BootstrapCache.from_bytes(path.read_bytes())


def cached_peers(path: Path) -> list[PeerId]:
    return [e.peer for e in on_disk(path).entries(NET)]


def seed_cache(path: Path, *entries: tuple[PeerId, str, float]) -> None:
    CacheFile(path).update([Reached(NET, peer, contact, at) for peer, contact, at in entries])


class Silent:
    """Loopback TCP listeners that accept and never say a word (handshakes time out)."""

    def __init__(self) -> None:
        self.contacts: list[str] = []
        self.accepted = 0
        self.servers: list[asyncio.Server] = []

    async def add(self, n: int) -> list[str]:
        for _ in range(n):
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.servers.append(server)
            self.contacts.append(f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        return self.contacts[-n:]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await reader.read()  # until the dialer gives up
        finally:
            writer.close()


@pytest.fixture
async def silent() -> AsyncIterator[Silent]:
    s = Silent()
    yield s
    for server in s.servers:
        server.close()
        await server.wait_closed()


def dead_tcps(n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        c = dead_tcp()
        if c not in out:
            out.append(c)
    return out


# =========================================================================== success


@pytest.mark.parametrize("scheme", ["tcp", "quic"])
async def test_bootstrap_from_hard_coded_contacts(make: Make, tmp_path: Path, scheme: str) -> None:
    node, wnode = await make()
    cache = tmp_path / "cache.json"
    contact = of(node, scheme)
    b, wb = await make(hard_coded_contacts=(dead_tcp(), contact), bootstrap_cache=cache)
    assert await b.bootstrap() == node.peer_id
    assert (await wb.wait(BootstrapConnected)).peer == node.peer_id
    assert b.is_connected(node.peer_id)
    assert b.connection(node.peer_id).transport == scheme
    await wnode.wait(PeerConnected, lambda e: e.peer == b.peer_id and not e.outbound)
    # on disk by the time bootstrap() returns: the node and the contact that reached it
    (entry,) = on_disk(cache).entries(NET)
    assert entry.peer == node.peer_id
    assert entry.contacts == (contact.partition("#")[0],)
    assert entry.failures == 0


async def test_second_run_finds_the_node_from_the_cache_file_alone(
    make: Make, tmp_path: Path
) -> None:
    node, _ = await make()
    cache = tmp_path / "cache.json"
    ident = Identity.generate()
    first = crust.Config.for_testing(hard_coded_contacts=(of(node, "tcp"),), bootstrap_cache=cache)
    async with Service(first, identity=ident) as b:
        assert await b.bootstrap() == node.peer_id
    # a new run: no hard-coded contacts, only the cache file
    second = crust.Config.for_testing(bootstrap_cache=cache)
    async with Service(second, identity=ident) as b2:
        watcher = EventWatcher(b2)
        try:
            assert await b2.bootstrap() == node.peer_id
            assert (await watcher.wait(BootstrapConnected)).peer == node.peer_id
            assert b2.connection(node.peer_id).outbound
        finally:
            await watcher.stop()
    assert cached_peers(cache) == [node.peer_id]


async def test_cached_nodes_come_first_and_newest_first(make: Make, tmp_path: Path) -> None:
    old, _ = await make()
    new, _ = await make()
    hard, _ = await make()
    cache = tmp_path / "cache.json"
    seed_cache(
        cache,
        (old.peer_id, of(old, "tcp"), 1000.0),
        (new.peer_id, of(new, "tcp"), 2000.0),
    )
    b, _ = await make(bootstrap_cache=cache, hard_coded_contacts=(of(hard, "tcp"),))
    order = [a.contacts for a in b._bootstrapper.attempts()]
    assert order == [
        (of(new, "tcp"),),  # pinned: the cached node must prove its identity
        (of(old, "tcp"),),
        (of(hard, "tcp"),),
    ]


async def test_direct_outbound_connections_are_cached_inbound_ones_are_not(
    make: Make, tmp_path: Path
) -> None:
    a_cache, b_cache = tmp_path / "a.json", tmp_path / "b.json"
    a, _ = await make(bootstrap_cache=a_cache)
    b, wb = await make(bootstrap_cache=b_cache)
    c, _ = await make()
    await b.connect(of(a, "quic"))  # b dialled a: a is reachable
    await b.connect(of(c, "tcp"))
    await wb.count(PeerConnected, 2)
    await b.aclose()
    await a.aclose()
    assert cached_peers(b_cache) == [c.peer_id, a.peer_id]
    assert on_disk(b_cache).get(NET, a.peer_id).contacts == (  # type: ignore[union-attr]
        of(a, "quic").partition("#")[0],
    )
    # a only accepted a connection: that proves nothing about b's reachability
    assert not a_cache.exists() or cached_peers(a_cache) == []


async def test_services_sharing_a_cache_file_keep_each_others_entries(
    make: Make, tmp_path: Path
) -> None:
    cache = tmp_path / "shared.json"
    n1, _ = await make()
    n2, _ = await make()
    s1, _ = await make(bootstrap_cache=cache, hard_coded_contacts=(of(n1, "tcp"),))
    s2, _ = await make(bootstrap_cache=cache, hard_coded_contacts=(of(n2, "tcp"),))
    await asyncio.gather(s1.bootstrap(), s2.bootstrap())
    assert set(cached_peers(cache)) == {n1.peer_id, n2.peer_id}
    # and each sees the other's node at its next bootstrap
    await s1.bootstrap()
    assert {a.cached for a in s1._bootstrapper.attempts()} >= {n1.peer_id, n2.peer_id}


# =========================================================================== failure


async def test_all_contacts_dead_fails_listing_each_and_counts_cache_failures(
    make: Make, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.json"
    gone = Identity.generate().peer_id
    gone_contact = dead_tcp()
    seed_cache(cache, (gone, gone_contact, 1000.0))
    hard = tuple(dead_tcps(2))
    b, wb = await make(bootstrap_cache=cache, hard_coded_contacts=hard)
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    exc = info.value
    assert sorted(contact for contact, _ in exc.attempts) == sorted(
        [f"{gone_contact}#{gone}", *hard]
    )
    assert all(isinstance(e, errors.ConnectError) for e in exc.errors)
    assert all(contact.partition("#")[0] in str(exc) for contact, _ in exc.attempts)
    assert (await wb.wait(BootstrapFailed)).error is exc
    assert not wb.of(BootstrapConnected)
    # refused at once: the node is gone (our network works), so it counts
    assert on_disk(cache).get(NET, gone).failures == 1  # type: ignore[union-attr]
    with pytest.raises(errors.BootstrapFailed):
        await b.bootstrap()
    assert on_disk(cache).get(NET, gone).failures == 2  # type: ignore[union-attr]
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    assert on_disk(cache).get(NET, gone) is None  # third failure in a row: pruned
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    assert sorted(contact for contact, _ in info.value.attempts) == sorted(hard)


async def test_nothing_to_try(make: Make) -> None:
    b, wb = await make()
    with pytest.raises(errors.BootstrapFailed, match="nothing to bootstrap from") as info:
        await b.bootstrap()
    assert info.value.attempts == ()
    assert (await wb.wait(BootstrapFailed)).error is info.value


async def test_a_cached_address_now_held_by_another_peer_counts_as_failed(
    make: Make, tmp_path: Path
) -> None:
    stranger, _ = await make()
    cache = tmp_path / "cache.json"
    cached = Identity.generate().peer_id
    seed_cache(cache, (cached, of(stranger, "tcp").partition("#")[0], 1000.0))
    b, _ = await make(bootstrap_cache=cache)
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    ((_, err),) = info.value.attempts
    assert isinstance(err, errors.PeerAuthenticationError)
    assert on_disk(cache).get(NET, cached).failures == 1  # type: ignore[union-attr]
    assert not b.is_connected(stranger.peer_id)


async def test_timeouts_do_not_count_when_nothing_was_reached(
    make: Make, tmp_path: Path, silent: Silent
) -> None:
    """Offline (or a silent network) must not wipe the cache: time-outs only count against
    an entry in a round that reached some other node."""
    (contact,) = await silent.add(1)
    cache = tmp_path / "cache.json"
    quiet = Identity.generate().peer_id
    seed_cache(cache, (quiet, contact, 1000.0))
    b, _ = await make(bootstrap_cache=cache, handshake_timeout=0.3)
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    assert isinstance(info.value.errors[0], TimeoutError)
    assert on_disk(cache).get(NET, quiet).failures == 0  # type: ignore[union-attr]


def test_which_failures_prove_a_node_gone() -> None:
    refused = errors.ConnectError("tcp://127.0.0.1:1: Connection refused")
    refused.__cause__ = ConnectionRefusedError()
    unreachable = errors.ConnectError("tcp://192.0.2.1:1: Network is unreachable")
    unreachable.__cause__ = OSError(101, "Network is unreachable")
    assert node_is_gone(refused)
    assert node_is_gone(errors.PeerAuthenticationError("someone else"))
    assert node_is_gone(errors.NetworkMismatch("other network"))
    assert node_is_gone(errors.Refused("limit"))
    assert not node_is_gone(unreachable)
    assert not node_is_gone(errors.ConnectTimeout("slow"))
    assert not node_is_gone(errors.HandshakeTimeout("slow"))
    assert node_is_gone(errors.ConnectError("all", [refused, refused]))
    assert not node_is_gone(errors.ConnectError("all", [refused, unreachable]))


# =========================================================================== the race


class FakeDialer:
    """Stands in for Service.connect: each target's outcome is set by the test."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.outcomes: dict[str, asyncio.Future[PeerId]] = {}
        self.changed = asyncio.Condition()

    def outcome(self, target: str) -> asyncio.Future[PeerId]:
        return self.outcomes.setdefault(target, asyncio.get_running_loop().create_future())

    async def connect(self, target: str | PeerId | Sequence[str]) -> PeerId:
        key = str(target) if isinstance(target, str | PeerId) else ",".join(target)
        async with self.changed:
            self.started.append(key)
            self.changed.notify_all()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            return await self.outcome(key)
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        finally:
            self.running -= 1


def make_bootstrapper(
    dialer: FakeDialer, contacts: Sequence[str], events: list[Event]
) -> Bootstrapper:
    config = crust.Config.for_testing(hard_coded_contacts=tuple(contacts))

    def spawn(coro: Any) -> None:
        coro.close()

    return Bootstrapper(
        config,
        Identity.generate().peer_id,
        connect=dialer.connect,
        emit=events.append,
        spawn=spawn,
    )


async def _started(dialer: FakeDialer, n: int) -> None:
    async with asyncio.timeout(5), dialer.changed:
        await dialer.changed.wait_for(lambda: len(dialer.started) >= n)


async def test_at_most_eight_attempts_at_a_time_first_success_wins() -> None:
    contacts = [f"tcp://192.0.2.{i}:1" for i in range(1, 21)]
    dialer, events = FakeDialer(), list[Event]()
    boot = make_bootstrapper(dialer, contacts, events)
    task = asyncio.ensure_future(boot.run())
    await _started(dialer, 8)
    assert dialer.started == contacts[:8]
    # each failure starts the next attempt
    for i in range(5):
        dialer.outcome(contacts[i]).set_exception(errors.ConnectError(f"no {i}"))
    await _started(dialer, 13)
    assert dialer.started == contacts[:13]
    winner = Identity.generate().peer_id
    dialer.outcome(contacts[10]).set_result(winner)
    assert await task == winner
    assert dialer.most == 8
    assert sorted(dialer.cancelled) == sorted(c for c in contacts[5:13] if c != contacts[10])
    assert dialer.running == 0
    assert events == [BootstrapConnected(winner)]


async def test_every_attempt_is_reported_when_all_fail() -> None:
    contacts = [f"tcp://192.0.2.{i}:1" for i in range(1, 12)]
    dialer, events = FakeDialer(), list[Event]()
    boot = make_bootstrapper(dialer, contacts, events)
    for c in contacts:
        dialer.outcome(c).set_exception(errors.ConnectError(f"down: {c}"))
    with pytest.raises(errors.BootstrapFailed) as info:
        await boot.run()
    assert sorted(c for c, _ in info.value.attempts) == sorted(contacts)
    assert dialer.most <= 8
    assert events == [BootstrapFailed(info.value)]


async def test_bounded_parallelism_against_real_silent_listeners(
    make: Make, silent: Silent
) -> None:
    targets = tuple(await silent.add(12))
    b, _ = await make(hard_coded_contacts=targets, handshake_timeout=0.3)
    # count the service's connect() calls in flight (counting at the listeners would race:
    # a timed-out attempt's close and the next attempt's connect arrive in either order)
    real_connect: Connect = b._bootstrapper._connect
    flight = [0, 0]

    async def counting(target: str | PeerId | Sequence[str]) -> PeerId:
        flight[0] += 1
        flight[1] = max(flight)
        try:
            return await real_connect(target)
        finally:
            flight[0] -= 1

    b._bootstrapper._connect = counting
    with pytest.raises(errors.BootstrapFailed) as info:
        await b.bootstrap()
    assert sorted(c for c, _ in info.value.attempts) == sorted(targets)
    assert all(isinstance(e, TimeoutError) for e in info.value.errors)
    assert flight == [0, 8]
    assert silent.accepted == 12  # every attempt really reached its listener


async def test_bootstrap_needs_a_running_service() -> None:
    svc = Service(crust.Config.for_testing())
    with pytest.raises(errors.ServiceClosed):
        await svc.bootstrap()


def test_cache_entry_contacts_are_dialled_pinned() -> None:
    peer = Identity.generate().peer_id
    entry = CacheEntry(peer, ("tcp://127.0.0.1:5",), 1.0)
    assert entry.pinned_contacts() == [f"tcp://127.0.0.1:5#{peer}"]
