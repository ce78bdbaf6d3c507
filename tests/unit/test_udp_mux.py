"""The UDP demultiplexer: header parsing and routing never raise, every datagram is counted."""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.aio.udp_mux import (
    CID_LENGTH,
    SOCKET_BUFFER,
    STAT_NAMES,
    Address,
    DatagramSender,
    UdpMux,
    enlarge_buffers,
    parse_dcid,
)

KNOWN_CID = bytes(range(1, CID_LENGTH + 1))
PEER: Address = ("127.0.0.1", 9)  # discard port: Retry packets sent there go nowhere
# counters that classify a datagram (each routed datagram bumps exactly one, or is delivered)
CLASSIFY = [
    n for n in STAT_NAMES if n not in ("datagrams_received", "datagrams_sent", "send_dropped")
]


class FakeLink:
    """An established connection registered under KNOWN_CID."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.aborted = False
        self.batches = 0

    @property
    def handshake_done(self) -> bool:
        return True

    @property
    def accepting_datagrams(self) -> bool:
        return True

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None:
        self.received.append(data)

    def after_batch(self) -> None:
        self.batches += 1

    def abort(self) -> None:
        self.aborted = True

    def detach(self) -> None:
        pass


class Refuser:
    calls = 0

    def __call__(
        self, mux: UdpMux, addr: Address, original_dcid: bytes, retry_scid: bytes | None
    ) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def mux_and_link() -> Iterator[tuple[UdpMux, FakeLink, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()

    async def make() -> UdpMux:
        return UdpMux.bind("127.0.0.1", 0, acceptor=Refuser())

    mux = loop.run_until_complete(make())
    link = FakeLink()
    mux.add_client(link)
    mux.register(KNOWN_CID, link)
    yield mux, link, loop
    mux.close()
    loop.close()


def _short(cid: bytes, payload: bytes) -> bytes:
    return bytes([0x40]) + cid + payload


def _long(first: int, version: bytes, dcid: bytes, rest: bytes) -> bytes:
    return bytes([first | 0x80]) + version + bytes([len(dcid)]) + dcid + rest


datagrams = st.one_of(
    st.binary(max_size=1500),
    st.builds(_short, st.binary(min_size=CID_LENGTH, max_size=CID_LENGTH), st.binary()),
    st.builds(_short, st.just(KNOWN_CID), st.binary(max_size=200)),
    st.builds(
        _long,
        st.integers(0, 255),
        st.sampled_from([b"\x00\x00\x00\x01", b"\x6b\x33\x43\xcf", b"\x00\x00\x00\x00"]),
        st.one_of(st.binary(max_size=25), st.just(KNOWN_CID)),
        st.binary(max_size=1400),
    ),
    # padded long-header "Initials": exercise the header parser and Retry path
    st.builds(
        lambda b, dcid, rest: _long(b & 0xCF, b"\x00\x00\x00\x01", dcid, rest.ljust(1250, b"\0")),
        st.integers(0, 255),
        st.binary(min_size=8, max_size=20),
        st.binary(max_size=64),
    ),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_parse_dcid_never_raises(data: bytes) -> None:
    dcid = parse_dcid(data)
    assert dcid is None or len(dcid) <= 20


@settings(
    max_examples=800,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(datagrams)
def test_any_datagram_is_routed_or_counted(
    mux_and_link: tuple[UdpMux, FakeLink, asyncio.AbstractEventLoop], data: bytes
) -> None:
    mux, link, _ = mux_and_link
    before = sum(mux.stats[n] for n in CLASSIFY)
    delivered = len(link.received)
    client = mux._route(memoryview(data), PEER, 0.0)
    after = sum(mux.stats[n] for n in CLASSIFY)
    if client is link:
        # only datagrams addressed to the established connection reach it
        assert len(link.received) == delivered + 1
        assert parse_dcid(data) == KNOWN_CID
    else:
        assert client is None
        assert len(link.received) == delivered
        assert after == before + 1
    assert not link.aborted
    assert mux.connection_count == 1  # the refusing acceptor never adds state


def test_routing_table_follows_connection_ids(
    mux_and_link: tuple[UdpMux, FakeLink, asyncio.AbstractEventLoop],
) -> None:
    mux, link, _ = mux_and_link
    new = b"\xaa" * CID_LENGTH
    mux.register(new, link)
    assert mux._route(memoryview(_short(new, b"x" * 30)), PEER, 0.0) is link
    mux.unregister(new, link)
    assert mux._route(memoryview(_short(new, b"x" * 30)), PEER, 0.0) is None
    assert mux.client_for(KNOWN_CID) is link


async def test_socket_reader_drains_batches_and_hooks_other_datagrams() -> None:
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    got: list[bytes] = []
    reached = asyncio.Event()
    target = 0
    rounds, per_round = 10, 40

    def other(data: bytes, addr: Address) -> None:
        got.append(data)
        if len(got) >= target:
            reached.set()

    mux.on_other_datagram = other
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for r in range(rounds):
            reached.clear()
            target = (r + 1) * per_round
            for i in range(r * per_round, target):
                # STUN-like: the two top bits clear, so not QUIC; interleaved with QUIC garbage
                sender.sendto(b"\x00\x01" + i.to_bytes(4, "big"), mux.local_address)
                sender.sendto(b"\x41" + bytes(20), mux.local_address)
            async with asyncio.timeout(10):
                await reached.wait()
    finally:
        sender.close()
        mux.close()
    n = rounds * per_round
    assert [int.from_bytes(d[2:], "big") for d in got] == list(range(n))
    assert mux.stats["other_datagrams"] == n
    assert mux.stats["dropped_unknown_cid"] >= n - 1  # the last one may still be unread


def _rmem_max() -> int | None:
    try:
        with open("/proc/sys/net/core/rmem_max") as f:
            return int(f.read())
    except OSError:
        return None


async def test_socket_buffers_are_enlarged_within_the_kernel_limits() -> None:
    """Full-size datagrams in flight must fit the receive buffer, else the kernel drops
    them and QUIC halves its window; Linux grants min(request, rmem_max), doubled."""
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    default_rcv = plain.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    plain.close()
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    try:
        rcv, snd = mux.buffer_sizes
        assert rcv == mux.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert snd == mux.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rmem_max = _rmem_max()
        if rmem_max is not None:  # Linux
            assert rcv >= min(SOCKET_BUFFER, rmem_max)
        assert rcv >= default_rcv
    finally:
        mux.close()


class _Receiver:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        enlarge_buffers(self.sock, SOCKET_BUFFER)  # the whole batch arrives at once
        self.addr: Address = self.sock.getsockname()[:2]
        self.got: list[bytes] = []

    async def expect(self, n: int) -> list[bytes]:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(10):
            while len(self.got) < n:
                self.got.append(await loop.sock_recv(self.sock, 65_536))
        return self.got


def _batch(a: Address, b: Address) -> list[tuple[bytes, Address]]:
    """Runs of equal sizes, a shorter datagram ending a run, another address in between."""
    out: list[tuple[bytes, Address]] = []
    n = 0
    for addr, sizes in (
        (a, [1350] * 50 + [700]),
        (b, [1350] * 3),
        (a, [900, 1350, 1350, 1350]),
        (a, [16_384] * 7 + [100]),
        (b, [1200]),
    ):
        for size in sizes:
            out.append((n.to_bytes(4, "big") * (size // 4), addr))
            n += 1
    return out


class _RefusingSocket:
    """A socket whose kernel refuses UDP GSO (EIO), as on a device without checksum
    offload."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.family = sock.family

    def sendmsg(self, *args: object) -> int:
        raise OSError(errno.EIO, "GSO refused")

    def sendto(self, data: bytes, addr: Address) -> int:
        return self._sock.sendto(data, addr)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("gso", ["kernel", "refused"])
