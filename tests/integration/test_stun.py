"""STUN over loopback: client on its own socket and on crust's UdpMux, server, RFC 5780 prober.

127.0.0.1 and 127.0.0.2 are both loopback addresses on Linux, which gives an RFC 5780 server
its two IPs without any setup.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from crust.aio.stun import NatProber, StunDispatcher, StunServer, stun_binding
from crust.aio.udp_mux import Address, UdpMux
from crust.errors import ConfigError, LimitExceeded, ServiceClosed
from crust.proto import stun
from crust.proto.natclass import FilteringBehavior, MappingBehavior, PortAllocation
from crust.proto.stun import ChangeRequest, StunErrorResponse, StunResponder, StunTimeout


def _has_127_0_0_2() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


needs_two_loopback_ips = pytest.mark.skipif(
    not _has_127_0_0_2(), reason="127.0.0.2 is not a loopback address here"
)


@pytest.fixture
async def server() -> AsyncIterator[StunServer]:
    async with await StunServer.start(("127.0.0.1", 0), software="crust-test") as srv:
        yield srv


@pytest.fixture
async def rfc5780_server() -> AsyncIterator[StunServer]:
    if not _has_127_0_0_2():
        pytest.skip("127.0.0.2 is not a loopback address here")
    async with await StunServer.start(("127.0.0.1", 0), "127.0.0.2") as srv:
        yield srv


@pytest.fixture
def black_hole() -> Iterator[socket.socket]:
    """A bound UDP socket that never answers (datagrams to it are simply not read)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield s
    finally:
        s.close()


def addr_of(s: socket.socket) -> Address:
    host, port = s.getsockname()[:2]
    return str(host), int(port)


async def test_binding_on_own_socket(server: StunServer) -> None:
    async with StunDispatcher.open("127.0.0.1") as d:
        assert d.local_address is not None
        r = await d.binding(server.address, timeout=5)
        assert r.mapped == d.local_address
        assert r.server == server.address
        assert r.source == server.address
        assert r.response_origin == server.address
        assert r.other_address is None
        assert r.software == "crust-test"
        assert r.transmissions == 1
        assert 0 <= r.rtt < 5
    assert server.responder.stats["responses"] == 1


