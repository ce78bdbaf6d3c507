"""Tools of the hostile-peer tests (test_hostile.py): raw attacker streams over TCP and QUIC,
loopback taps that record a real handshake, an honest pair that keeps talking during an
attack, and a heap watch.

Everything runs on loopback. The attacker speaks from its own loopback address
(:data:`ATTACKER`, inside 127.0.0.0/8, routed to ``lo`` by Linux) so that per-address limits
and reports can be told apart from the honest peers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol, TypeVar

from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from crust.aio.quic import alpn_for
from crust.contact import Contact
from crust.events import Event, MessageReceived
from crust.identity import PeerId
from crust.service import Service

ATTACKER = "127.0.0.66"
TIMEOUT = 10.0
Address = tuple[str, int]
E = TypeVar("E", bound=Event)


def address(svc: Service, scheme: str) -> Address:
    """``svc``'s listener address of ``scheme``."""
    contact = next(c for c in svc.contacts() if c.startswith(scheme + "://"))
    return Contact.parse(contact).address


def contact(svc: Service, scheme: str) -> str:
    return next(c for c in svc.contacts() if c.startswith(scheme + "://"))


# ------------------------------------------------------------------------ raw streams


class RawStream(Protocol):
    """A byte stream to a crust listener that speaks whatever the test writes."""

    closed: asyncio.Future[None]
    received: bytearray

    def write(self, data: bytes) -> None: ...

    async def read_some(self, timeout: float = TIMEOUT) -> bytes:
        """The next bytes received (b"" once closed)."""
        ...

    def close(self) -> None: ...