async def test_send_datagrams_keeps_every_datagram_and_its_order(gso: str) -> None:
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    ra, rb = _Receiver(), _Receiver()
    try:
        if gso == "refused":
            mux.sender.sock = _RefusingSocket(mux.sock)  # type: ignore[assignment]
        batch = _batch(ra.addr, rb.addr)
        mux.send_datagrams(batch)
        want_a = [d for d, addr in batch if addr == ra.addr]
        want_b = [d for d, addr in batch if addr == rb.addr]
        assert await ra.expect(len(want_a)) == want_a
        assert await rb.expect(len(want_b)) == want_b
        assert mux.stats["datagrams_sent"] == len(batch)
        assert mux.stats["send_dropped"] == 0
        if gso == "refused":
            assert not mux.sender.gso
        if mux.sender.gso:
            # 50 x 1350 + 700 -> 48 + 3; 3 x 1350; 900 ends its run at once; 3 x 1350;
            # 7 x 16384 + 100 -> 3 + 3 + 2
            assert mux.stats["gso_sends"] == 7
    finally:
        mux.close()
        ra.sock.close()
        rb.sock.close()


async def test_coalesced_datagrams_are_cut_apart_again() -> None:
    """GSO sends and GRO receives (Linux) move many datagrams per system call; the mux must
    still see each datagram alone, whole and in order (here: non-QUIC ones, to the hook)."""
    mux = UdpMux.bind("127.0.0.1", 0, acceptor=None)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind(("127.0.0.1", 0))
    out.setblocking(False)
    enlarge_buffers(out, SOCKET_BUFFER)
    stats = dict.fromkeys(STAT_NAMES, 0)
    sender = DatagramSender(out, stats)
    got: list[bytes] = []
    done = asyncio.Event()
    # first byte 0x00: not QUIC, so each datagram goes to the hook as it was received
    sent = [bytes([0, i % 256]) + bytes([i % 251]) * (size - 2) for i, size in _sizes()]

    def other(data: bytes, addr: Address) -> None:
        got.append(data)
        if len(got) == len(sent):
            done.set()

    mux.on_other_datagram = other
    try:
        sender.send([(d, mux.local_address) for d in sent])
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        out.close()
        mux.close()
    assert got == sent
    assert mux.stats["datagrams_received"] == len(sent)
    if sys.platform == "linux":
        assert mux.receiver.gro and sender.gso
        assert stats["gso_sends"] < len(sent) // 10


def _sizes() -> list[tuple[int, int]]:
    sizes = [1350] * 100 + [600] + [1200] * 30 + [16_384] * 9 + [40] + [1350] * 3
    return list(enumerate(sizes))
