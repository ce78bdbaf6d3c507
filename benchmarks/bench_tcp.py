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

import asyncio
import contextlib
import functools
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from typing import Any, cast

from benchmarks import common
from benchmarks.common import (
    SMALL,
    T0,
    BulkPlan,
    Handler,
    KiB,
    MiB,
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

SIZES = (64, KiB, 64 * KiB, MiB)

BULK_TARGET_RATIO = 0.40
SMALL_MSGS_TARGET = 200_000.0
HANDSHAKE_P50_TARGET_MS = 2.0

READ_BUFFER = 256 * KiB
WRITE_HIGH_WATER = 512 * KiB  # the same limits crust's TCP transport sets
WRITE_LOW_WATER = 128 * KiB
INLINE_FRAME = 16 * KiB
"""Plain baseline: messages up to this size are written as one ``prefix + payload``."""

_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class Plan(BulkPlan):
    """How much work each measurement does (beyond the bulk transfers)."""

    latency_count: int
    latency_warmup: int
    cycles_count: int
    concurrency: int


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
    host, port = host_port(addr)
    tr, _ = await asyncio.get_running_loop().create_connection(lambda: stream, host, port)
    return tr


async def _plain_close(tr: asyncio.Transport, stream: PlainStream) -> None:
    tr.close()
    await asyncio.wait_for(asyncio.shield(stream.closed), 5.0)


# =============================================================================== worker side


async def _plain_bulk_recv(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    got = nbytes = 0
    t_first = t_last = 0.0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        nonlocal got, nbytes, t_first, t_last
        if not got:
            t_first = clock()
        got += 1
        nbytes += len(data)
        if got == count:
            t_last = clock()
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
        t_start = clock()
        for _ in range(count):
            if stream.paused:
                await stream.drain()
            send(payload)
        t_sent = clock()
        await ack
        t_ack = clock()
        cpu1 = time.process_time()
    finally:
        await _plain_close(tr, stream)
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack, "cpu_s": cpu1 - cpu0}


async def _plain_echo(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    one_way: list[float] = []
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        one_way.append(clock() - T0.unpack_from(data)[0])
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


async def _plain_cycle(addr: str) -> tuple[float, float, float, float]:
    """One new connection: connect, probe, echo, close -> (t0, t1, t2, t3)."""
    echoed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(stream: PlainStream, data: bytes | bytearray) -> None:
        if not echoed.done():
            echoed.set_result(None)

    stream = PlainStream(on_message)
    t0 = clock()
    tr = await _plain_connect(addr, stream)
    t1 = clock()
    stream.send(probe(t0))
    await echoed
    t2 = clock()
    await _plain_close(tr, stream)
    return t0, t1, t2, clock()


async def _plain_connect_seq(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    return await common.sequential_cycles(
        functools.partial(_plain_cycle, cmd["addr"]), cmd["count"]
    )


async def _plain_cycles(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    cycles = [functools.partial(_plain_cycle, cmd["addr"])] * cmd["concurrency"]
    return await common.concurrent_cycles(cycles, cmd["count"] // cmd["concurrency"])


HANDLERS: dict[str, Handler] = {
    "crust_bulk_recv": common.crust_bulk_recv,
    "crust_bulk_send": common.crust_bulk_send,
    "plain_bulk_recv": _plain_bulk_recv,
    "plain_bulk_send": _plain_bulk_send,
    "crust_echo": common.crust_echo,
    "plain_echo": _plain_echo,
    "crust_connect_seq": common.crust_connect_seq,
    "plain_connect_seq": _plain_connect_seq,
    "crust_cycles": common.crust_cycles,
    "plain_cycles": _plain_cycles,
}


# =============================================================================== parent side


def _bulk(
    pair: WorkerPair, plan: Plan, size: int, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    count = plan.message_count(size)
    runs: dict[str, list[dict[str, Any]]] = {"crust": [], "plain": []}
    for rep in range(plan.repeats):
        for kind in ("crust", "plain"):
            progress(f"bulk {size_name(size)} x {count}: {kind} run {rep + 1}/{plan.repeats}")
            runs[kind].append(bulk_once(pair, kind, size, count, plan.timeout))
            progress(f"    {runs[kind][-1]['mb_per_s']:.1f} MB/s")
    mbs = {k: median([r["mb_per_s"] for r in v]) for k, v in runs.items()}
    ratio = mbs["crust"] / mbs["plain"]
    details = {"messages": count, "bytes": count * size, "repeats": plan.repeats, "runs": runs}
    out = [
        figure(
            f"bulk_{size}",
            f"bulk throughput, {size_name(size)} messages",
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
        msgs = {k: median([r["msgs_per_s"] for r in v]) for k, v in runs.items()}
        out.append(
            figure(
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
    sc = {k: summary_ms(v) for k, v in c.items()}
    sg = {k: summary_ms(v) for k, v in g.items()}
    sp = {k: summary_ms(v) for k, v in p.items()}
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
        figure(
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
        figure(
            "connect_first_msg_p99",
            "connect + handshake + first message received, p99",
            "ms",
            sc["one_way"]["p99"],
            sp["one_way"]["p99"],
            higher_is_better=False,
        ),
        figure(
            "connect_first_msg_p50_greater",
            "same, p50, dialler has the greater peer id",
            "ms",
            p50_g,
            sp["one_way"]["p50"],
            higher_is_better=False,
            target=target,
            met=p50_g <= HANDSHAKE_P50_TARGET_MS,
        ),
        figure(
            "connect_round_trip_p50",
            "connect + first message round trip (dialler's clock), p50",
            "ms",
            sc["round_trip"]["p50"],
            sp["round_trip"]["p50"],
            higher_is_better=False,
        ),
        figure(
            "connect_round_trip_p99",
            "connect + first message round trip (dialler's clock), p99",
            "ms",
            sc["round_trip"]["p99"],
            sp["round_trip"]["p99"],
            higher_is_better=False,
        ),
        figure(
            "connections_seq",
            "new connections/s, sequential (connect, message, echo, close)",
            "conn/s",
            seq_c,
            seq_p,
            higher_is_better=True,
        ),
    ]


def run(
    quick: bool,
    *,
    progress: Callable[[str], None] | None = None,
    repeats: int | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    """Run every measurement; return a JSON-serialisable dict (environment, figures).

    Each figure holds ``crust``, ``baseline``, ``ratio`` (crust / baseline), ``unit``, an
    optional ``target`` with ``met``, ``details``, and ``error`` when it could not be
    measured.  ``progress`` receives one line per step (default: silent); with ``profile``
    (a directory) every worker command runs under cProfile (see :mod:`benchmarks.common`).

    The workers are started with multiprocessing's ``spawn`` method, so a script calling
    this must guard its entry point with ``if __name__ == "__main__":``.
    """
    plan = common.choose_plan(quick, repeats, QUICK, FULL)
    say = progress or (lambda _msg: None)
    figures: list[dict[str, Any]] = []
    started = time.time()
    load_before = common.load_average()
    pair = WorkerPair("benchmarks.bench_tcp", profile=profile)
    try:

        def step(
            measure: Callable[[], list[dict[str, Any]]],
            what: str,
            key: str,
            name: str,
            unit: str,
            higher_is_better: bool,
        ) -> None:
            run_step(figures, say, measure, what, key, name, unit, higher_is_better)

        for size in SIZES:
            step(
                functools.partial(_bulk, pair, plan, size, say),
                f"bulk {size_name(size)}",
                f"bulk_{size}",
                f"bulk throughput, {size_name(size)} messages",
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
            lambda: [common.cycles_figure(pair, plan, "plain", say)],
            "connections/s",
            "connections_concurrent",
            "new connections/s, concurrent clients",
            "conn/s",
            True,
        )
    finally:
        pair.stop()
    return common.results(
        "bench_tcp",
        quick,
        plan,
        started,
        load_before,
        [
            "ratio = crust / baseline; baseline = plain asyncio TCP, 4-byte length prefix",
            "sender and receiver run in separate processes on 127.0.0.1",
            "throughput: payload bytes (1 MB = 10**6 B), first send -> last receive, "
            "median of the repeats",
            "latency rows: the dialler has the lesser peer id unless the row says otherwise",
            "details hold every run, CPU time per byte (bulk) and per connection (latency): "
            "CPU time is far less sensitive than wall time to other load on the machine",
        ],
        figures,
    )


def main(argv: list[str] | None = None) -> int:
    return common.main(
        argv,
        prog="python -m benchmarks.bench_tcp",
        description="crust vs plain asyncio TCP on loopback (throughput, messages/s, latency)",
        run=lambda args, say: run(
            args.quick, progress=say, repeats=args.repeats, profile=args.profile
        ),
        title="crust loopback TCP benchmark",
        baseline="plain asyncio TCP",
    )


if __name__ == "__main__":
    sys.exit(main())