class RawTcp(asyncio.Protocol):
    """A TCP connection from ``local`` (the attacker's address)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.received = bytearray()
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, remote: Address, local: str = ATTACKER) -> RawTcp:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, remote[0], remote[1], local_addr=(local, 0))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        self._chunks.put_nowait(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._chunks.put_nowait(b"")
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def read_some(self, timeout: float = TIMEOUT) -> bytes:
        if self.closed.done() and self._chunks.empty():
            return b""
        return await asyncio.wait_for(self._chunks.get(), timeout)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RawQuic:
    """A QUIC client (aioquic, ALPN of the node's network, certificate not checked) on a
    UDP socket bound to ``local``; its first stream carries whatever the test writes."""

    def __init__(self, remote: Address, network: str = "crust", local: str = ATTACKER) -> None:
        self.loop = asyncio.get_running_loop()
        self.remote = remote
        config = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn_for(network)], verify_mode=ssl.CERT_NONE
        )
        self.quic = QuicConnection(configuration=config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((local, 0))
        self.sock.setblocking(False)
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.received = bytearray()
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.quic.connect(remote, now=self.loop.time())
        self.stream = self.quic.get_next_available_stream_id()
        self._flush()

    @classmethod
    async def open(cls, remote: Address, network: str = "crust", local: str = ATTACKER) -> RawQuic:
        raw = cls(remote, network, local)
        try:
            await asyncio.wait_for(asyncio.shield(raw.connected), TIMEOUT)
        except BaseException:
            raw.close()
            raise
        return raw

    def _readable(self) -> None:
        for _ in range(64):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            self.quic.receive_datagram(data, addr, now=self.loop.time())
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self.loop.time())
        self._flush()

    def _flush(self) -> None:
        if self._done:
            return
        event = self.quic.next_event()
        while event is not None:
            if isinstance(event, qe.HandshakeCompleted) and not self.connected.done():
                self.connected.set_result(None)
            elif isinstance(event, qe.StreamDataReceived):
                if event.data:
                    self.received += event.data
                    self._chunks.put_nowait(event.data)
                if event.end_stream:
                    self._lost()
            elif isinstance(event, qe.ConnectionTerminated):
                self._lost()
            event = self.quic.next_event()
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)
        when = self.quic.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None and not self._done:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _lost(self) -> None:
        self._chunks.put_nowait(b"")
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("QUIC connection closed"))
            self.connected.exception()
        if not self.closed.done():
            self.closed.set_result(None)

    def write(self, data: bytes) -> None:
        if not self._done and not self.closed.done():
            self.quic.send_stream_data(self.stream, data)
            self._flush()

    async def read_some(self, timeout: float = TIMEOUT) -> bytes:
        if self.closed.done() and self._chunks.empty():
            return b""
        return await asyncio.wait_for(self._chunks.get(), timeout)

    def close(self) -> None:
        if self._done:
            return
        self.quic.close()
        self._flush()
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._lost()


async def open_raw(transport: str, svc: Service, local: str = ATTACKER) -> RawStream:
    """A raw attacker stream to ``svc``'s listener of ``transport``."""
    if transport == "tcp":
        return await RawTcp.open(address(svc, "tcp"), local)
    return await RawQuic.open(address(svc, "quic"), svc.config.network_name, local)


# ------------------------------------------------------------------------ taps


class TcpTap:
    """A loopback TCP proxy in front of ``target`` that records both directions."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.upstream = bytearray()
        """Bytes the client sent (towards the target)."""
        self.downstream = bytearray()
        self.address: Address = ("127.0.0.1", 0)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> TcpTap:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, log: bytearray) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    log += data
                    w.write(data)
            w.close()

        for task in (
            asyncio.ensure_future(pipe(reader, up_writer, self.upstream)),
            asyncio.ensure_future(pipe(up_reader, writer, self.downstream)),
        ):
            self._tasks.add(task)


class UdpTap:
    """A loopback UDP proxy in front of ``target`` that records the client's datagrams."""

    def __init__(self, target: Address) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.upstream: list[bytes] = []
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.back.setblocking(False)
        self.address: Address = self.front.getsockname()[:2]
        self._client: Address | None = None
        self.loop.add_reader(self.front.fileno(), self._from_client)
        self.loop.add_reader(self.back.fileno(), self._from_target)

    def _from_client(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                data, addr = self.front.recvfrom(65536)
                self._client = addr[:2]
                self.upstream.append(data)
                with contextlib.suppress(OSError):
                    self.back.sendto(data, self.target)

    def _from_target(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                data, _ = self.back.recvfrom(65536)
                if self._client is not None:
                    with contextlib.suppress(OSError):
                        self.front.sendto(data, self._client)

    def close(self) -> None:
        for sock in (self.front, self.back):
            self.loop.remove_reader(sock.fileno())
            sock.close()


# ------------------------------------------------------------------------ honest peers


class Pump:
    """Consumes every event of a service. Messages of ``echo`` peers are answered at once;
    messages of ``keep`` peers are kept in order; the others are only counted (a flood must
    not fill the test's memory). Other events are kept for :meth:`wait`."""

    def __init__(
        self, svc: Service, *, echo: set[PeerId] | None = None, keep: set[PeerId] | None = None
    ) -> None:
        self.svc = svc
        self.echo = echo if echo is not None else set()
        self.keep = keep if keep is not None else set()
        self.got: dict[PeerId, list[bytes]] = defaultdict(list)
        self.counts: dict[PeerId, int] = defaultdict(int)
        self.inbox: asyncio.Queue[MessageReceived] = asyncio.Queue()
        self.events: list[Event] = []
        self._cond = asyncio.Condition()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for ev in self.svc.events():
            if isinstance(ev, MessageReceived):
                self.counts[ev.peer] += 1
                if ev.peer in self.keep or ev.peer in self.echo:
                    self.got[ev.peer].append(ev.data)
                if ev.peer in self.echo:
                    await self.svc.send(ev.peer, ev.data)
                elif ev.peer in self.keep:
                    self.inbox.put_nowait(ev)
                continue
            async with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def of(self, kind: type[E], pred: Callable[[E], bool] = lambda e: True) -> list[E]:
        return [e for e in self.events if isinstance(e, kind) and pred(e)]

    async def wait(
        self, kind: type[E], pred: Callable[[E], bool] = lambda e: True, timeout: float = TIMEOUT
    ) -> E:
        async with asyncio.timeout(timeout), self._cond:
            while True:
                found = self.of(kind, pred)
                if found:
                    return found[0]
                await self._cond.wait()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


PACE = 0.005
"""Seconds between two round trips of the honest pair: the load generator's own rate."""


class Chatter:
    """An honest pair during an attack: ``peer`` sends numbered messages to ``node``, which
    echoes each one (its Pump has ``peer`` in ``echo``); every echo must come back in order.
    Round-trip times are kept (reported by the benchmark, never asserted by the tests)."""

    def __init__(self, peer: Service, peer_pump: Pump, node: Service) -> None:
        self.peer, self.pump, self.node = peer, peer_pump, node
        self.sent = 0
        self.rtts: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Chatter:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            data = b"honest %d" % self.sent
            t0 = loop.time()
            await self.peer.send(self.node.peer_id, data)
            echo = await asyncio.wait_for(self.pump.inbox.get(), TIMEOUT)
            self.rtts.append(loop.time() - t0)
            assert echo.data == data, (echo.data, data)
            self.sent += 1
            await asyncio.sleep(PACE)  # pacing the load generator, not waiting for anything

    async def stop(self) -> int:
        """Stop after the round trip in progress; re-raises any failure. Returns the number
        of round trips completed."""
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, TIMEOUT)
        return self.sent


# ------------------------------------------------------------------------ memory


class Heap:
    """Python heap growth during an attack (tracemalloc: every allocation of this process,
    the attacker's own included)."""

    def __init__(self) -> None:
        self.base = 0

    def mark(self) -> None:
        gc.collect()
        self.base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()

    def peak_growth(self) -> int:
        return tracemalloc.get_traced_memory()[1] - self.base
