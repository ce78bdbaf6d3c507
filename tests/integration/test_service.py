"""Two or more services on loopback."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable
from typing import Any

import pytest

import crust
from crust import errors
from crust.events import AbuseDetected, MessageReceived, PeerConnected, PeerLost
from crust.service import Service

TIMEOUT = 10.0


Dial = Callable[[Service], str]


@pytest.fixture(params=["tcp", "quic"])
def transport(request: pytest.FixtureRequest) -> str:
    """The conformance suite runs once per transport: the Session is the same on both."""
    return str(request.param)


@pytest.fixture
def dial(transport: str) -> Dial:
    """The service's contact of the transport under test."""

    def pick(svc: Service) -> str:
        return next(c for c in svc.contacts() if c.startswith(transport + "://"))

    return pick


async def test_connect_send_in_order(make: Callable[..., Any], dial: Dial, transport: str) -> None:
    a, wa = await make()
    b, wb = await make()
    peer = await a.connect(dial(b))
    assert peer == b.peer_id
    await wa.wait(PeerConnected, lambda e: e.peer == b.peer_id and e.outbound)
    ev = await wb.wait(PeerConnected, lambda e: e.peer == a.peer_id)
    assert (ev.transport, ev.path, ev.outbound) == (transport, "direct", False)
    rng = random.Random(7)
    sent = [rng.randbytes(rng.randrange(3000)) for _ in range(2000)]
    for m in sent:
        await a.send(peer, m)
    got = await wb.messages(len(sent))
    assert [m.data for m in got] == sent
    assert all(m.peer == a.peer_id for m in got)
    # both ends describe the same single connection
    da, db = a.connection(b.peer_id), b.connection(a.peer_id)
    assert da.local == db.remote and da.remote == db.local
    assert a.peers() == [b.peer_id] and b.is_connected(a.peer_id)
    stats = a.statistics()
    assert stats.messages_sent >= 2000 and stats.peers == 1 and stats.connects_outbound == 1


async def test_large_messages_both_ways(make: Callable[..., Any], dial: Dial) -> None:
    a, wa = await make()
    b, wb = await make()
    peer = await a.connect(dial(b))
    await wb.wait(PeerConnected)
    big = [random.randbytes(n) for n in (2 * 1024 * 1024, 1_000_000, 65_536, 1)]
    for m in big:
        await a.send(peer, m, priority=2)
        await b.send(a.peer_id, m, priority=2)
    assert [m.data for m in await wb.messages(4)] == big
    assert [m.data for m in await wa.messages(4)] == big