async def test_binding_on_a_plain_socket_leaves_it_usable(server: StunServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        r = await stun_binding(s, server.address, timeout=5)
        assert r.mapped == addr_of(s)
        # the temporary dispatcher is gone: the socket is the caller's again
        r2 = await stun_binding(s, server.address, timeout=5)
        assert r2.mapped == r.mapped
        assert s.fileno() >= 0


async def test_binding_through_udp_mux_shares_the_quic_socket(server: StunServer) -> None:
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    try:
        r = await stun_binding(mux, server.address, timeout=5)
        assert r.mapped == mux.local_address
        assert StunDispatcher.for_mux(mux) is StunDispatcher.for_mux(mux)  # one per mux
        d = StunDispatcher.for_mux(mux)
        assert d.stats["responses_matched"] == 1
        assert mux.stats["other_datagrams"] == 1
        assert mux.stats["datagrams_sent"] == 1
    finally:
        mux.close()


async def test_mux_handlers_share_non_quic_datagrams() -> None:
    """STUN goes to the dispatcher; other non-QUIC datagrams reach later handlers/the hook."""
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    punches: list[bytes] = []
    hooked: list[bytes] = []
    done = asyncio.Event()

    def punch_handler(data: bytes, addr: Address) -> bool:
        if data.startswith(b"\x00PUNCH"):
            punches.append(data)
            return True
        return False

    def hook(data: bytes, addr: Address) -> None:
        hooked.append(data)
        done.set()

    d = StunDispatcher.for_mux(mux)
    d.responder = StunResponder()
    mux.add_datagram_handler(punch_handler)
    mux.on_other_datagram = hook
    try:
        async with StunDispatcher.open("127.0.0.1") as client:
            r = await client.binding(mux.local_address, timeout=5)  # answered by the mux
            assert r.mapped == client.local_address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00PUNCH-1", mux.local_address)
            s.sendto(b"\x00other", mux.local_address)
            async with asyncio.timeout(5):
                await done.wait()
        assert punches == [b"\x00PUNCH-1"]
        assert hooked == [b"\x00other"]
        assert d.stats["requests_answered"] == 1
        mux.remove_datagram_handler(punch_handler)
        d.close()  # detaches from the mux; for_mux makes a fresh one
        assert StunDispatcher.for_mux(mux) is not d
    finally:
        mux.close()


async def test_ipv6_loopback(server: StunServer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        srv6 = await StunServer.start(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    async with srv6, StunDispatcher.open("::1") as d:
        r = await d.binding(srv6.address, timeout=5)
        assert r.mapped == ("::1", d.local_address[1] if d.local_address else 0)
        assert r.response_origin == ("::1", srv6.address[1])


async def test_timeout_retransmits_then_raises(black_hole: socket.socket) -> None:
    async with StunDispatcher.open("127.0.0.1") as d:
        with pytest.raises(StunTimeout, match="no STUN response"):
            await d.binding(addr_of(black_hole), timeout=1.0, rto=0.1)
        # 0, .1, .3, .7 s: four transmissions before the caller's deadline (the next is at 1.5)
        black_hole.setblocking(False)
        seen = 0
        while True:
            try:
                data = black_hole.recv(2048)
            except BlockingIOError:
                break
            assert stun.parse(data).cls == stun.StunClass.REQUEST
            seen += 1
        assert seen == 4
        # the RFC 8489 schedule alone also ends the transaction (Rc=2, Rm=2: 0, .05; +.1)
        with pytest.raises(StunTimeout, match="2 transmissions"):
            await d.binding(addr_of(black_hole), timeout=5, rto=0.05, rc=2, rm=2)


async def test_error_response_and_concurrent_transactions(server: StunServer) -> None:
    async with StunDispatcher.open("127.0.0.1") as d:
        with pytest.raises(StunErrorResponse) as info:
            await d.binding(server.address, change_request=ChangeRequest(True, True), timeout=5)
        assert info.value.code == 420
        results = await asyncio.gather(*(d.binding(server.address, timeout=5) for _ in range(20)))
        assert {r.mapped for r in results} == {d.local_address}
        d.max_transactions = 2
        tasks = [asyncio.create_task(d.binding(server.address, timeout=5)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(LimitExceeded):
            await d.binding(server.address, timeout=5)
        await asyncio.gather(*tasks)


async def test_close_fails_pending_transactions(black_hole: socket.socket) -> None:
    d = StunDispatcher.open("127.0.0.1")
    task = asyncio.create_task(d.binding(addr_of(black_hole), timeout=10))
    await asyncio.sleep(0)
    d.close()
    with pytest.raises(ServiceClosed):
        await task
    with pytest.raises(ServiceClosed):
        await d.binding(addr_of(black_hole))


async def test_response_port_sends_the_answer_elsewhere(server: StunServer) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as asker,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
    ):
        asker.bind(("127.0.0.1", 0))
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        txid = bytes(range(12))
        req = stun.encode(stun.request(txid, response_port=addr_of(receiver)[1], padding=64))
        asker.sendto(req, server.address)
        data = await asyncio.to_thread(receiver.recv, 2048)
        msg = stun.parse(data)
        assert msg.transaction_id == txid
        assert msg.xor_mapped_address == addr_of(asker)
        assert len(data) <= len(req)


async def test_dispatcher_ignores_garbage(server: StunServer) -> None:
    async with StunDispatcher.open("127.0.0.1") as d:
        assert d.local_address is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\xc3 not stun", d.local_address)
            s.sendto(stun.encode(stun.request(bytes(12)))[:-1] + b"\x00", d.local_address)
            s.sendto(
                stun.encode(stun.StunMessage(stun.StunClass.SUCCESS, bytes(12))), d.local_address
            )
        r = await d.binding(server.address, timeout=5)  # still works, after the garbage
        assert r.mapped == d.local_address
        assert d.stats["not_stun"] >= 1
        assert d.stats["malformed"] + d.stats["unmatched"] >= 1


async def test_hairpin_probe(black_hole: socket.socket) -> None:
    async with StunDispatcher.open("127.0.0.1") as d:
        assert d.local_address is not None
        assert await d.hairpin(d.local_address, timeout=2)
        assert not await d.hairpin(addr_of(black_hole), timeout=0.3, interval=0.1)
        assert d.stats["hairpin_seen"] >= 1


@needs_two_loopback_ips
async def test_rfc5780_server_answers_change_requests(rfc5780_server: StunServer) -> None:
    grid = rfc5780_server.addresses
    assert grid.alternate is not None
    (ip1, p1), (ip2, p2) = grid.primary, grid.alternate
    async with StunDispatcher.open("127.0.0.1") as d:
        for change, origin in [
            (ChangeRequest(False, False), (ip1, p1)),
            (ChangeRequest(True, True), (ip2, p2)),
            (ChangeRequest(False, True), (ip1, p2)),
            (ChangeRequest(True, False), (ip2, p1)),
        ]:
            r = await d.binding(grid.primary, change_request=change, timeout=5)
            assert r.source == origin
            assert r.response_origin == origin
            assert r.other_address == (ip2, p2)
            assert r.mapped == d.local_address


@needs_two_loopback_ips
async def test_nat_prober_rfc5780_on_loopback(rfc5780_server: StunServer) -> None:
    c = await NatProber(server=rfc5780_server.address, bind=("127.0.0.1", 0)).run()
    assert c.nat_type == "none"
    assert c.behind_nat is False
    assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT
    assert c.filtering == FilteringBehavior.ENDPOINT_INDEPENDENT
    assert c.port_preservation is True
    assert c.hairpinning is True
    assert c.port_allocation == PortAllocation.STABLE
    assert len(c.observations) == 4
    assert {o.server[0] for o in c.observations} == {"127.0.0.1", "127.0.0.2"}
    assert c.notes == ()
    d = c.to_dict()
    assert d["nat_type"] == "none"
    assert all(o["rtt"] is not None for o in d["observations"])


@needs_two_loopback_ips
async def test_nat_prober_with_plain_observers() -> None:
    async with (
        await StunServer.start(("127.0.0.1", 0)) as s1,
        await StunServer.start(("127.0.0.1", 0)) as s2,
        await StunServer.start(("127.0.0.2", 0)) as s3,
        StunDispatcher.open("127.0.0.1") as d,
    ):
        c = await NatProber(d, observers=[s1.address, s2.address, s3.address]).run()
        assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT
        assert c.filtering == FilteringBehavior.UNKNOWN
        assert c.behind_nat is False
        assert c.nat_type == "none"
        assert c.mapped == d.local_address
        assert len(c.observations) == 3
        # a primary server without RFC 5780 is reported as such
        c = await NatProber(d, server=s1.address, observers=[s3.address]).run()
        assert any("RFC 5780" in n for n in c.notes)
        assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT


async def test_nat_prober_reports_unreachable_servers(black_hole: socket.socket) -> None:
    c = await NatProber(
        server=addr_of(black_hole), bind=("127.0.0.1", 0), timeout=0.3, rto=0.1
    ).run()
    assert c.mapped is None
    assert c.nat_type == "unknown"
    assert any("no STUN response" in n for n in c.notes)
    with pytest.raises(ConfigError, match="server"):
        NatProber()
    with pytest.raises(ConfigError, match="timeout"):
        NatProber(server=("127.0.0.1", 1), timeout=0)


async def test_mux_dispatcher_does_not_keep_the_mux_alive() -> None:
    import gc
    import weakref

    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    d = StunDispatcher.for_mux(mux)
    ref = weakref.ref(mux)
    mux.close()
    with pytest.raises(ServiceClosed):
        StunDispatcher.for_mux(mux)
    del mux, d
    gc.collect()
    assert ref() is None
