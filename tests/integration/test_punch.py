"""Introductions and coordinated punching on loopback (no NAT: the signalling, the roles, the
single resulting connection; the NAT lab tests the traversal itself)."""

from __future__ import annotations

import asyncio
import socket
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
from crust.proto.predict import Allocation
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


# ------------------------------------------------------------------ port prediction


def _address(svc: Any, scheme: str) -> tuple[str, int]:
    c = next(c for c in svc.contacts() if c.startswith(scheme + "://"))
    host, port = c.split("://")[1].split("#")[0].rsplit(":", 1)
    return host, int(port)


async def test_address_echoes_from_new_sockets_and_connections(make: Callable[..., Any]) -> None:
    """What port prediction measures with: each echo leaves from a new socket (a new NAT
    mapping) and the node reports the address it saw; the TCP echo is no session at all."""
    node, wn = await make(listen=BOTH)
    a, _ = await make(listen=BOTH)
    tr = a._traversal
    local, seen = await tr._tcp_echo(_address(node, "tcp"))
    assert seen == ("127.0.0.1", local)
    local2, seen2 = await tr._tcp_echo(_address(node, "tcp"))
    assert seen2 == ("127.0.0.1", local2) and local2 != local
    udp = [await tr._echo_fresh(_address(node, "quic"), socket.AF_INET) for _ in range(2)]
    assert {host for host, _ in udp} == {"127.0.0.1"}
    assert udp[0][1] != udp[1][1]  # two sockets, two source ports
    stats = node.statistics()
    assert stats.handshake_failures == 0 and stats.abuse_events == 0
    assert not wn.of(PeerConnected)
    assert node.peers() == []
    # another network's echo is refused like its handshake would be
    other, _ = await make(listen=TCP, network_name="elsewhere")
    with pytest.raises(errors.NetworkMismatch):
        await other._traversal._tcp_echo(_address(node, "tcp"))


async def test_predictions_travel_in_connection_info_and_only_while_fresh(
    make: Callable[..., Any],
) -> None:
    a, _ = await make(listen=BOTH)
    tr = a._traversal
    assert (await a.prepare_connection_info()).public.predicted == ()  # nothing measured
    now = asyncio.get_running_loop().time()
    tr.allocation["quic"] = ("198.18.0.10", Allocation(delta=2, last=20004, at=now, samples=3))
    info = await a.prepare_connection_info()
    assert info.public.predicted == tuple(
        f"quic://198.18.0.10:{20006 + 2 * i}" for i in range(a.config.port_prediction)
    )
    assert PublicConnectionInfo.from_bytes(info.public.to_bytes()) == info.public
    assert a.statistics().port_predictions == 1
    tr.allocation["quic"] = ("198.18.0.10", Allocation(delta=2, last=20004, at=now - 60, samples=3))
    assert tr.predictions() == []  # too old: the counter has moved on
    b, _ = await make(listen=BOTH, port_prediction=0)
    b._traversal.allocation["quic"] = (
        "198.18.0.10",
        Allocation(delta=1, last=20000, at=now, samples=3),
    )
    assert b._traversal.predictions() == []  # port_prediction = 0: never advertised


async def test_predicted_addresses_must_be_on_a_known_address_of_the_peer(
    make: Callable[..., Any],
) -> None:
    from crust.traversal import _Punch

    a, _ = await make(listen=BOTH)
    punch = _Punch(crust.Identity.generate().peer_id, bytes(16), outbound=True)
    a._traversal._set_remote(
        punch,
        ["quic://198.18.0.10:7100", "tcp://198.18.0.10:7101"],
        "quic://198.18.0.10:7100",
        [
            "quic://198.18.0.10:20001",
            "tcp://198.18.0.10:30001",
            "quic://203.0.113.9:20002",  # nobody we know: never probed
        ],
    )
    assert punch.predicted_quic == [("198.18.0.10", 20001)]
    assert punch.predicted_tcp == [("198.18.0.10", 30001)]
    # a plan built from it probes the prediction first
    a._traversal._register(punch, bytes([1] * 16))
    try:
        a._traversal._start(punch, asyncio.get_running_loop().time() + 60)
        assert punch.plan is not None and list(punch.plan.predicted) == [("198.18.0.10", 20001)]
    finally:
        a._traversal._unregister(punch)


@pytest.mark.parametrize("predicted", [False, True], ids=["random", "sequential"])
async def test_birthday_probing_waits_one_round_when_ports_were_predicted(
    make: Callable[..., Any], predicted: bool
) -> None:
    """Prediction first: with predictions exchanged, the birthday sockets (symmetric side)
    and the spray (other side) start after the first round; without, at once."""
    from crust.proto.punch import PunchParams
    from crust.traversal import _Punch

    a, _ = await make(listen=BOTH)
    tr = a._traversal
    at = asyncio.get_running_loop().time() + 60  # never reached: only the schedule is looked at
    later = at + PunchParams().round_duration if predicted else at
    for symmetric in (True, False):
        tr.symmetric = symmetric
        punch = _Punch(crust.Identity.generate().peer_id, bytes(16), outbound=True)
        punch.peer_symmetric = not symmetric
        punch.remote_quic = [("198.18.0.11", 7100)]
        if predicted and symmetric:
            punch.advertised_quic = True
        if predicted and not symmetric:
            punch.predicted_quic = [("198.18.0.11", 20001)]
        tr._register(punch, bytes([1] * 16))
        try:
            tr._start(punch, at)
            if symmetric:
                assert punch.prime_at == later and punch.sockets == []
            else:
                assert punch.spray is not None and punch.spray.start == later
        finally:
            tr._unregister(punch)
