"""QUIC specifics on loopback: stateless Retry, garbage resistance, TCP/QUIC racing."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from aioquic._buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.tls import Group

from crust.aio.quic import (
    DialerQuicConnection,
    QuicLink,
    QuicSettings,
    alpn_for,
    datagram_size_for,
    self_signed_certificate,
)
from crust.aio.udp_mux import CID_LENGTH, UdpMux
from crust.events import MessageReceived, PeerConnected, PeerLost
from crust.service import Service

TIMEOUT = 10.0
BOTH = ("tcp://127.0.0.1:0", "quic://127.0.0.1:0")


Make = Callable[..., Any]


def quic_contact(svc: Service) -> str:
    return next(c for c in svc.contacts() if c.startswith("quic://"))


def quic_mux(svc: Service) -> UdpMux:
    return svc._muxes[0]


def client_initial(server: tuple[str, int]) -> tuple[QuicConnection, bytes]:
    """A genuine aioquic client and its first Initial datagram to ``server``."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[alpn_for("crust")],
        connection_id_length=CID_LENGTH,
        verify_mode=ssl.CERT_NONE,
    )
    quic = QuicConnection(configuration=config)
    now = asyncio.get_running_loop().time()
    quic.connect(server, now=now)
    return quic, quic.datagrams_to_send(now=now)[0][0]


