"""Loopback QUIC benchmark: crust over QUIC against bare aioquic, in one run.

Run ``python -m benchmarks.bench_quic [--json] [--quick] [--datagram-sizes 1350,16384]``,
or import :func:`run`.

Sender and receiver run in two separate processes (``multiprocessing`` with ``spawn``, the
harness of :mod:`benchmarks.common`), on 127.0.0.1 only.  Each crust figure is paired with
the same measurement on bare aioquic in the same run, with the same maximum datagram size,
and reported as ``ratio = crust / bare``:

* bulk throughput (MB/s of payload, 1 MB = 10**6 B) for 64 B, 64 KiB and 1 MiB messages
  and 64 B messages/s, one connection, for every datagram size asked for;
* QUIC connection setup: sequential new connections (connect until usable, a 64 B probe
  and its echo, close) with the p50/p99 connect time and the rate, and the rate with
  concurrent clients.

The bare baseline is aioquic's sans-IO ``QuicConnection`` driven directly: one UDP socket
read in batches (``add_reader`` + ``recvfrom_into``, up to 64 datagrams per callback), one
``datagrams_to_send`` + ``sendto`` per datagram after each batch, one ``call_at`` timer per
connection; messages are length-prefixed (4 bytes) on the client's first bidirectional
stream, with the send back-pressure crust used before tuning (pause above 1 MiB of
unacknowledged stream data, resume below 256 KiB).  Its server certificate is verified
by the client (a pinned self-signed certificate), so both sides' handshakes authenticate
the server; crust's also authenticate the client (Noise XX inside the stream) and use
stateless Retry.  No crust code runs in it.

Bulk transfers also run a third driver, "tuned": the same bare driver with crust's socket
and send tuning (4 MiB socket buffers, GSO and GRO through crust's ``DatagramSender`` and
``DatagramReceiver``, every packet aioquic's pacing already allows built in one transmit,
a transmit at once every 256 KiB written, crust's send window).  crust against it shows
what crust's own layers (Noise, framing, events) cost on an identical driver; its rows have
no target.

Every phase is bounded in count and in time; the worker processes are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import os
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any

from aioquic._buffer import Buffer
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks import common
from benchmarks.common import (
    SMALL,
    T0,
    BulkPlan,
    Handler,
    KiB,
    MiB,
    Progress,
    WorkerPair,
    bulk_once,
    clock,
    figure,
    host_port,
    median,
    probe,
    run_step,
    size_name,
    summary_ms,
)
from crust.aio import quic as crust_quic
from crust.aio.udp_mux import (
    SOCKET_BUFFER,
    STAT_NAMES,
    DatagramReceiver,
    DatagramSender,
    enlarge_buffers,
)
from crust.config import MAX_QUIC_DATAGRAM

SIZES = (SMALL, 64 * KiB, MiB)
DATAGRAM_SIZES = (crust_quic.INTERNET_DATAGRAM_SIZE, crust_quic.LOOPBACK_DATAGRAM_SIZE)
"""Datagram sizes measured by default: crust's default on the internet and on loopback."""
RATIO_TARGET = 1.0

# bare aioquic: the flow-control windows crust uses, and the send back-pressure crust used
# before tuning (the "tuned" bare driver uses crust's current one)
BARE_MAX_DATA = 16 * MiB
BARE_MAX_STREAM_DATA = 8 * MiB
WRITE_HIGH_WATER = 1 * MiB
WRITE_LOW_WATER = 256 * KiB
PACING_ROUNDS = 32
RECV_BUFFER = 65_536
RECV_BATCH = 64
INLINE_FRAME = 16 * KiB
"""Messages up to this size are written as one ``prefix + payload`` stream write."""
BARE_ALPN = "bench-bare"
BARE_SERVER_NAME = "localhost"

_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Plan(BulkPlan):
    """How much work each measurement does (beyond the bulk transfers)."""

    connect_count: int
    connect_warmup: int
    cycles_count: int
    concurrency: int


