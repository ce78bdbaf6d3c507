"""Introductions and coordinated punching on loopback (no NAT: the signalling, the roles, the
single resulting connection; the NAT lab tests the traversal itself)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import crust
from crust import errors
from crust.events import (
    ConnectFailed,
    ExternalAddressChanged,
    MessageReceived,
    PeerConnected,
    PeerLost,
)
from crust.proto.punch import PublicConnectionInfo

TCP = ("tcp://127.0.0.1:0",)
QUIC = ("quic://127.0.0.1:0",)
BOTH = (*TCP, *QUIC)


async def trio(make: Callable[..., Any], listen: tuple[str, ...], **kw: Any) -> Any:
    node, wn = await make(listen=BOTH)
    a, wa = await make(listen=listen, **kw)
    b, wb = await make(listen=listen, **kw)
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    return node, (a, wa), (b, wb)


@pytest.mark.parametrize("listen", [TCP, QUIC, BOTH], ids=["tcp", "quic", "both"])
async def test_connect_by_peer_id_through_a_node(make: Callable[..., Any], listen: Any) -> None:
    node, (a, wa), (b, wb) = await trio(make, listen)
    assert b.peer_id not in a._known  # a has no contact of b: only an introduction can help
    assert await a.connect(b.peer_id) == b.peer_id
    ev = await wa.wait(PeerConnected, lambda e: e.peer == b.peer_id)
    assert ev.path == "punched"
    assert ev.transport in {c.split(":")[0] for c in listen}
    evb = await wb.wait(PeerConnected, lambda e: e.peer == a.peer_id)
    assert evb.path == "punched" and evb.transport == ev.transport
    assert a.connection(b.peer_id).path == "punched"
    await a.send(b.peer_id, b"through the hole")
    await b.send(a.peer_id, b"and back")
    assert (await wb.wait(MessageReceived)).data == b"through the hole"
    assert (await wa.wait(MessageReceived)).data == b"and back"
    assert node.statistics().introductions_forwarded >= 3  # intro, ack, sync
    assert a.statistics().punch_successes == 1
    assert a.statistics().punches_by_nat_pair == {"unknown/cone": (1, 1)}  # loopback: no node
    from crust.metrics import render

    scraped = render(a).decode()
    assert 'crust_punches_by_nat_pair_successes_total{nat_pair="unknown/cone"} 1.0' in scraped
    # racing paths may have produced duplicates: they close, the chosen one stays on both sides
    for svc, other in ((a, b), (b, a)):
        kept = svc._active[other.peer_id]
        extra = [c for c in svc._conns if c.peer_id == other.peer_id and c is not kept]
        if extra:
            await asyncio.wait_for(asyncio.gather(*(svc._closed_future(c) for c in extra)), 5)
        assert svc.is_connected(other.peer_id) and svc._active[other.peer_id] is kept
    assert a.connection(b.peer_id).transport == b.connection(a.peer_id).transport


async def test_node_refuses_to_introduce_a_peer_it_is_not_connected_to(
    make: Callable[..., Any],
) -> None:
    node, _ = await make(listen=BOTH)
    a, wa = await make(listen=BOTH)
    await a.connect(node.contacts())
    stranger = crust.Identity.generate().peer_id
    with pytest.raises(errors.HolePunchFailed, match="not connected to that peer"):
        await a.connect(stranger)
    assert (await wa.wait(ConnectFailed)).target == str(stranger)
    assert node.statistics().introductions_refused == 1


async def test_when_no_punch_is_possible_the_node_relays(make: Callable[..., Any]) -> None:
    node, wn = await make(listen=BOTH)
    a, wa = await make(listen=BOTH)
    b, wb = await make(listen=BOTH, hole_punching=False)  # b refuses introductions
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    assert await a.connect(b.peer_id) == b.peer_id
    ev = await wa.wait(PeerConnected, lambda e: e.peer == b.peer_id)
    assert ev.path == "relayed" and ev.outbound
    evb = await wb.wait(PeerConnected, lambda e: e.peer == a.peer_id)
    assert evb.path == "relayed" and not evb.outbound
    big = bytes(range(256)) * 4096  # 1 MiB: many chunks, flow-control windows
    await a.send(b.peer_id, big)
    await a.send(b.peer_id, b"after the big one")
    await b.send(a.peer_id, b"back through the relay")
    got = await wb.messages(2)
    assert [m.data for m in got] == [big, b"after the big one"]
    assert (await wa.wait(MessageReceived)).data == b"back through the relay"
    st = node.statistics()
    assert st.relay_circuits == 1 and st.relay_bytes > len(big)
    # the node saw only ciphertext: the plaintext never appears in what it forwarded
    assert b.connection(a.peer_id).path == "relayed"
    # losing the relay ends the relayed connection on both sides
    await node.aclose()
    await wa.wait(PeerLost, lambda e: e.peer == b.peer_id)
    await wb.wait(PeerLost, lambda e: e.peer == a.peer_id)


async def test_no_punch_and_no_relay_fails_with_every_reason(make: Callable[..., Any]) -> None:
    node, wn = await make(listen=BOTH, relay=False)
    a, _ = await make(listen=BOTH)
    b, _ = await make(listen=BOTH, hole_punching=False)
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    with pytest.raises(errors.HolePunchFailed) as info:
        await a.connect(b.peer_id)
    assert "hole punching disabled" in str(info.value)
    assert "relaying is disabled" in str(info.value)
    assert not a.is_connected(b.peer_id)
    assert node.statistics().relay_refused == 1


@pytest.mark.parametrize("listen", [TCP, QUIC], ids=["tcp", "quic"])
async def test_closing_a_relayed_peer_delivers_its_last_messages(
    make: Callable[..., Any], listen: Any
) -> None:
    """A service closing ends its relayed connections cleanly before the connection to the
    node they travel over: the last messages arrive, and the other end learns at once (its
    heartbeat timeout is far longer than the wait)."""
    node, wn = await make(listen=listen)
    a, wa = await make(listen=(), hole_punching=False, heartbeat_timeout=120.0)
    b, _ = await make(listen=(), hole_punching=False, heartbeat_timeout=120.0)
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    assert await b.connect(a.peer_id) == a.peer_id
    assert b.connection(a.peer_id).path == "relayed"
    for i in range(50):
        await b.send(a.peer_id, b"last %d" % i)
    await b.aclose()
    got = await wa.messages(50)
    assert [m.data for m in got] == [b"last %d" % i for i in range(50)]
    lost = await wa.wait(PeerLost, lambda e: e.peer == b.peer_id, timeout=10.0)
    assert lost.peer == b.peer_id


async def test_relay_limits_come_from_the_config(make: Callable[..., Any]) -> None:
    node, wn = await make(listen=BOTH, relay_max_circuits=0)
    a, _ = await make(listen=BOTH)
    b, _ = await make(listen=BOTH, hole_punching=False)
    await a.connect(node.contacts())
    await b.connect(node.contacts())
    await wn.count(PeerConnected, 2)
    with pytest.raises(errors.HolePunchFailed, match="too many circuits"):
        await a.connect(b.peer_id)
    assert node.statistics().relay_refused == 1 and node.statistics().relay_circuits == 0


async def test_hole_punching_off_with_no_contact_fails_fast(make: Callable[..., Any]) -> None:
    a, _ = await make(listen=BOTH, hole_punching=False)
    with pytest.raises(errors.ConnectError, match="no connected node"):
        await a.connect(crust.Identity.generate().peer_id)


@pytest.mark.parametrize("listen", [TCP, QUIC], ids=["tcp", "quic"])
async def test_connect_with_info_out_of_band(make: Callable[..., Any], listen: Any) -> None:
    a, wa = await make(listen=listen)
    b, wb = await make(listen=listen)
    ia = await a.prepare_connection_info()
    ib = await b.prepare_connection_info()
    wire_a, wire_b = ia.public.to_bytes(), ib.public.to_bytes()
    assert PublicConnectionInfo.from_bytes(wire_a) == ia.public
    got = await asyncio.gather(a.connect_with_info(ia, wire_b), b.connect_with_info(ib, wire_a))
    assert list(got) == [b.peer_id, a.peer_id]
    assert (await wa.wait(PeerConnected)).path == "punched"
    assert (await wb.wait(PeerConnected)).path == "punched"
    await a.send(b.peer_id, b"rendezvous")
    assert (await wb.wait(MessageReceived)).data == b"rendezvous"


async def test_garbage_connection_info_is_a_protocol_error(make: Callable[..., Any]) -> None:
    a, _ = await make(listen=BOTH)
    ia = await a.prepare_connection_info()
    with pytest.raises(errors.ProtocolError):
        await a.connect_with_info(ia, b"\x00garbage")
    with pytest.raises(errors.InvalidArgument):
        await a.connect_with_info(ia, ia.public)


async def test_loopback_observations_are_not_external_addresses(
    make: Callable[..., Any],
) -> None:
    a, wa = await make(listen=BOTH)
    b, _ = await make(listen=BOTH)
    await a.connect(b.contacts())
    assert all(ep.external is None for ep in a.endpoints())
    assert not wa.of(ExternalAddressChanged)


@pytest.mark.parametrize("listen", [TCP, QUIC], ids=["tcp", "quic"])
async def test_relayed_connection_upgrades_to_direct_without_losing_a_message(
    make: Callable[..., Any], listen: Any
) -> None:
    _, (a, wa), (b, wb) = await trio(make, listen)
    assert await a._relayed(b.peer_id) == b.peer_id
    assert (await wa.wait(PeerConnected, lambda e: e.peer == b.peer_id)).path == "relayed"
    assert (await wb.wait(PeerConnected, lambda e: e.peer == a.peer_id)).path == "relayed"
    n = 300

    async def stream(src: Any, dst: Any, tag: bytes) -> None:
        for i in range(n):
            await src.send(dst.peer_id, tag + i.to_bytes(4, "big") + bytes(3000))
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the switch happen in the middle of the stream

    upgrade = asyncio.ensure_future(a._traversal.punch(b.peer_id))
    await asyncio.gather(stream(a, b, b"a"), stream(b, a, b"b"), upgrade)
    for svc, w, other, tag in ((a, wa, b, b"b"), (b, wb, a, b"a")):
        got = await w.messages(n, timeout=20)
        assert [m.data[:5] for m in got] == [tag + i.to_bytes(4, "big") for i in range(n)]
        ups = [e for e in w.of(PeerConnected) if e.peer == other.peer_id]
        assert [e.path for e in ups] == ["relayed", "punched"]
        assert not [e for e in w.of(PeerLost) if e.peer == other.peer_id]
        assert svc.connection(other.peer_id).path == "punched"
    assert a.statistics().punch_successes == 1
