"""Userspace link emulator: delay, jitter, loss, duplication and reordering between two
interfaces.

The lab uses it instead of ``tc netem`` when the kernel has no ``sch_netem`` (e.g. minimal VM
kernels without loadable modules).  Run inside the lab's switch namespace::

    ip netns exec SW python linkemu.py

It reads JSON lines on stdin and answers each with one JSON line.  A request without ``cmd``
joins two interfaces (or updates the impairment of an existing pair) and is answered
``{"ok": true}``::

    {"a": "p5", "b": "p5w", "delay_ms": 30, "jitter_ms": 0, "loss_pct": 0,
     "duplicate_pct": 0, "reorder_pct": 0}

``{"cmd": "stats"}`` answers ``{"ok": true, "stats": {...}}``: per pair (named by ``a``) and
direction (``a_to_b``, ``b_to_a``) the frames received, sent, lost, duplicated, reordered and
still queued, send errors, and the kernel's drops on the receiving socket.
``{"cmd": "seed", "seed": 7}`` makes the random choices repeatable.

Every frame received on one interface is sent out of the other after ``delay_ms`` (plus uniform
``+-jitter_ms``) unless lost with probability ``loss_pct``; with probability ``duplicate_pct`` a
second copy follows (with its own delay), and with probability ``reorder_pct`` a copy is sent at
once, without the delay, overtaking the frames still held back (``tc netem``'s ``reorder``;
it needs a delay to mean anything).  Both directions are impaired alike, as ``tc netem`` on both
ends of a link would.  The scheduling is :class:`Direction` and :class:`Schedule`, pure code
that takes the time and a random source (``tests/lab/test_linkemu.py`` tests it without
sockets).  Raw ``AF_PACKET`` sockets with ``PACKET_VNET_HDR`` carry GSO and checksum-offload
state across unchanged.  The process ends when stdin closes.  Standard library only.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import random
import select
import socket
import struct
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Final, Generic, Protocol, TypeVar

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_STATISTICS: Final = 6
PACKET_VNET_HDR: Final = 15
PACKET_IGNORE_OUTGOING: Final = 23
PACKET_OUTGOING: Final = 4
MAX_FRAME: Final = 1 << 18
SOCKET_BUFFER: Final = 4 << 20
MAX_QUEUED: Final = 10_000
"""Frames held back per direction at most; beyond that a frame is lost (a router's queue)."""


class RandomSource(Protocol):
    """What the scheduling needs of :class:`random.Random`."""

    def random(self) -> float: ...

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class Impairment:
    """One direction's impairment: seconds and probabilities (0..1)."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0

    @classmethod
    def from_request(cls, request: Mapping[str, object]) -> Impairment:
        """From a request's ``*_ms`` and ``*_pct`` fields; ``ValueError`` names a bad one."""

        def number(name: str, high: float) -> float:
            raw = request.get(name, 0)
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"{name} must be a number, not {raw!r}")
            value = float(raw)
            if not math.isfinite(value) or not 0 <= value <= high:
                raise ValueError(f"{name} must be in 0..{high:g}, not {raw!r}")
            return value

        return cls(
            delay=number("delay_ms", 60_000) / 1000,
            jitter=number("jitter_ms", 60_000) / 1000,
            loss=number("loss_pct", 100) / 100,
            duplicate=number("duplicate_pct", 100) / 100,
            reorder=number("reorder_pct", 100) / 100,
        )


@dataclass
class Counters:
    """One direction's frame counts."""

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    overflowed: int = 0
    """Lost because :data:`MAX_QUEUED` frames were already held back."""
    gso_frames: int = 0
    """Frames that were GSO super-frames (several packets the kernel has not cut yet)."""
    largest: int = 0
    """Bytes of the largest frame (its virtio-net header included)."""
    send_errors: int = 0
    kernel_drops: int = 0
    """Frames the kernel dropped before we read them (receive buffer full)."""
    queued: int = 0
    max_queued: int = 0


@dataclass
class Direction:
    """The fate of frames going one way through an impaired link (no I/O)."""

    impairment: Impairment = field(default_factory=Impairment)
    counters: Counters = field(default_factory=Counters)

    def admit(self, size: int, now: float, rng: RandomSource, *, gso: bool = False) -> list[float]:
        """A frame of ``size`` bytes arrived at ``now``: the times its copies leave.

        Empty when it is lost (or the queue is full), two times when it is duplicated; a
        time equal to ``now`` means at once.  ``gso``: the frame is a GSO super-frame.
        Counts everything in :attr:`counters`.
        """
        c, imp = self.counters, self.impairment
        c.frames_in += 1
        c.bytes_in += size
        c.largest = max(c.largest, size)
        if gso:
            c.gso_frames += 1
        if imp.loss and rng.random() < imp.loss:
            c.lost += 1
            return []
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            c.duplicated += 1
        times: list[float] = []
        for _ in range(copies):
            if imp.reorder and (imp.delay or imp.jitter) and rng.random() < imp.reorder:
                c.reordered += 1
                times.append(now)
                continue
            delay = imp.delay
            if imp.jitter:
                delay = max(0.0, delay + rng.uniform(-imp.jitter, imp.jitter))
            times.append(now + delay)
        held = [t for t in times if t > now]
        if c.queued + len(held) > MAX_QUEUED:
            c.overflowed += 1
            return [t for t in times if t <= now]
        c.queued += len(held)
        c.max_queued = max(c.max_queued, c.queued)
        return times

    def sent(self, size: int, *, held: bool, ok: bool = True) -> None:
        """A copy left (``held``: it had been queued); ``ok=False``: the send failed."""
        c = self.counters
        if held:
            c.queued -= 1
        if ok:
            c.frames_out += 1
            c.bytes_out += size
        else:
            c.send_errors += 1