class RawClient:
    """A real QUIC client Initial, sent from a plain UDP socket we control."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.quic, self.initial = client_initial(server)
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    def datagrams(self) -> list[bytes]:
        return [d for d, _ in self.quic.datagrams_to_send(now=self.loop.time())]

    async def recv(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            data, _ = await self.loop.sock_recvfrom(self.sock, 65536)
        return data

    def close(self) -> None:
        self.sock.close()


async def test_retry_validates_the_address_before_any_state(make: Make) -> None:
    b, _ = await make()
    mux = quic_mux(b)
    client = RawClient(mux.local_address)
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        initial = client.initial
        assert len(initial) >= 1200
        # 1. a token-less Initial gets a Retry and no connection state
        client.sock.sendto(initial, mux.local_address)
        retry = await client.recv()
        header = pull_quic_header(Buffer(data=retry), host_cid_length=CID_LENGTH)
        assert header.packet_type == QuicPacketType.RETRY and header.token
        assert mux.stats["retries_sent"] == 1
        assert mux.connection_count == 0 and mux.stats["connections_accepted"] == 0
        # 2. the client answers with the token ...
        client.quic.receive_datagram(retry, mux.local_address, client.loop.time())
        with_token = client.datagrams()[0]
        # ... but the same token from another source address (a spoofer who saw it) is
        # refused without state or answer
        spoofer.sendto(with_token, mux.local_address)
        # 3. from the validated address it creates the connection
        client.sock.sendto(with_token, mux.local_address)
        handshake = await client.recv()
        assert pull_quic_header(Buffer(data=handshake), host_cid_length=CID_LENGTH)
        assert mux.stats["invalid_tokens"] == 1
        assert mux.stats["connections_accepted"] == 1 and mux.connection_count == 1
    finally:
        spoofer.close()
        client.close()


async def test_spoofed_initials_create_no_state(make: Make) -> None:
    b, _ = await make()
    mux = quic_mux(b)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        n = 50
        for _ in range(n):
            # fresh Initials "from" an address that never answers the Retry
            sock.sendto(client_initial(mux.local_address)[1], mux.local_address)
        got = 0
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        async with asyncio.timeout(TIMEOUT):
            while got < n:
                data, _ = await loop.sock_recvfrom(sock, 65536)
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
                assert header.packet_type == QuicPacketType.RETRY
                got += 1
        assert mux.connection_count == 0 and mux.stats["retries_sent"] == n
    finally:
        sock.close()


async def test_garbage_datagrams_do_not_disturb_an_established_connection(make: Make) -> None:
    a, wa = await make()
    b, wb = await make()
    peer = await a.connect(quic_contact(b))
    await wb.count(PeerConnected, 1)
    mux = quic_mux(b)
    before = dict(mux.stats)
    live_cids = list(mux._routes)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        junk: list[bytes] = [b"", b"\x00", b"\xff" * 3, b"GET / HTTP/1.0\r\n\r\n"]
        junk += [os.urandom(n) for n in (1, 7, 40, 1200, 1500)]
        junk += [bytes([0x40]) + os.urandom(CID_LENGTH) + os.urandom(60) for _ in range(20)]
        # forged packets carrying the live connection ids: fail authentication in QUIC
        junk += [bytes([0x40 | 0x01]) + cid + os.urandom(80) for cid in live_cids]
        junk += [bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([20]) + os.urandom(40)]
        for i, data in enumerate(junk):
            sock.sendto(data, mux.local_address)
            await a.send(peer, b"m%d" % i)
        got = await wb.count(MessageReceived, len(junk))
    finally:
        sock.close()
    assert [m.data for m in got] == [b"m%d" % i for i in range(len(junk))]
    assert not wa.of(PeerLost) and not wb.of(PeerLost)
    assert b.is_connected(a.peer_id) and a.connection(peer).transport == "quic"
    assert mux.stats["datagrams_received"] > before["datagrams_received"]
    dropped = sum(
        mux.stats[k] - before[k]
        for k in ("dropped_garbage", "dropped_unknown_cid", "other_datagrams")
    )
    assert dropped >= 20


async def test_tcp_and_quic_race_keeps_one_connection(make: Make) -> None:
    for _ in range(3):
        a, wa = await make(connect_stagger=0.0, tcp_head_start=0.0)
        b, wb = await make(connect_stagger=0.0, tcp_head_start=0.0)
        # both dial all of each other's contacts (TCP and QUIC) at the same time
        results = await asyncio.gather(
            *[a.connect(b.contacts()) for _ in range(4)],
            *[b.connect(a.contacts()) for _ in range(4)],
        )
        assert set(results) == {a.peer_id, b.peer_id}
        assert a.peers() == [b.peer_id] and b.peers() == [a.peer_id]
        da, db = a.connection(b.peer_id), b.connection(a.peer_id)
        assert da.transport == db.transport
        assert da.local == db.remote and da.remote == db.local
        for i in range(100):
            await a.send(b.peer_id, b"a%d" % i)
            await b.send(a.peer_id, b"b%d" % i)
        assert [m.data for m in await wb.count(MessageReceived, 100)] == [
            b"a%d" % i for i in range(100)
        ]
        assert [m.data for m in await wa.count(MessageReceived, 100)] == [
            b"b%d" % i for i in range(100)
        ]
        assert not wa.of(PeerLost) and not wb.of(PeerLost)


def _dead_port(kind: socket.SocketKind) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


async def test_several_contacts_raced(make: Make) -> None:
    b, wb = await make()
    tcp = next(c for c in b.contacts() if c.startswith("tcp://"))
    quic = quic_contact(b)
    dead_tcp = f"tcp://127.0.0.1:{_dead_port(socket.SOCK_STREAM)}"
    dead_quic = f"quic://127.0.0.1:{_dead_port(socket.SOCK_DGRAM)}"
    # a generous TCP head start: the live TCP contact wins, QUIC attempts are cancelled
    a, wa = await make(tcp_head_start=1.0, connect_stagger=0.02)
    assert await a.connect([dead_quic, quic, dead_tcp, tcp]) == b.peer_id
    assert a.connection(b.peer_id).transport == "tcp"
    # TCP dead, QUIC alive: QUIC wins after the (short) head start
    c, wc = await make(tcp_head_start=0.05, connect_stagger=0.02)
    assert await c.connect([dead_tcp, dead_quic, quic]) == b.peer_id
    assert c.connection(b.peer_id).transport == "quic"
    ev = (await wc.count(PeerConnected, 1))[0]
    assert ev.transport == "quic" and ev.outbound
    await wb.count(PeerConnected, 2)
    assert sorted(b.peers()) == sorted([a.peer_id, c.peer_id])
    assert not wa.of(PeerLost) and not wc.of(PeerLost)


async def test_client_only_socket_without_quic_listener(make: Make) -> None:
    a, _ = await make(listen=("tcp://127.0.0.1:0",))
    b, wb = await make()
    peer = await a.connect(quic_contact(b))
    await a.send(peer, b"over quic")
    assert (await wb.count(MessageReceived, 1))[0].data == b"over quic"
    assert a.connection(peer).transport == "quic"
    assert not a._muxes and len(a._client_muxes) == 1


def test_aioquic_internals_we_rely_on_still_exist() -> None:
    """crust reads private aioquic attributes (see crust/aio/quic.py); if an aioquic
    upgrade renames them, send backpressure and early close detection would silently stop:
    this test fails loudly instead."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["x"])
    config.verify_mode = ssl.CERT_NONE
    quic = QuicConnection(configuration=config)
    quic.connect(("127.0.0.1", 9), now=0.0)
    assert hasattr(quic, "_close_event")
    stream_id = quic.get_next_available_stream_id()
    quic.send_stream_data(stream_id, b"x" * 5000)
    sender = quic._streams[stream_id].sender
    assert isinstance(sender._buffer_start, int)
    assert isinstance(sender._buffer_stop, int)
    assert sender._buffer_stop - sender._buffer_start == 5000
    # CA certificate modes: the server's switch to request the client's certificate, set
    # right after QuicConnection._initialize, and the certificates the remote presented
    # (test_quic_certs.py runs a whole mutual-certificate handshake through them)
    assert callable(QuicConnection._initialize)
    assert quic.tls._request_client_certificate is False
    assert quic.tls._peer_certificate is None and quic.tls._peer_certificate_chain == []