async def test_priorities_overtake_bulk(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make()
    b, wb = await make()
    peer = await a.connect(dial(b))
    bulk = [bytes([i]) * 1_000_000 for i in range(6)]
    for m in bulk:
        await a.send(peer, m, priority=200)
    await a.send(peer, b"urgent", priority=0)
    got = await wb.messages(len(bulk) + 1)
    order = [m.data for m in got]
    # the urgent message does not wait for 6 MB of bulk data queued before it
    assert order.index(b"urgent") < len(bulk)
    assert [m for m in order if m != b"urgent"] == bulk
    assert next(m.priority for m in got if m.data == b"urgent") == 0


async def test_send_errors(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make()
    b, wb = await make(max_message_size=1000)
    stranger = crust.Identity.generate().peer_id
    with pytest.raises(errors.NotConnected):
        await a.send(stranger, b"x")
    peer = await a.connect(dial(b))
    with pytest.raises(errors.MessageTooLarge):
        await a.send(peer, bytes(a.config.max_message_size + 1))
    with pytest.raises(errors.InvalidArgument):
        await a.send(peer, b"x", priority=256)
    with pytest.raises(errors.InvalidArgument):
        await a.send(peer, "text", priority=0)
    # the receiver allows only 1000 bytes: our larger message closes that connection
    await a.send(peer, bytes(500))
    await a.send(peer, bytes(5000))
    lost = await wb.wait(PeerLost)
    assert "OversizedInput" in lost.reason  # a ProtocolError: refused before allocating
    assert len(wb.of(MessageReceived)) == 1
    assert b.statistics().protocol_errors == 1


async def test_oversized_message_leaves_other_peers_undisturbed(
    make: Callable[..., Any], dial: Dial
) -> None:
    hub, wh = await make(max_message_size=10_000)
    good, _ = await make()
    bad, _ = await make()
    await good.connect(dial(hub))
    await bad.connect(dial(hub))
    await bad.send(hub.peer_id, bytes(20_000))
    await wh.wait(PeerLost, lambda e: e.peer == bad.peer_id)
    await good.send(hub.peer_id, b"still fine")
    msg = await wh.wait(MessageReceived)
    assert msg.data == b"still fine" and msg.peer == good.peer_id
    assert hub.is_connected(good.peer_id) and not hub.is_connected(bad.peer_id)


async def test_wrong_network_name(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make(network_name="alpha")
    b, _ = await make(network_name="beta")
    with pytest.raises(errors.NetworkMismatch):
        await a.connect(dial(b))
    assert not a.peers() and not b.peers()
    assert b.statistics().handshake_failures == 1


async def test_wrong_pinned_peer_id(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make()
    b, _ = await make()
    contact = crust.Contact.parse(dial(b)).with_peer(crust.Identity.generate().peer_id)
    with pytest.raises(errors.PeerAuthenticationError):
        await a.connect(str(contact))
    assert not a.peers()


async def test_ipv6_and_happy_eyeballs(make: Callable[..., Any]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    a, _ = await make()
    b, wb = await make(listen=("tcp://[::1]:0", "tcp://127.0.0.1:0"))
    contacts = b.contacts()
    assert any("[::1]" in c for c in contacts)
    # a dead contact first: the race still succeeds through the live ones
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    peer = await a.connect([f"tcp://127.0.0.1:{dead_port}", *contacts])
    assert peer == b.peer_id
    ev = await wb.wait(PeerConnected)
    assert ev.peer == a.peer_id


async def test_connect_failure_names_every_attempt(make: Callable[..., Any]) -> None:
    a, wa = await make(connect_stagger=0.01)
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    with pytest.raises(errors.ConnectError) as info:
        await a.connect([f"tcp://127.0.0.1:{p}" for p in ports])
    assert len(info.value.errors) == 2 or isinstance(info.value, errors.ConnectError)
    await wa.wait(crust.events.ConnectFailed)


async def test_simultaneous_connects_keep_one_connection(
    make: Callable[..., Any], dial: Dial
) -> None:
    for _ in range(3):
        a, wa = await make()
        b, wb = await make()
        ca, cb = dial(a), dial(b)
        results = await asyncio.gather(
            *[a.connect(cb) for _ in range(8)], *[b.connect(ca) for _ in range(8)]
        )
        assert set(results) == {a.peer_id, b.peer_id}
        assert a.peers() == [b.peer_id] and b.peers() == [a.peer_id]
        da, db = a.connection(b.peer_id), b.connection(a.peer_id)
        assert da.local == db.remote and da.remote == db.local
        # every message arrives, in order, both ways
        for i in range(200):
            await a.send(b.peer_id, b"a%d" % i)
            await b.send(a.peer_id, b"b%d" % i)
        assert [m.data for m in await wb.messages(200)] == [b"a%d" % i for i in range(200)]
        assert [m.data for m in await wa.messages(200)] == [b"b%d" % i for i in range(200)]
        assert not wa.of(PeerLost) and not wb.of(PeerLost)
        assert a.statistics().connections == 1 or b.statistics().connections == 1


async def test_disconnect_and_reconnect_by_peer_id(make: Callable[..., Any], dial: Dial) -> None:
    a, wa = await make()
    b, wb = await make()
    peer = await a.connect(dial(b))
    await wb.wait(PeerConnected)
    await a.disconnect(peer)
    assert not a.is_connected(peer)
    lost = await wb.wait(PeerLost)
    assert "peer" in lost.reason
    await wa.wait(PeerLost)
    # b told us its contacts in the handshake: reconnect by peer id alone
    assert await a.connect(peer) == peer
    await a.send(peer, b"again")
    assert (await wb.wait(MessageReceived)).data == b"again"


async def test_dead_peer_detected_by_heartbeat(make: Callable[..., Any], dial: Dial) -> None:
    a, wa = await make(heartbeat_interval=0.1, heartbeat_timeout=0.6)
    b, _ = await make(heartbeat_interval=0.1, heartbeat_timeout=30.0)
    peer = await a.connect(dial(b))
    # b freezes: stops reading and stops its timers, as a stopped process would
    conn = b._active[a.peer_id]
    conn.pause_reading()
    conn.session.handle_timer = lambda now: None
    lost = await wa.wait(PeerLost, timeout=5.0)
    assert lost.peer == peer and "heartbeat" in lost.reason
    assert a.statistics().heartbeat_timeouts == 1


async def test_blacklist_drops_and_refuses(make: Callable[..., Any], dial: Dial) -> None:
    a, wa = await make()
    b, wb = await make()
    peer = await a.connect(dial(b))
    await wb.wait(PeerConnected)
    b.blacklist(a.peer_id)
    await wb.wait(PeerLost, lambda e: e.reason == "blacklisted")
    await wa.wait(PeerLost)
    with pytest.raises(errors.CrustError):
        await a.connect(dial(b))
    assert not b.is_connected(a.peer_id)
    c, _ = await make()
    b.blacklist("127.0.0.0/8")
    with pytest.raises(errors.CrustError):
        await c.connect(dial(b))
    assert b.statistics().blacklisted >= 2
    assert peer == b.peer_id


async def test_whitelist_of_peers(make: Callable[..., Any], dial: Dial) -> None:
    friend = crust.Identity.generate()
    b, _ = await make(whitelist=(str(friend.peer_id),))
    a, _ = await make(identity=friend)
    stranger, _ = await make()
    assert await a.connect(dial(b)) == b.peer_id
    with pytest.raises(errors.CrustError):
        await stranger.connect(dial(b))


async def test_garbage_and_slow_clients_do_not_hurt(make: Callable[..., Any]) -> None:
    b, wb = await make(handshake_timeout=0.5)
    a, _ = await make()
    host, port = crust.Contact.parse(b.contacts()[0]).address
    clients = []
    for payload in (b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 100, b"CRST\x01", b"CRS"):
        r, w = await asyncio.open_connection(host, port)
        w.write(payload)
        clients.append((r, w))
    peer = await a.connect(b.contacts()[0])
    await a.send(peer, b"fine")
    assert (await wb.wait(MessageReceived)).data == b"fine"
    # two send garbage, two stall: each is cut off (EOF) and counted, none disturbs the
    # real peer; AbuseDetected comes once per address and kind
    async with asyncio.timeout(TIMEOUT):
        for r, _ in clients:
            assert await r.read() == b""
    abuse = await wb.count(AbuseDetected, 2)
    assert sorted(e.kind for e in abuse) == ["garbage", "timeout"]
    assert b.statistics().handshake_failures + b.statistics().protocol_errors == 4
    for _, w in clients:
        w.close()
    assert b.peers() == [a.peer_id]


async def test_event_backpressure_loses_nothing(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make()
    b, _ = await make(event_queue_size=16, watch=False)
    peer = await a.connect(dial(b))
    n = 3000
    for i in range(n):
        await a.send(peer, b"%d" % i)
    got: list[bytes] = []
    async with asyncio.timeout(TIMEOUT):
        async for ev in b.events():
            if isinstance(ev, MessageReceived):
                got.append(ev.data)
                if len(got) == n:
                    break
    assert got == [b"%d" % i for i in range(n)]


async def test_self_connection_is_refused(make: Callable[..., Any], dial: Dial) -> None:
    a, _ = await make()
    with pytest.raises(errors.ConnectError, match="ourselves"):
        await a.connect(dial(a))
    assert not a.peers()


async def test_service_lifetime() -> None:
    svc = Service(crust.Config.for_testing())
    with pytest.raises(errors.ServiceClosed):
        await svc.connect("tcp://127.0.0.1:9")
    async with svc:
        assert svc.endpoints()[0].protocol == "tcp"
        assert svc.endpoints()[0].local.startswith("tcp://127.0.0.1:")
    with pytest.raises(errors.ServiceClosed):
        await svc.connect("tcp://127.0.0.1:9")
    # events() ends once the service is closed
    seen = [ev async for ev in svc.events()]
    assert any(isinstance(e, crust.events.ListenerStarted) for e in seen)