T = TypeVar("T")


class Schedule(Generic[T]):
    """Frames held back until their time; equal times leave in arrival order."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, item))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[T]:
        """Every item whose time has come, earliest first."""
        out: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    # Our own transmissions would come back on this socket and take half its buffer.
    with contextlib.suppress(OSError):
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
    ):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)  # root: past rmem_max
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


@dataclass
class _Port:
    """One end of a joined pair: its socket, where its frames go, and their direction."""

    name: str
    sock: socket.socket
    out: socket.socket | None = None
    direction: Direction = field(default_factory=Direction)


class Emulator:
    def __init__(self) -> None:
        self.ports: dict[str, _Port] = {}
        self.by_fd: dict[int, _Port] = {}
        self.pairs: dict[str, tuple[_Port, _Port]] = {}
        self.schedule: Schedule[tuple[_Port, bytes]] = Schedule()
        self.rng = random.Random()

    def configure(self, cfg: Mapping[str, object]) -> None:
        a, b = str(cfg["a"]), str(cfg["b"])
        imp = Impairment.from_request(cfg)
        for name in (a, b):
            if name not in self.ports:
                port = _Port(name, _open(name))
                self.ports[name] = port
                self.by_fd[port.sock.fileno()] = port
        pa, pb = self.ports[a], self.ports[b]
        pa.out, pb.out = pb.sock, pa.sock
        pa.direction.impairment = imp
        pb.direction.impairment = imp
        self.pairs[a] = (pa, pb)

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, (pa, pb) in self.pairs.items():
            for port in (pa, pb):
                self._kernel_drops(port)
            out[name] = {
                "b": pb.name,
                "impairment": asdict(pa.direction.impairment),
                "a_to_b": asdict(pa.direction.counters),
                "b_to_a": asdict(pb.direction.counters),
            }
        return out

    @staticmethod
    def _kernel_drops(port: _Port) -> None:
        with contextlib.suppress(OSError):
            raw = port.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            _, drops = struct.unpack("II", raw)  # reading resets the kernel's counters
            port.direction.counters.kernel_drops += drops

    def _pump(self, port: _Port) -> None:
        out = port.out
        if out is None:
            return
        direction = port.direction
        for _ in range(256):
            try:
                frame, addr = port.sock.recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # interface went away (lab teardown)
            if addr[2] == PACKET_OUTGOING:
                continue  # our own transmissions (kernels without PACKET_IGNORE_OUTGOING)
            now = time.monotonic()
            gso = len(frame) > 1 and frame[1] != 0  # virtio_net_hdr.gso_type
            for due in direction.admit(len(frame), now, self.rng, gso=gso):
                if due <= now:
                    self._send(direction, out, frame, held=False)
                else:
                    self.schedule.push(due, (port, frame))

    @staticmethod
    def _send(direction: Direction, out: socket.socket, frame: bytes, *, held: bool) -> None:
        # A full queue or a vanished interface loses the frame, as on a real link.
        try:
            out.send(frame)
        except OSError:
            direction.sent(len(frame), held=held, ok=False)
        else:
            direction.sent(len(frame), held=held)

    def _release_due(self) -> None:
        for port, frame in self.schedule.pop_due(time.monotonic()):
            if port.out is not None:
                self._send(port.direction, port.out, frame, held=True)

    def _request(self, line: bytes) -> dict[str, object]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            cmd = request.get("cmd", "link")
            if cmd == "stats":
                return {"ok": True, "stats": self.stats()}
            if cmd == "seed":
                self.rng.seed(int(request["seed"]))
                return {"ok": True}
            if cmd != "link":
                raise ValueError(f"unknown cmd {cmd!r}")
            self.configure(request)
            return {"ok": True}
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def serve(self) -> int:
        stdin = sys.stdin.fileno()
        buf = b""
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        while True:
            timeout = 1.0
            due = self.schedule.next_due()
            if due is not None:
                timeout = max(0.0, due - time.monotonic())
            socks = [p.sock for p in self.ports.values()]
            ready, _, _ = select.select([stdin, *socks], [], [], timeout)
            for item in ready:
                if isinstance(item, socket.socket):
                    self._pump(self.by_fd[item.fileno()])
            if stdin in ready:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        print(json.dumps(self._request(line)), flush=True)
            self._release_due()


if __name__ == "__main__":
    sys.exit(Emulator().serve())