def test_a_dialer_offers_a_single_x25519_key_share() -> None:
    """The dialer narrows aioquic's private group list so its ClientHello carries one key
    share; the other three keys are never generated."""
    config = QuicConfiguration(is_client=True, alpn_protocols=["x"])
    config.verify_mode = ssl.CERT_NONE
    quic = DialerQuicConnection(configuration=config)
    quic.connect(("127.0.0.1", 9), now=0.0)
    assert quic.tls._supported_groups == [Group.X25519]
    assert quic.tls._x25519_private_key is not None
    assert quic.tls._x448_private_key is None and quic.tls._ec_private_keys == []


@pytest.mark.parametrize(("configured", "expected"), [(None, 16_384), (1200, 1200), (1350, 1350)])
async def test_datagram_size_is_configured_or_chosen_by_path(
    make: Make, configured: int | None, expected: int
) -> None:
    """Loopback gets the largest datagrams aioquic can fill correctly unless configured;
    data crosses intact either way (stream frames cut at every packet size)."""
    a, _ = await make(quic_max_datagram_size=configured)
    b, wb = await make(quic_max_datagram_size=configured)
    peer = await a.connect(quic_contact(b))
    assert datagram_size_for("127.0.0.1", configured) == expected
    assert datagram_size_for("::1", configured) == expected
    assert datagram_size_for("198.51.100.7", configured) == (configured or 1350)
    sizes = {
        link.quic.configuration.max_datagram_size
        for svc in (a, b)
        for mux in (*svc._muxes, *svc._client_muxes.values())
        for link in mux._clients
        if isinstance(link, QuicLink)
    }
    assert sizes == {expected}
    data = random.Random(7).randbytes(300_000)
    await a.send(peer, data)
    assert (await wb.count(MessageReceived, 1))[0].data == data


SERVER = ("127.0.0.2", 4433)
CLIENT = ("127.0.0.3", 5555)


def _handshaken_pair() -> tuple[QuicConnection, QuicConnection, float]:
    """An aioquic client and server, handshake done in memory; returns them and `now`."""
    cert, key = self_signed_certificate()
    client = QuicConnection(
        configuration=QuicConfiguration(
            is_client=True, alpn_protocols=["x"], verify_mode=ssl.CERT_NONE
        )
    )
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["x"])
    server_config.certificate, server_config.private_key = cert, key
    now = 0.0
    client.connect(SERVER, now=now)
    first = client.datagrams_to_send(now=now)
    header = pull_quic_header(Buffer(data=first[0][0]), host_cid_length=8)
    server = QuicConnection(
        configuration=server_config,
        original_destination_connection_id=header.destination_cid,
    )
    pending = [(server, d) for d, _ in first]
    for _ in range(50):
        if not pending:
            break
        now += 0.001
        for target, data in pending:
            target.receive_datagram(data, SERVER if target is client else CLIENT, now)
        pending = [(server, d) for d, _ in client.datagrams_to_send(now=now)]
        pending += [(client, d) for d, _ in server.datagrams_to_send(now=now)]
    assert client._handshake_complete and server._handshake_complete
    return client, server, now


