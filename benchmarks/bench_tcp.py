"""Loopback TCP benchmark: crust's encrypted connections against plain asyncio TCP.

Run ``python -m benchmarks.bench_tcp [--json] [--quick]``, or import :func:`run`.

Every figure is measured in one run, sender and receiver in two separate processes
(``multiprocessing`` with the ``spawn`` context), each paired with a baseline measured in
the same run and reported as ``ratio = crust / baseline``:

* bulk throughput (MB/s, 1 MB = 10**6 bytes of payload) for 64 B, 1 KiB, 64 KiB and
  1 MiB messages, and messages/s for 64 B messages: one connection, a bounded number of
  messages, timed from the sender's first send to the receiver's last receive.
  The baseline is a plain asyncio TCP stream: ``transport.write`` with a 4-byte length
  prefix per message (respecting ``pause_writing``), and a ``BufferedProtocol`` receiver
  parsing frames out of a preallocated buffer (large messages are read straight into their
  own buffer).  Both sides set TCP_NODELAY and the same write-buffer limits as crust.
* connection latency: ``connect()`` + Noise XX handshake + first message, until that
  message is received on the other side (p50/p99 over sequential new connections), against
  a plain TCP connect + first message; the round trip (message echoed back to the dialler)
  for both; new connections per second, sequential and with concurrent clients.

Each figure's ``details`` also hold every run and the CPU time (user + system) each
process spent, per payload byte for bulk transfers and per connection for the latency
runs: on a shared machine CPU time is a much steadier signal than wall-clock time.

Only loopback addresses are used; every phase is bounded in count and in time, and the
worker processes are always stopped (terminated, then killed) when :func:`run` returns;
a worker also exits by itself when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import Any, cast

import crust
from crust.aio.eventqueue import EventStream
from crust.contact import Contact
from crust.events import MessageReceived, PeerLost

KiB = 1024
MiB = 1024 * 1024
SIZES = (64, KiB, 64 * KiB, MiB)
SMALL = 64
"""Size of the small messages (messages/s and the latency probes)."""

BULK_TARGET_RATIO = 0.40
SMALL_MSGS_TARGET = 200_000.0
HANDSHAKE_P50_TARGET_MS = 2.0

READ_BUFFER = 256 * KiB
WRITE_HIGH_WATER = 512 * KiB  # the same limits crust's TCP transport sets
WRITE_LOW_WATER = 128 * KiB
INLINE_FRAME = 16 * KiB
"""Plain baseline: messages up to this size are written as one ``prefix + payload``."""

_LEN = struct.Struct(">I")
_T0 = struct.Struct(">d")
_clock = time.monotonic
"""CLOCK_MONOTONIC on Linux: one system-wide clock, comparable across processes."""


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    total_bytes: int
    max_messages: int
    repeats: int
    latency_count: int
    latency_warmup: int
    cycles_count: int
    concurrency: int
    timeout: float
    """Seconds one measurement may take before it is abandoned."""


FULL = Plan(
    total_bytes=1024 * MiB,
    max_messages=300_000,
    repeats=5,
    latency_count=200,
    latency_warmup=10,
    cycles_count=400,
    concurrency=8,
    timeout=180.0,
)
QUICK = Plan(
    total_bytes=16 * MiB,
    max_messages=30_000,
    repeats=1,
    latency_count=30,
    latency_warmup=3,
    cycles_count=48,
    concurrency=8,
    timeout=60.0,
)


def message_count(plan: Plan, size: int) -> int:
    return max(1, min(plan.total_bytes // size, plan.max_messages))


# =============================================================================== plain asyncio


class PlainStream(asyncio.BufferedProtocol):
    """The baseline: length-prefixed messages over a plain asyncio TCP transport.

    ``on_message(stream, data)`` is called for every complete message.  Reading uses one
    preallocated buffer; a message larger than that buffer is read straight into a buffer
    of its own (no reassembly copy).  Writing respects ``pause_writing``: call
    :meth:`drain` while :attr:`paused`.
    """

    def __init__(self, on_message: Callable[[PlainStream, bytes | bytearray], None]) -> None:
        self._on_message = on_message
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_view: memoryview | None = None
        self._big_fill = 0
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = tr

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.paused = False
        self._wake()

    # -- writing
    def send(self, data: bytes) -> None:
        tr = self.transport
        assert tr is not None
        if len(data) <= INLINE_FRAME:
            tr.write(_LEN.pack(len(data)) + data)
        else:
            tr.write(_LEN.pack(len(data)))
            tr.write(data)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        while self.paused:
            if self.closed.done():
                raise ConnectionError("connection lost while sending")
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    # -- reading
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big_view is not None:
            return self._big_view[self._big_fill :]
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_fill += nbytes
            if self._big_fill == len(self._big):
                msg = self._big
                self._big = self._big_view = None
                self._on_message(self, msg)
            return
        buf = self._buf
        view = self._view
        start = self._start
        end = self._end + nbytes
        unpack = _LEN.unpack_from
        deliver = self._on_message
        need = 4
        while end - start >= 4:
            (n,) = unpack(buf, start)
            if end - start - 4 < n:
                if n + 4 > len(buf):  # larger than the read buffer: give it its own
                    have = end - start - 4
                    big = bytearray(n)
                    big[:have] = view[start + 4 : end]
                    self._big, self._big_view, self._big_fill = big, memoryview(big), have
                    start = end = 0
                need = n + 4
                break
            start += 4
            deliver(self, view[start : start + n].tobytes())
            start += n
        if start == end:
            start = end = 0
        elif start + need > len(buf) or len(buf) - end < INLINE_FRAME:
            buf[: end - start] = buf[start:end]  # slice copy first: the ranges may overlap
            end -= start
            start = 0
        self._start = start
        self._end = end


def _host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def _plain_server(
    on_message: Callable[[PlainStream, bytes | bytearray], None],
) -> tuple[asyncio.Server, list[PlainStream], str]:
    streams: list[PlainStream] = []

    def factory() -> PlainStream:
        stream = PlainStream(on_message)
        streams.append(stream)
        return stream

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    return server, streams, f"127.0.0.1:{port}"


async def _close_server(server: asyncio.Server, streams: list[PlainStream]) -> None:
    server.close()
    pending = [s.closed for s in streams if not s.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=3.0)
    for s in streams:
        if s.transport is not None and not s.closed.done():
            s.transport.abort()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 3.0)


async def _plain_connect(addr: str, stream: PlainStream) -> asyncio.Transport:
    host, port = _host_port(addr)
    tr, _ = await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
    return tr


async def _plain_close(tr: asyncio.Transport, stream: PlainStream) -> None:
    tr.close()
    await asyncio.wait_for(asyncio.shield(stream.closed), 5.0)


# =============================================================================== worker side


def _crust_config(listen: bool) -> crust.Config:
    """``Config.for_testing`` with one TCP listener on 127.0.0.1 (receiver) or none."""
    return crust.Config.for_testing(listen=("tcp://127.0.0.1:0",) if listen else ())


def _tcp_contact(svc: crust.Service) -> str:
    return next(c for c in svc.contacts() if c.startswith("tcp://"))


def _probe(t0: float) -> bytes:
    """A SMALL-byte latency probe carrying its send time."""
    return _T0.pack(t0) + bytes(SMALL - _T0.size)


async def _next_message(events: EventStream) -> MessageReceived:
    async for ev in events:
        if isinstance(ev, MessageReceived):
            return ev
    raise ConnectionError("service closed")


async def _crust_bulk_recv(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    got = nbytes = 0
    t_first = t_last = 0.0
    async with crust.Service(_crust_config(True)) as svc:
        pipe.send({"addr": _tcp_contact(svc)})
        cpu0 = time.process_time()
        async for ev in svc.events():
            if isinstance(ev, MessageReceived):
                if not got:
                    t_first = _clock()
                got += 1
                nbytes += len(ev.data)
                if got >= count:
                    t_last = _clock()
                    cpu1 = time.process_time()
                    await svc.send(ev.peer, b"done", 0)
                    break
    return {
        "t_first": t_first,
        "t_last": t_last,
        "messages": got,
        "bytes": nbytes,
        "cpu_s": cpu1 - cpu0,
    }


async def _crust_bulk_send(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    payload = os.urandom(cmd["size"])
    async with crust.Service(_crust_config(False)) as svc:
        events = svc.events()
        peer = await svc.connect(cmd["addr"])
        send = svc.send
        cpu0 = time.process_time()
        t_start = _clock()
        for _ in range(count):
            await send(peer, payload, 0)
        t_sent = _clock()
        await _next_message(events)
        t_ack = _clock()
        cpu1 = time.process_time()
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack, "cpu_s": cpu1 - cpu0}


async def _plain_bulk_recv(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    got = nbytes = 0
    t_first = t_last = 0.0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        nonlocal got, nbytes, t_first, t_last
        if not got:
            t_first = _clock()
        got += 1
        nbytes += len(data)
        if got == count:
            t_last = _clock()
            cpu[1] = time.process_time()
            stream.send(b"done")
            done.set_result(None)

    cpu = [0.0, 0.0]
    server, streams, addr = await _plain_server(on_message)
    try:
        pipe.send({"addr": addr})
        cpu[0] = time.process_time()
        await done
    finally:
        await _close_server(server, streams)
    return {
        "t_first": t_first,
        "t_last": t_last,
        "messages": got,
        "bytes": nbytes,
        "cpu_s": cpu[1] - cpu[0],
    }


async def _plain_bulk_send(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    payload = os.urandom(cmd["size"])
    ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        if not ack.done():
            ack.set_result(None)

    stream = PlainStream(on_message)
    tr = await _plain_connect(cmd["addr"], stream)
    try:
        send = stream.send
        cpu0 = time.process_time()
        t_start = _clock()
        for _ in range(count):
            if stream.paused:
                await stream.drain()
            send(payload)
        t_sent = _clock()
        await ack
        t_ack = _clock()
        cpu1 = time.process_time()
    finally:
        await _plain_close(tr, stream)
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack, "cpu_s": cpu1 - cpu0}


async def _crust_echo(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Echo every message back; record each probe's one-way time (send -> received here)."""
    count: int = cmd["count"]
    one_way: list[float] = []
    async with crust.Service(_crust_config(True)) as svc:
        pipe.send({"addr": _tcp_contact(svc)})
        cpu0 = time.process_time()
        async for ev in svc.events():
            if isinstance(ev, MessageReceived):
                one_way.append(_clock() - _T0.unpack_from(ev.data)[0])
                await svc.send(ev.peer, ev.data, 0)
                if len(one_way) >= count:
                    break
        cpu1 = time.process_time()
        # let the last dialler finish its clean close before ours begins
        if svc.peers():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    async for ev in svc.events():
                        if isinstance(ev, PeerLost) and not svc.peers():
                            break
    return {"one_way": one_way, "cpu_s": cpu1 - cpu0}