FULL = Plan(
    total_bytes=128 * MiB,
    max_messages=100_000,
    repeats=3,
    connect_count=100,
    connect_warmup=5,
    cycles_count=200,
    concurrency=8,
    timeout=180.0,
)
QUICK = Plan(
    total_bytes=8 * MiB,
    max_messages=10_000,
    repeats=1,
    connect_count=20,
    connect_warmup=2,
    cycles_count=32,
    concurrency=8,
    timeout=60.0,
)


# =============================================================================== bare aioquic


def bare_certificate() -> dict[str, bytes]:
    """A self-signed ECDSA P-256 certificate for ``localhost`` and its key, as PEM; the
    bare client pins it as its only trust anchor."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BARE_SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(BARE_SERVER_NAME)]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return {
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }


def bare_configuration(cmd: dict[str, Any], *, is_client: bool) -> QuicConfiguration:
    tls: dict[str, bytes] = cmd["tls"]
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[BARE_ALPN],
        max_datagram_size=cmd["datagram_size"],
        max_data=BARE_MAX_DATA,
        max_stream_data=BARE_MAX_STREAM_DATA,
        idle_timeout=60.0,
    )
    if is_client:
        config.verify_mode = ssl.CERT_REQUIRED
        config.cadata = tls["cert"]
        config.server_name = BARE_SERVER_NAME
    else:
        config.certificate = x509.load_pem_x509_certificate(tls["cert"])
        key = serialization.load_pem_private_key(tls["key"], password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        config.private_key = key
    return config


class Framer:
    """Length-prefixed (4-byte) messages out of a byte stream, each delivered as bytes."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self._buf = bytearray()
        self._on_message = on_message

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        n = len(buf)
        pos = 0
        with memoryview(buf) as view:
            while n - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                end = pos + 4 + size
                if end > n:
                    break
                self._on_message(view[pos + 4 : end].tobytes())
                pos = end
        if pos:
            del buf[:pos]


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Mark a failure as seen (a server link's handshake future has no reader)."""
    if not fut.cancelled():
        fut.exception()


def frame(payload: bytes) -> list[bytes]:
    """The stream writes for one message."""
    if len(payload) <= INLINE_FRAME:
        return [_LEN.pack(len(payload)) + payload]
    return [_LEN.pack(len(payload)), payload]


class BareLink:
    """One aioquic connection on a :class:`BareEndpoint`; messages on stream 0."""

    def __init__(self, endpoint: BareEndpoint, quic: QuicConnection, addr: tuple[str, int]):
        self.endpoint = endpoint
        self.quic = quic
        self.addr = addr
        self.stream_id = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_message: Callable[[BareLink, bytes], None] = lambda _link, _data: None
        self._framer = Framer(lambda data: self.on_message(self, data))
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._scheduled = False
        self._untransmitted = 0
        self._drain: asyncio.Future[None] | None = None
        self.handshake.add_done_callback(_retrieve)
        self.high_water, self.low_water = (
            (crust_quic.WRITE_HIGH_WATER, crust_quic.WRITE_LOW_WATER)
            if endpoint.tuned
            else (WRITE_HIGH_WATER, WRITE_LOW_WATER)
        )

    def process(self) -> None:
        quic = self.quic
        while (ev := quic.next_event()) is not None:
            if isinstance(ev, qe.StreamDataReceived):
                if ev.stream_id == self.stream_id and ev.data:
                    self._framer.feed(ev.data)
            elif isinstance(ev, qe.HandshakeCompleted):
                if not self.handshake.done():
                    self.handshake.set_result(None)
            elif isinstance(ev, qe.ConnectionTerminated):
                self._terminated(ev)
                return
        if self._drain is not None and self.unacked() <= self.low_water:
            self._wake()

    def _terminated(self, ev: qe.ConnectionTerminated) -> None:
        if not self.handshake.done():
            reason = ev.reason_phrase or f"error 0x{ev.error_code:x}"
            self.handshake.set_exception(ConnectionError(f"QUIC connection closed: {reason}"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.endpoint.forget(self)

    def _wake(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def transmit(self) -> None:
        self._scheduled = False
        self._untransmitted = 0
        if self.closed.done():
            return
        quic = self.quic
        time_now = self._loop.time
        datagrams = quic.datagrams_to_send(now=time_now())
        if self.endpoint.tuned:  # crust's driver: build every packet pacing already allows
            for _ in range(PACING_ROUNDS - 1):
                pacing_at = quic._pacing_at
                if pacing_at is None or pacing_at > time_now():
                    break
                more = quic.datagrams_to_send(now=time_now())
                if not more:
                    break
                datagrams += more
        if datagrams:
            self.endpoint.send(datagrams)
        when = self.quic.get_timer()
        if when != self._timer_at or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self._loop.time())
        self.process()
        self.transmit()

    def transmit_soon(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.transmit)

    def send(self, payload: bytes) -> None:
        for part in frame(payload):
            self.quic.send_stream_data(self.stream_id, part)
        if self.endpoint.tuned:  # crust's driver: transmit at once every 256 KiB written
            self._untransmitted += len(payload) + _LEN.size
            if self._untransmitted >= crust_quic.TRANSMIT_EARLY:
                self.transmit()
                return
        self.transmit_soon()

    def unacked(self) -> int:
        """Stream bytes written and not yet acknowledged (aioquic has no public API for it;
        crust reads the same attributes)."""
        stream = self.quic._streams.get(self.stream_id)
        if stream is None:
            return 0
        return int(stream.sender._buffer_stop - stream.sender._buffer_start)

    async def drain(self) -> None:
        """Wait while more than the high-water mark is unacknowledged."""
        while self.unacked() > self.low_water:
            if self.closed.done():
                raise ConnectionError("connection closed while sending")
            self._drain = self._loop.create_future()
            await self._drain

    def close(self) -> None:
        if not self.closed.done():
            self.quic.close()
            self.transmit()


class BareEndpoint:
    """One UDP socket for aioquic connections, demultiplexed by the peer's address (each
    bare client uses a socket of its own).  With ``server_config`` set, an Initial from a
    new address creates a server connection (``on_accept`` is told)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        server_config: QuicConfiguration | None = None,
        on_accept: Callable[[BareLink], None] | None = None,
        tuned: bool = False,
    ) -> None:
        self.tuned = tuned
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self._sender: DatagramSender | None = None
        self._receiver: DatagramReceiver | None = None
        if tuned:  # crust's socket setup: large buffers, GSO, GRO
            enlarge_buffers(self.sock, SOCKET_BUFFER)
            stats = dict.fromkeys(STAT_NAMES, 0)
            self._sender = DatagramSender(self.sock, stats)
            self._receiver = DatagramReceiver(self.sock, stats)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.links: dict[tuple[str, int], BareLink] = {}
        self._server_config = server_config
        self._on_accept = on_accept
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._closed = False

    def dial(self, addr: tuple[str, int], config: QuicConfiguration) -> BareLink:
        quic = QuicConnection(configuration=config)
        link = BareLink(self, quic, addr)
        self.links[addr] = link
        quic.connect(addr, now=self._loop.time())
        link.stream_id = quic.get_next_available_stream_id()
        link.transmit()
        return link

    def forget(self, link: BareLink) -> None:
        if self.links.get(link.addr) is link:
            del self.links[link.addr]

    def send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        if self._sender is not None:
            self._sender.send(datagrams)
            return
        sendto = self.sock.sendto
        for data, addr in datagrams:
            with contextlib.suppress(BlockingIOError, InterruptedError):  # QUIC resends
                sendto(data, addr)

    def _accept(self, data: bytes, addr: tuple[str, int]) -> BareLink | None:
        if self._server_config is None:
            return None
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return None
        if header.packet_type != QuicPacketType.INITIAL:
            return None
        quic = QuicConnection(
            configuration=self._server_config,
            original_destination_connection_id=header.destination_cid,
        )
        link = BareLink(self, quic, addr)
        self.links[addr] = link
        if self._on_accept is not None:
            self._on_accept(link)
        return link

    def _datagrams(self) -> list[tuple[bytes, tuple[str, int]]]:
        if self._receiver is not None:
            return self._receiver.receive(RECV_BATCH)
        out: list[tuple[bytes, tuple[str, int]]] = []
        for _ in range(RECV_BATCH):
            try:
                n, addr = self.sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            out.append((self._view[:n].tobytes(), addr))
        return out

    def _on_readable(self) -> None:
        touched: dict[BareLink, None] = {}
        now = self._loop.time()
        links = self.links
        for data, addr in self._datagrams():
            link = links.get(addr)
            if link is None:
                link = self._accept(data, addr)
                if link is None:
                    continue
            link.quic.receive_datagram(data, addr, now)
            touched[link] = None
        for link in touched:
            link.process()
            link.transmit()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in list(self.links.values()):
            link.close()
            if link._timer is not None:
                link._timer.cancel()
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


def _addr_text(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


async def _bare_dial(cmd: dict[str, Any]) -> tuple[BareEndpoint, BareLink]:
    endpoint = BareEndpoint(tuned=cmd.get("tuned", False))
    try:
        link = endpoint.dial(host_port(cmd["addr"]), bare_configuration(cmd, is_client=True))
        await link.handshake
    except BaseException:
        endpoint.close()
        raise
    return endpoint, link


async def _bare_bulk_recv(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    got = nbytes = 0
    t_first = t_last = 0.0
    cpu = [0.0, 0.0]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(link: BareLink, data: bytes) -> None:
        nonlocal got, nbytes, t_first, t_last
        if not got:
            t_first = clock()
        got += 1
        nbytes += len(data)
        if got == count:
            t_last = clock()
            cpu[1] = time.process_time()
            link.send(b"done")
            done.set_result(None)

    cpu[0] = await _bare_serve(cmd, pipe, on_message, done)
    return {
        "t_first": t_first,
        "t_last": t_last,
        "messages": got,
        "bytes": nbytes,
        "cpu_s": cpu[1] - cpu[0],
    }


async def _bare_serve(
    cmd: dict[str, Any],
    pipe: Pipe,
    on_message: Callable[[BareLink, bytes], None],
    done: asyncio.Future[None],
) -> float:
    """Listen, report the address, hand every message to ``on_message`` until ``done``,
    then wait (bounded) for the peers to close, so the last reply leaves before the socket
    closes. Returns the CPU time when serving started."""

    def on_accept(link: BareLink) -> None:
        link.on_message = on_message

    endpoint = BareEndpoint(
        server_config=bare_configuration(cmd, is_client=False),
        on_accept=on_accept,
        tuned=cmd.get("tuned", False),
    )
    try:
        pipe.send({"addr": _addr_text(endpoint.address)})
        cpu0 = time.process_time()
        await done
        await _until_closed(endpoint)
    finally:
        endpoint.close()
    return cpu0


async def _until_closed(endpoint: BareEndpoint, timeout: float = 5.0) -> None:
    """Wait until the peers have closed their connections (bounded)."""
    pending = [link.closed for link in endpoint.links.values() if not link.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


async def _bare_bulk_send(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    payload = os.urandom(cmd["size"])
    ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(link: BareLink, data: bytes) -> None:
        if not ack.done():
            ack.set_result(None)

    endpoint, link = await _bare_dial(cmd)
    try:
        link.on_message = on_message
        send = link.send
        cpu0 = time.process_time()
        t_start = clock()
        for _ in range(count):
            if link.unacked() > link.high_water:
                await link.drain()
            send(payload)
        t_sent = clock()
        await ack
        t_ack = clock()
        cpu1 = time.process_time()
        link.close()
    finally:
        endpoint.close()
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack, "cpu_s": cpu1 - cpu0}


async def _bare_echo(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Echo every message back; record each probe's one-way time (send -> received here)."""
    count: int = cmd["count"]
    one_way: list[float] = []
    cpu = [0.0, 0.0]
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(link: BareLink, data: bytes) -> None:
        one_way.append(clock() - T0.unpack_from(data)[0])
        link.send(data)
        if len(one_way) == count and not done.done():
            cpu[1] = time.process_time()
            done.set_result(None)

    cpu[0] = await _bare_serve(cmd, pipe, on_message, done)
    return {"one_way": one_way, "cpu_s": cpu[1] - cpu[0]}


async def _bare_cycle(cmd: dict[str, Any]) -> tuple[float, float, float, float]:
    """One new connection: dial + handshake, probe, echo, close -> (t0, t1, t2, t3)."""
    loop = asyncio.get_running_loop()
    echoed: asyncio.Future[None] = loop.create_future()

    def on_message(link: BareLink, data: bytes) -> None:
        if not echoed.done():
            echoed.set_result(None)

    t0 = clock()
    endpoint, link = await _bare_dial(cmd)
    try:
        t1 = clock()
        link.on_message = on_message
        link.send(probe(t0))
        await echoed
        t2 = clock()
        link.close()
    finally:
        endpoint.close()
    return t0, t1, t2, clock()


async def _bare_connect_seq(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    return await common.sequential_cycles(functools.partial(_bare_cycle, cmd), cmd["count"])


async def _bare_cycles(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    cycles = [functools.partial(_bare_cycle, cmd)] * cmd["concurrency"]
    return await common.concurrent_cycles(cycles, cmd["count"] // cmd["concurrency"])


HANDLERS: dict[str, Handler] = {
    "crust_bulk_recv": common.crust_bulk_recv,
    "crust_bulk_send": common.crust_bulk_send,
    "crust_echo": common.crust_echo,
    "crust_connect_seq": common.crust_connect_seq,
    "crust_cycles": common.crust_cycles,
    "bare_bulk_recv": _bare_bulk_recv,
    "bare_bulk_send": _bare_bulk_send,
    "bare_echo": _bare_echo,
    "bare_connect_seq": _bare_connect_seq,
    "bare_cycles": _bare_cycles,
    # the same bare driver with crust's socket and send tuning (cmd["tuned"])
    "tuned_bulk_recv": _bare_bulk_recv,
    "tuned_bulk_send": _bare_bulk_send,
}


# =============================================================================== parent side


def _extra(kind: str, datagram_size: int, tls: dict[str, bytes]) -> dict[str, Any]:
    """What both workers of one measurement are told: crust gets a QUIC listener and the
    datagram size through its Config, bare aioquic the size and the TLS certificate (and
    "tuned" crust's socket and send tuning)."""
    if kind == "crust":
        return {"scheme": "quic", "config": {"quic_max_datagram_size": datagram_size}}
    return {"datagram_size": datagram_size, "tls": tls, "tuned": kind == "tuned"}


BULK_KINDS = ("crust", "bare", "tuned")


def _bulk(
    pair: WorkerPair,
    plan: Plan,
    size: int,
    datagram_size: int,
    tls: dict[str, bytes],
    progress: Progress,
) -> list[dict[str, Any]]:
    """crust, bare aioquic and bare aioquic with crust's tuning, alternating; one figure
    against each baseline (and messages/s for the small size)."""
    count = plan.message_count(size)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in BULK_KINDS}
    for rep in range(plan.repeats):
        for kind in BULK_KINDS:
            progress(
                f"bulk {size_name(size)} x {count}, datagrams of {datagram_size} B: "
                f"{kind} run {rep + 1}/{plan.repeats}"
            )
            extra = _extra(kind, datagram_size, tls)
            runs[kind].append(bulk_once(pair, kind, size, count, plan.timeout, **extra))
            progress(f"    {runs[kind][-1]['mb_per_s']:.1f} MB/s")
    mbs = {k: median([r["mb_per_s"] for r in v]) for k, v in runs.items()}
    msgs = {k: median([r["msgs_per_s"] for r in v]) for k, v in runs.items()}
    details = {
        "messages": count,
        "bytes": count * size,
        "repeats": plan.repeats,
        "datagram_size": datagram_size,
        "runs": runs,
    }
    key = f"bulk_{size}_dgram_{datagram_size}"
    name = f"bulk throughput, {size_name(size)} messages, {datagram_size} B datagrams"
    out: list[dict[str, Any]] = []
    for base, suffix, label in (
        ("bare", "", ""),
        ("tuned", "_vs_tuned", " (vs tuned bare)"),
    ):
        # the target is against the plain driver; the tuned one shows what crust's own
        # layers (Noise, framing, events) cost on an identical driver
        target = f">= {RATIO_TARGET:.2f}x bare" if not suffix else None
        out.append(
            figure(
                key + suffix,
                name + label,
                "MB/s",
                mbs["crust"],
                mbs[base],
                higher_is_better=True,
                target=target,
                met=mbs["crust"] / mbs[base] >= RATIO_TARGET if target else None,
                details=details if not suffix else {"same_runs_as": key},
            )
        )
        if size == SMALL:
            out.append(
                figure(
                    f"small_msgs_dgram_{datagram_size}{suffix}",
                    f"{SMALL} B messages/s, one connection, {datagram_size} B datagrams{label}",
                    "msg/s",
                    msgs["crust"],
                    msgs[base],
                    higher_is_better=True,
                    target=target,
                    met=msgs["crust"] / msgs[base] >= RATIO_TARGET if target else None,
                    details={"messages": count, "same_runs_as": key},
                )
            )
    return out


def _connects(
    pair: WorkerPair, plan: Plan, datagram_size: int, tls: dict[str, bytes], progress: Progress
) -> list[dict[str, Any]]:
    n = plan.connect_count + plan.connect_warmup
    w = plan.connect_warmup
    res: dict[str, dict[str, list[float]]] = {}
    cpu_ms: dict[str, dict[str, float]] = {}
    for kind in ("crust", "bare"):
        progress(f"connections: {kind}, {plan.connect_count} sequential (+{w} warm-up)")
        extra = _extra(kind, datagram_size, tls)
        r, s = pair.run(
            {"op": f"{kind}_echo", "count": n, **extra},
            {"op": f"{kind}_connect_seq", "count": n, "order": "lesser", **extra},
            plan.timeout,
        )
        res[kind] = {
            "one_way": r["one_way"][w:],
            "connect": s["connect"][w:],
            "round_trip": s["round_trip"][w:],
            "cycle": s["cycle"][w:],
        }
        cpu_ms[kind] = {"dialler": s["cpu_s"] * 1e3 / n, "listener": r["cpu_s"] * 1e3 / n}
    sc = {k: summary_ms(v) for k, v in res["crust"].items()}
    sb = {k: summary_ms(v) for k, v in res["bare"].items()}
    details = {
        "connections": plan.connect_count,
        "warmup": w,
        "datagram_size": datagram_size,
        "crust_ms": sc,
        "bare_ms": sb,
        "cpu_ms_per_connection": cpu_ms,
    }
    seq = {k: len(v["cycle"]) / sum(v["cycle"]) for k, v in res.items()}
    hs = {k: len(v["connect"]) / sum(v["connect"]) for k, v in res.items()}
    return [
        figure(
            "connect_p50",
            "new connection until usable (handshakes done), p50",
            "ms",
            sc["connect"]["p50"],
            sb["connect"]["p50"],
            higher_is_better=False,
            details=details,
        ),
        figure(
            "connect_p99",
            "new connection until usable (handshakes done), p99",
            "ms",
            sc["connect"]["p99"],
            sb["connect"]["p99"],
            higher_is_better=False,
        ),
        figure(
            "handshakes_seq",
            "handshakes/s, sequential (1 / mean time until usable)",
            "conn/s",
            hs["crust"],
            hs["bare"],
            higher_is_better=True,
        ),
        figure(
            "connections_seq",
            "new connections/s, sequential (connect, message, echo, close)",
            "conn/s",
            seq["crust"],
            seq["bare"],
            higher_is_better=True,
        ),
    ]


def run(
    quick: bool,
    *,
    progress: Progress | None = None,
    repeats: int | None = None,
    profile: str | None = None,
    datagram_sizes: tuple[int, ...] = DATAGRAM_SIZES,
) -> dict[str, Any]:
    """Run every measurement; return a JSON-serialisable dict (environment, figures).

    Each figure holds ``crust``, ``baseline`` (bare aioquic), ``ratio`` (crust / bare),
    ``unit``, an optional ``target`` with ``met``, ``details``, and ``error`` when it could
    not be measured.  Bulk figures are repeated for every size in ``datagram_sizes``;
    connection figures use the first.  ``profile``: a directory for cProfile stats of every
    worker command (see :mod:`benchmarks.common`).  The workers are started with
    multiprocessing's ``spawn`` method, so a script calling this needs an
    ``if __name__ == "__main__":`` guard.
    """
    plan = common.choose_plan(quick, repeats, QUICK, FULL)
    say = progress or (lambda _msg: None)
    figures: list[dict[str, Any]] = []
    started = time.time()
    load_before = common.load_average()
    tls = bare_certificate()
    pair = WorkerPair("benchmarks.bench_quic", profile=profile)
    try:
        for dsize in datagram_sizes:
            for size in SIZES:
                run_step(
                    figures,
                    say,
                    functools.partial(_bulk, pair, plan, size, dsize, tls, say),
                    f"bulk {size_name(size)}, {dsize} B datagrams",
                    f"bulk_{size}_dgram_{dsize}",
                    f"bulk throughput, {size_name(size)} messages, {dsize} B datagrams",
                    "MB/s",
                    True,
                )
        run_step(
            figures,
            say,
            functools.partial(_connects, pair, plan, datagram_sizes[0], tls, say),
            "connections",
            "connect_p50",
            "new connection until usable (handshakes done), p50",
            "ms",
            False,
        )
        run_step(
            figures,
            say,
            lambda: [
                common.cycles_figure(
                    pair, plan, "bare", say, lambda kind: _extra(kind, datagram_sizes[0], tls)
                )
            ],
            "connections/s",
            "connections_concurrent",
            "new connections/s, concurrent clients",
            "conn/s",
            True,
        )
    finally:
        pair.stop()
    import aioquic

    return common.results(
        "bench_quic",
        quick,
        plan,
        started,
        load_before,
        [
            "ratio = crust / baseline; baseline = bare aioquic QuicConnection, same "
            "datagram size, 4-byte length prefix on one stream",
            "sender and receiver run in separate processes on 127.0.0.1",
            "throughput: payload bytes (1 MB = 10**6 B), first send -> last receive, "
            "median of the repeats",
            "crust connections: QUIC handshake + Retry + Noise XX + SELECT; bare: QUIC "
            "handshake with a verified server certificate, no Retry",
        ],
        figures,
        datagram_sizes=list(datagram_sizes),
        env_aioquic=aioquic.__version__,
    )


def _datagram_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not sizes or any(not 1200 <= s <= MAX_QUIC_DATAGRAM for s in sizes):
        raise argparse.ArgumentTypeError(
            f"datagram sizes must be between 1200 and {MAX_QUIC_DATAGRAM}"
        )
    return sizes


def main(argv: list[str] | None = None) -> int:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--datagram-sizes",
            type=_datagram_sizes,
            default=DATAGRAM_SIZES,
            help="comma-separated maximum datagram sizes for the bulk runs "
            f"(default {','.join(map(str, DATAGRAM_SIZES))})",
        )

    return common.main(
        argv,
        prog="python -m benchmarks.bench_quic",
        description="crust over QUIC vs bare aioquic on loopback (throughput, connections)",
        run=lambda args, say: run(
            args.quick,
            progress=say,
            repeats=args.repeats,
            profile=args.profile,
            datagram_sizes=args.datagram_sizes,
        ),
        title="crust loopback QUIC benchmark",
        baseline="bare aioquic",
        add_arguments=add_arguments,
    )


if __name__ == "__main__":
    sys.exit(main())
