"""Gossip of known peers on loopback: a node learns peers two hops away, never three."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from crust.events import PeerConnected
from crust.identity import PeerId
from crust.service import Service

TIMEOUT = 10.0


def tcp(svc: Service) -> str:
    return next(c for c in svc.contacts() if c.startswith("tcp://"))


def learned_event(svc: Service, want: PeerId) -> asyncio.Event:
    """Set when ``svc`` learns ``want``'s contacts by gossip (wraps the gossip's callback)."""
    done = asyncio.Event()
    learn = svc._gossip.learn

    def spy(peer: PeerId, contacts: tuple[str, ...]) -> None:
        learn(peer, contacts)
        if peer == want:
            done.set()

    svc._gossip.learn = spy
    return done


async def test_chain_learns_two_hops_and_connects_directly(make: Callable[..., Any]) -> None:
    a, wa = await make()
    b, _ = await make()
    c, wc = await make()
    d, _ = await make()
    # B dials C, C dials D, then A dials B: B tells A about C (a peer it reached directly),
    # never about D (which C told B about)
    await c.connect(tcp(d))
    await b.connect(tcp(c))
    c_learned = learned_event(a, c.peer_id)
    await a.connect(tcp(b))
    async with asyncio.timeout(TIMEOUT):
        await c_learned.wait()
    assert c.peer_id in a._known
    assert d.peer_id not in a._known  # never more than two hops
    assert a.statistics().discovery["gossip_learned"] == 1
    assert b.statistics().discovery["gossip_learned"] == 1  # D, from C
    # A reaches C by peer id, directly on the contacts it learned
    assert await a.connect(c.peer_id) == c.peer_id
    ev = await wa.wait(PeerConnected, lambda e: e.peer == c.peer_id)
    assert ev.path == "direct" and ev.outbound
    assert a.connection(c.peer_id).path == "direct"
    back = await wc.wait(PeerConnected, lambda e: e.peer == a.peer_id)
    assert not back.outbound
    assert c.statistics().discovery["gossip_sent"] >= 1


async def test_gossip_is_rate_limited_and_garbage_is_rejected(make: Callable[..., Any]) -> None:
    a, _ = await make()
    b, _ = await make()
    await a.connect(tcp(b))
    conn = b._active[a.peer_id]
    # garbage: counted, nothing learned, the connection stays up
    conn.session.send_control({"t": "gp", "p": [[b"short", ["tcp://127.0.0.1:1"]]]})
    conn.control_changed()
    # a second message right after is dropped by the rate limit
    conn.session.send_control({"t": "gp", "p": [[bytes(32), ["tcp://127.0.0.1:1"]]]})
    conn.control_changed()
    # a ping after both proves they were processed (control messages are ordered)
    got = asyncio.Event()
    a._pongs[a._active[b.peer_id]] = got
    a._active[b.peer_id].session.ping(asyncio.get_running_loop().time())
    a._active[b.peer_id].control_changed()
    async with asyncio.timeout(TIMEOUT):
        await got.wait()
    stats = a.statistics().discovery
    assert stats["gossip_received"] == 2
    assert stats["gossip_rejected"] == 1
    assert stats["gossip_rate_limited"] == 1
    assert stats["gossip_learned"] == 0
    assert a.is_connected(b.peer_id)


async def test_a_peer_that_connects_later_is_pushed_to_the_others(
    make: Callable[..., Any],
) -> None:
    a, _ = await make()
    b, _ = await make()
    c, _ = await make()
    await a.connect(tcp(b))
    c_learned = learned_event(a, c.peer_id)
    await b.connect(tcp(c))
    # B pushes its new direct peer to A once A's rate-limit gap has passed (≈ 5.5 s)
    async with asyncio.timeout(TIMEOUT):
        await c_learned.wait()
    assert a.statistics().discovery["gossip_rate_limited"] == 0
    assert await a.connect(c.peer_id) == c.peer_id
    assert a.connection(c.peer_id).path == "direct"


async def test_peers_that_dialled_us_are_not_gossiped(make: Callable[..., Any]) -> None:
    """Only contacts we reached ourselves are advertised: a peer that dialled in (perhaps from
    behind a NAT or firewall) is not."""
    a, _ = await make()
    b, _ = await make()
    c, _ = await make()
    await c.connect(tcp(b))  # C dialled B: B has no proof C accepts connections
    await a.connect(tcp(b))
    await b.disconnect(a.peer_id)
    await a.connect(tcp(b))  # a second kept connection: still nothing about C
    assert c.peer_id not in a._known
    assert b.statistics().discovery["gossip_sent"] == 0