async def _plain_echo(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    one_way: list[float] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        one_way.append(_clock() - _T0.unpack_from(data)[0])
        stream.send(bytes(data))
        if len(one_way) == count:
            cpu[1] = time.process_time()
            done.set_result(None)

    cpu = [0.0, 0.0]
    server, streams, addr = await _plain_server(on_message)
    try:
        pipe.send({"addr": addr})
        cpu[0] = time.process_time()
        await done
    finally:
        await _close_server(server, streams)
    return {"one_way": one_way, "cpu_s": cpu[1] - cpu[0]}


def _ordered_identity(target: crust.PeerId, lesser: bool) -> crust.Identity:
    """An identity whose peer id is below (or above) ``target``'s.

    The greater peer id of a pair decides which connection is kept (SELECT), so the order
    changes which side waits for which control frame during ``connect()``.
    """
    while True:
        ident = crust.Identity.generate()
        if (ident.peer_id < target) == lesser:
            return ident


async def _crust_connect_seq(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    addr: str = cmd["addr"]
    target = Contact.parse(addr).peer_id
    assert target is not None
    ident = _ordered_identity(target, cmd["order"] == "lesser")
    connect: list[float] = []
    round_trip: list[float] = []
    cycle: list[float] = []
    async with crust.Service(_crust_config(False), identity=ident) as svc:
        events = svc.events()
        cpu0 = time.process_time()
        for _ in range(cmd["count"]):
            t0 = _clock()
            peer = await svc.connect(addr)
            t1 = _clock()
            await svc.send(peer, _probe(t0), 0)
            await _next_message(events)
            t2 = _clock()
            await svc.disconnect(peer)
            t3 = _clock()
            connect.append(t1 - t0)
            round_trip.append(t2 - t0)
            cycle.append(t3 - t0)
        cpu = time.process_time() - cpu0
    return {"connect": connect, "round_trip": round_trip, "cycle": cycle, "cpu_s": cpu}


async def _plain_connect_seq(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    addr: str = cmd["addr"]
    connect: list[float] = []
    round_trip: list[float] = []
    cycle: list[float] = []
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()
    for _ in range(cmd["count"]):
        echoed: asyncio.Future[None] = loop.create_future()

        def on_message(
            stream: PlainStream, data: bytes | bytearray, fut: asyncio.Future[None] = echoed
        ) -> None:
            if not fut.done():
                fut.set_result(None)

        stream = PlainStream(on_message)
        t0 = _clock()
        tr = await _plain_connect(addr, stream)
        t1 = _clock()
        stream.send(_probe(t0))
        await echoed
        t2 = _clock()
        await _plain_close(tr, stream)
        t3 = _clock()
        connect.append(t1 - t0)
        round_trip.append(t2 - t0)
        cycle.append(t3 - t0)
    cpu = time.process_time() - cpu0
    return {"connect": connect, "round_trip": round_trip, "cycle": cycle, "cpu_s": cpu}


async def _crust_cycles(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """``concurrency`` clients, each: connect, send a probe, await the echo, disconnect."""
    addr: str = cmd["addr"]
    per_client = cmd["count"] // cmd["concurrency"]
    async with contextlib.AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(crust.Service(_crust_config(False)))
            for _ in range(cmd["concurrency"])
        ]

        async def client(svc: crust.Service) -> None:
            events = svc.events()
            for _ in range(per_client):
                peer = await svc.connect(addr)
                await svc.send(peer, _probe(_clock()), 0)
                await _next_message(events)
                await svc.disconnect(peer)

        t_start = _clock()
        async with asyncio.TaskGroup() as tg:
            for svc in services:
                tg.create_task(client(svc))
        t_end = _clock()
    return {"seconds": t_end - t_start, "connections": per_client * len(services)}


async def _plain_cycles(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    addr: str = cmd["addr"]
    per_client = cmd["count"] // cmd["concurrency"]
    loop = asyncio.get_running_loop()

    async def client() -> None:
        for _ in range(per_client):
            echoed: asyncio.Future[None] = loop.create_future()

            def on_message(
                stream: PlainStream, data: bytes | bytearray, fut: asyncio.Future[None] = echoed
            ) -> None:
                if not fut.done():
                    fut.set_result(None)

            stream = PlainStream(on_message)
            tr = await _plain_connect(addr, stream)
            stream.send(_probe(_clock()))
            await echoed
            await _plain_close(tr, stream)

    t_start = _clock()
    async with asyncio.TaskGroup() as tg:
        for _ in range(cmd["concurrency"]):
            tg.create_task(client())
    t_end = _clock()
    return {"seconds": t_end - t_start, "connections": per_client * cmd["concurrency"]}


_Handler = Callable[[dict[str, Any], Pipe], Awaitable[dict[str, Any]]]
HANDLERS: dict[str, _Handler] = {
    "crust_bulk_recv": _crust_bulk_recv,
    "crust_bulk_send": _crust_bulk_send,
    "plain_bulk_recv": _plain_bulk_recv,
    "plain_bulk_send": _plain_bulk_send,
    "crust_echo": _crust_echo,
    "plain_echo": _plain_echo,
    "crust_connect_seq": _crust_connect_seq,
    "plain_connect_seq": _plain_connect_seq,
    "crust_cycles": _crust_cycles,
    "plain_cycles": _plain_cycles,
}


async def _dispatch(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    async with asyncio.timeout(cmd["timeout"]):
        return await HANDLERS[cmd["op"]](cmd, pipe)


def _exit_with_parent(parent: int) -> None:
    """Watchdog thread: end this worker as soon as the process that started it is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def worker_main(pipe: Pipe, parent: int) -> None:
    """A benchmark worker process: run commands from ``pipe`` until None or EOF."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    has_alarm = hasattr(signal, "alarm")
    while True:
        try:
            cmd = pipe.recv()
        except (EOFError, OSError):
            return
        if cmd is None:
            return
        if has_alarm:  # last resort: the process dies if a command wedges the event loop
            signal.alarm(int(cmd["timeout"]) + 30)
        try:
            result = asyncio.run(_dispatch(cmd, pipe))
        except Exception as exc:
            result = {"error": f"{cmd.get('op')}: {type(exc).__name__}: {exc}"}
        finally:
            if has_alarm:
                signal.alarm(0)
        try:
            pipe.send(result)
        except OSError:
            return


# =============================================================================== parent side


class Worker:
    """One spawned worker process and its pipe."""

    def __init__(self, ctx: multiprocessing.context.SpawnContext, name: str) -> None:
        self.pipe, child = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=worker_main, args=(child, os.getpid()), name=name, daemon=True
        )
        self.proc.start()
        child.close()

    def send(self, msg: dict[str, Any]) -> None:
        self.pipe.send(msg)

    def recv(self, timeout: float) -> dict[str, Any]:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"{self.proc.name}: no answer within {timeout:.0f} s")
        try:
            msg: dict[str, Any] = self.pipe.recv()
        except (EOFError, OSError):
            self.proc.join(1.0)
            raise RuntimeError(f"{self.proc.name} exited (code {self.proc.exitcode})") from None
        if "error" in msg:
            raise RuntimeError(f"{self.proc.name}: {msg['error']}")
        return msg

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.pipe.send(None)
            self.proc.join(3.0)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3.0)
        self.pipe.close()


class WorkerPair:
    """A receiver and a sender process; restarted after any failure."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._receiver: Worker | None = None
        self._sender: Worker | None = None

    def _start(self) -> tuple[Worker, Worker]:
        if self._receiver is None:
            self._receiver = Worker(self._ctx, "bench-receiver")
        if self._sender is None:
            self._sender = Worker(self._ctx, "bench-sender")
        return self._receiver, self._sender

    def stop(self) -> None:
        workers, self._receiver, self._sender = (self._receiver, self._sender), None, None
        for w in workers:
            if w is not None:
                w.stop()

    def run(
        self, recv_cmd: dict[str, Any], send_cmd: dict[str, Any], timeout: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        receiver, sender = self._start()
        try:
            receiver.send({**recv_cmd, "timeout": timeout})
            ready = receiver.recv(30.0 + timeout)
            sender.send({**send_cmd, "addr": ready["addr"], "timeout": timeout})
            sent = sender.recv(timeout + 15.0)
            received = receiver.recv(timeout + 15.0)
        except BaseException:
            self.stop()
            raise
        return received, sent


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def _summary_ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50": _pct(xs, 50) * 1e3,
        "p90": _pct(xs, 90) * 1e3,
        "p99": _pct(xs, 99) * 1e3,
        "mean": statistics.fmean(xs) * 1e3,
        "min": min(xs) * 1e3,
        "max": max(xs) * 1e3,
    }


def _figure(
    key: str,
    name: str,
    unit: str,
    crust_value: float | None,
    baseline: float | None,
    *,
    higher_is_better: bool,
    target: str | None = None,
    met: bool | None = None,
    details: dict[str, Any] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    ratio = (
        crust_value / baseline
        if crust_value is not None and baseline is not None and baseline > 0
        else None
    )
    return {
        "key": key,
        "figure": name,
        "unit": unit,
        "crust": crust_value,
        "baseline": baseline,
        "ratio": ratio,
        "higher_is_better": higher_is_better,
        "target": target,
        "met": met,
        "details": details or {},
        "error": error,
    }


def _size_name(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def _bulk_once(
    pair: WorkerPair, kind: str, size: int, count: int, timeout: float
) -> dict[str, Any]:
    r, s = pair.run(
        {"op": f"{kind}_bulk_recv", "count": count},
        {"op": f"{kind}_bulk_send", "size": size, "count": count},
        timeout,
    )
    if r["messages"] != count or r["bytes"] != size * count:
        raise RuntimeError(f"{kind}: received {r['messages']} messages, {r['bytes']} bytes")
    seconds = r["t_last"] - s["t_start"]
    return {
        "seconds": seconds,
        "mb_per_s": size * count / seconds / 1e6,
        "msgs_per_s": count / seconds,
        "receiver_first_to_last_s": r["t_last"] - r["t_first"],
        "sender_enqueue_s": s["t_sent"] - s["t_start"],
        "sender_until_ack_s": s["t_ack"] - s["t_start"],
        "receiver_cpu_s": r["cpu_s"],
        "sender_cpu_s": s["cpu_s"],
        "receiver_cpu_ns_per_byte": r["cpu_s"] * 1e9 / (size * count),
        "sender_cpu_ns_per_byte": s["cpu_s"] * 1e9 / (size * count),
    }


def _bulk(
    pair: WorkerPair, plan: Plan, size: int, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    count = message_count(plan, size)
    runs: dict[str, list[dict[str, Any]]] = {"crust": [], "plain": []}
    for rep in range(plan.repeats):
        for kind in ("crust", "plain"):
            progress(f"bulk {_size_name(size)} x {count}: {kind} run {rep + 1}/{plan.repeats}")
            runs[kind].append(_bulk_once(pair, kind, size, count, plan.timeout))
            progress(f"    {runs[kind][-1]['mb_per_s']:.1f} MB/s")
    mbs = {k: _median([r["mb_per_s"] for r in v]) for k, v in runs.items()}
    ratio = mbs["crust"] / mbs["plain"]
    details = {"messages": count, "bytes": count * size, "repeats": plan.repeats, "runs": runs}
    out = [
        _figure(
            f"bulk_{size}",
            f"bulk throughput, {_size_name(size)} messages",
            "MB/s",
            mbs["crust"],
            mbs["plain"],
            higher_is_better=True,
            target=f">= {BULK_TARGET_RATIO:.2f}x baseline",
            met=ratio >= BULK_TARGET_RATIO,
            details=details,
        )
    ]
    if size == SMALL:
        msgs = {k: _median([r["msgs_per_s"] for r in v]) for k, v in runs.items()}
        out.append(
            _figure(
                "small_msgs",
                f"{SMALL} B messages/s, one connection",
                "msg/s",
                msgs["crust"],
                msgs["plain"],
                higher_is_better=True,
                target=f">= {SMALL_MSGS_TARGET:,.0f} msg/s",
                met=msgs["crust"] >= SMALL_MSGS_TARGET,
                details={"messages": count, "same_runs_as": f"bulk_{size}"},
            )
        )
    return out


def _latency(pair: WorkerPair, plan: Plan, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    n = plan.latency_count + plan.latency_warmup
    w = plan.latency_warmup
    res: dict[str, dict[str, list[float]]] = {}
    cpu_ms: dict[str, dict[str, float]] = {}
    for kind, order in (("crust", "lesser"), ("plain", ""), ("crust", "greater")):
        label = f"{kind} {order}".strip()
        progress(f"latency: {label}, {plan.latency_count} sequential connections (+{w} warm-up)")
        r, s = pair.run(
            {"op": f"{kind}_echo", "count": n},
            {"op": f"{kind}_connect_seq", "count": n, "order": order},
            plan.timeout,
        )
        res[label] = {
            "one_way": r["one_way"][w:],
            "connect": s["connect"][w:],
            "round_trip": s["round_trip"][w:],
            "cycle": s["cycle"][w:],
        }
        cpu_ms[label] = {"dialler": s["cpu_s"] * 1e3 / n, "listener": r["cpu_s"] * 1e3 / n}
    c, g, p = res["crust lesser"], res["crust greater"], res["plain"]
    sc = {k: _summary_ms(v) for k, v in c.items()}
    sg = {k: _summary_ms(v) for k, v in g.items()}
    sp = {k: _summary_ms(v) for k, v in p.items()}
    details = {
        "connections": plan.latency_count,
        "warmup": w,
        "crust_dialler_lesser_ms": sc,
        "crust_dialler_greater_ms": sg,
        "plain_ms": sp,
        "cpu_ms_per_connection": cpu_ms,
    }
    p50 = sc["one_way"]["p50"]
    p50_g = sg["one_way"]["p50"]
    seq_c = len(c["cycle"]) / sum(c["cycle"])
    seq_p = len(p["cycle"]) / sum(p["cycle"])
    target = f"<= {HANDSHAKE_P50_TARGET_MS:g} ms"
    return [
        _figure(
            "connect_first_msg_p50",
            "connect + handshake + first message received, p50",
            "ms",
            p50,
            sp["one_way"]["p50"],
            higher_is_better=False,
            target=target,
            met=p50 <= HANDSHAKE_P50_TARGET_MS,
            details=details,
        ),
        _figure(
            "connect_first_msg_p99",
            "connect + handshake + first message received, p99",
            "ms",
            sc["one_way"]["p99"],
            sp["one_way"]["p99"],
            higher_is_better=False,
        ),
        _figure(
            "connect_first_msg_p50_greater",
            "same, p50, dialler has the greater peer id",
            "ms",
            p50_g,
            sp["one_way"]["p50"],
            higher_is_better=False,
            target=target,
            met=p50_g <= HANDSHAKE_P50_TARGET_MS,
        ),
        _figure(
            "connect_round_trip_p50",
            "connect + first message round trip (dialler's clock), p50",
            "ms",
            sc["round_trip"]["p50"],
            sp["round_trip"]["p50"],
            higher_is_better=False,
        ),
        _figure(
            "connect_round_trip_p99",
            "connect + first message round trip (dialler's clock), p99",
            "ms",
            sc["round_trip"]["p99"],
            sp["round_trip"]["p99"],
            higher_is_better=False,
        ),
        _figure(
            "connections_seq",
            "new connections/s, sequential (connect, message, echo, close)",
            "conn/s",
            seq_c,
            seq_p,
            higher_is_better=True,
        ),
    ]


def _cycles(pair: WorkerPair, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    rates: dict[str, float] = {}
    for kind in ("crust", "plain"):
        progress(f"connections/s: {kind}, {plan.cycles_count} with {plan.concurrency} clients")
        _, s = pair.run(
            {"op": f"{kind}_echo", "count": plan.cycles_count},
            {"op": f"{kind}_cycles", "count": plan.cycles_count, "concurrency": plan.concurrency},
            plan.timeout,
        )
        rates[kind] = s["connections"] / s["seconds"]
    return _figure(
        "connections_concurrent",
        f"new connections/s, {plan.concurrency} concurrent clients",
        "conn/s",
        rates["crust"],
        rates["plain"],
        higher_is_better=True,
        details={"connections": plan.cycles_count, "concurrency": plan.concurrency},
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx2", "avx512f", "sha_ni")
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _git_state(path: str) -> str | None:
    """``<commit>`` (``+dirty`` when the package's files differ from it), if ``path`` is in
    a git work tree."""
    try:
        head = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None


def environment() -> dict[str, Any]:
    """The facts that make two runs comparable."""
    import cryptography

    openssl = "unknown"
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl import backend

        openssl = backend.openssl_version_text()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cryptography": cryptography.__version__,
        "openssl": openssl,
        "crust": crust.__version__,
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpus": os.cpu_count(),
        "cpus_usable": affinity,
        "platform": platform.platform(),
        "event_loop": "asyncio default (selector)",
        "crust_path": os.path.dirname(crust.__file__),
        "crust_git": _git_state(os.path.dirname(crust.__file__)),
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    quick: bool,
    *,
    progress: Callable[[str], None] | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Run every measurement; return a JSON-serialisable dict (environment, figures).

    Each figure holds ``crust``, ``baseline``, ``ratio`` (crust / baseline), ``unit``, an
    optional ``target`` with ``met``, ``details``, and ``error`` when it could not be
    measured.  ``progress`` receives one line per step (default: silent).

    The workers are started with multiprocessing's ``spawn`` method, so a script calling
    this must guard its entry point with ``if __name__ == "__main__":``.
    """
    plan = QUICK if quick else FULL
    if repeats is not None:
        plan = dataclasses.replace(plan, repeats=max(1, repeats))
    say = progress or (lambda _msg: None)
    figures: list[dict[str, Any]] = []
    started = time.time()
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    pair = WorkerPair()
    try:

        def step(
            measure: Callable[[], list[dict[str, Any]]],
            what: str,
            key: str,
            name: str,
            unit: str,
            higher_is_better: bool,
        ) -> None:
            """Run one measurement; a failure becomes a figure carrying the error."""
            try:
                figures.extend(measure())
            except Exception as exc:
                say(f"{what} failed: {exc}")
                figures.append(
                    _figure(
                        key,
                        name,
                        unit,
                        None,
                        None,
                        higher_is_better=higher_is_better,
                        error=str(exc),
                    )
                )

        for size in SIZES:
            step(
                functools.partial(_bulk, pair, plan, size, say),
                f"bulk {_size_name(size)}",
                f"bulk_{size}",
                f"bulk throughput, {_size_name(size)} messages",
                "MB/s",
                True,
            )
        step(
            functools.partial(_latency, pair, plan, say),
            "latency",
            "connect_first_msg_p50",
            "connect + handshake + first message received, p50",
            "ms",
            False,
        )
        step(
            lambda: [_cycles(pair, plan, say)],
            "connections/s",
            "connections_concurrent",
            "new connections/s, concurrent clients",
            "conn/s",
            True,
        )
    finally:
        pair.stop()
    env = environment()
    env["load_average_before"] = load_before
    return {
        "benchmark": "crust bench_tcp",
        "mode": "quick" if quick else "full",
        "plan": dataclasses.asdict(plan),
        "environment": env,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "notes": [
            "ratio = crust / baseline; baseline = plain asyncio TCP, 4-byte length prefix",
            "sender and receiver run in separate processes on 127.0.0.1",
            "throughput: payload bytes (1 MB = 10**6 B), first send -> last receive, "
            "median of the repeats",
            "latency rows: the dialler has the lesser peer id unless the row says otherwise",
            "details hold every run, CPU time per byte (bulk) and per connection (latency): "
            "CPU time is far less sensitive than wall time to other load on the machine",
        ],
        "figures": figures,
    }


# =============================================================================== output


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "MB/s":
        return f"{value:,.1f} MB/s"
    return f"{value:,.0f} {unit}"


def render(results: dict[str, Any]) -> None:
    """Print ``results`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    env = results["environment"]
    console = Console() if sys.stdout.isatty() else Console(width=132)
    table = Table(
        title=f"crust loopback TCP benchmark ({results['mode']})",
        caption=(
            f"Python {env['python']}, cryptography {env['cryptography']} ({env['openssl']}), "
            f"{env['cpu']} x{env['cpus']}; ratio = crust / baseline (plain asyncio TCP)"
        ),
    )
    for col, justify in (
        ("figure", "left"),
        ("crust", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "figure")  # type: ignore[arg-type]
    for f in results["figures"]:
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[f["met"]]
        name = f["figure"] if f["error"] is None else f"{f['figure']} [red](error)[/]"
        table.add_row(
            name,
            _fmt(f["crust"], f["unit"]),
            _fmt(f["baseline"], f["unit"]),
            ratio,
            f["target"] or "",
            met,
        )
    console.print(table)
    for f in results["figures"]:
        if f["error"]:
            console.print(f"[red]{f['key']}[/]: {f['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_tcp",
        description="crust vs plain asyncio TCP on loopback (throughput, messages/s, latency)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="much smaller counts (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="bulk repeats (median)")
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C does: through the finally that stops the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(args.quick, progress=_stderr, repeats=args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        render(results)
    return 1 if any(f["error"] for f in results["figures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