def test_aioquic_pacing_time_we_read_still_means_what_we_assume() -> None:
    """QuicLink._transmit keeps calling datagrams_to_send while the private
    ``_pacing_at`` has passed: it must be the time pacing allows the next packet."""
    client, _server, now = _handshaken_pair()
    stream_id = client.get_next_available_stream_id()
    client.send_stream_data(stream_id, bytes(200_000))
    sent = client.datagrams_to_send(now=now)
    assert sent  # the bucket allowed a few packets, then pacing held the rest back
    pacing_at = client._pacing_at
    assert isinstance(pacing_at, float) and pacing_at > now
    timer = client.get_timer()
    assert timer is not None and timer <= pacing_at
    assert client.datagrams_to_send(now=now) == []  # still held back at the same time
    assert client.datagrams_to_send(now=pacing_at)  # released once that time has come


class _RecordingMux:
    """Just enough of a UdpMux for one QuicLink: records each transmit's datagrams."""

    local_address = ("127.0.0.1", 5555)

    def __init__(self) -> None:
        self.transmits: list[list[bytes]] = []
        self.sent = asyncio.Event()

    def add_client(self, link: object) -> None:
        pass

    def register(self, cid: bytes, link: object) -> None:
        pass

    def unregister(self, cid: bytes, link: object) -> None:
        pass

    def remove_client(self, link: object) -> None:
        pass

    def send_datagrams(self, datagrams: list[tuple[bytes, Any]]) -> None:
        self.transmits.append([d for d, _ in datagrams])
        self.sent.set()


async def test_dialler_first_stream_bytes_leave_with_its_handshake_finished() -> None:
    """When the dialler's QUIC handshake completes, its Finished waits one loop iteration
    so that what the dialling task writes at once (crust's first Noise message) shares the
    datagram: one flight less per connection."""
    settings = QuicSettings.self_signed("crust", idle_timeout=30.0, handshake_timeout=5.0)
    mux = _RecordingMux()
    link = QuicLink.dial(mux, SERVER, settings)  # type: ignore[arg-type]
    cert, key = self_signed_certificate()
    server_config = QuicConfiguration(is_client=False, alpn_protocols=[settings.alpn])
    server_config.certificate, server_config.private_key = cert, key
    first = mux.transmits[0][0]
    header = pull_quic_header(Buffer(data=first), host_cid_length=CID_LENGTH)
    server = QuicConnection(
        configuration=server_config, original_destination_connection_id=header.destination_cid
    )
    loop = asyncio.get_running_loop()
    try:
        for data in mux.transmits.pop(0):
            server.receive_datagram(data, CLIENT, loop.time())
        for _ in range(10):  # server flight(s) until the dialler's handshake completes
            for data, _ in server.datagrams_to_send(now=loop.time()):
                link.datagram_received(data, SERVER, loop.time())
            mux.sent.clear()
            link.after_batch()
            if link.ready.done():
                break
            for datagrams in mux.transmits:
                for data in datagrams:
                    server.receive_datagram(data, CLIENT, loop.time())
            mux.transmits.clear()
        assert link.ready.done() and link.ready.exception() is None
        assert mux.transmits == []  # the Finished is held back for one loop iteration ...
        link.writelines([b"noise msg1"])  # ... what the resumed dialling task writes
        async with asyncio.timeout(5):
            await mux.sent.wait()
        assert len(mux.transmits) == 1
        for data in mux.transmits[0]:
            server.receive_datagram(data, CLIENT, loop.time())
        events = []
        while (ev := server.next_event()) is not None:
            events.append(ev)
        kinds = [type(e).__name__ for e in events]
        assert "HandshakeCompleted" in kinds  # the Finished arrived ...
        assert any(  # ... in the same transmit as the stream data
            isinstance(e, qe.StreamDataReceived) and e.data == b"noise msg1" for e in events
        )
    finally:
        link.abort()
        link.detach()
