"""Userspace link emulator: delay, jitter and loss between two interfaces.

The lab uses it instead of ``tc netem`` when the kernel has no ``sch_netem`` (e.g. minimal VM
kernels without loadable modules).  Run inside the lab's switch namespace::

    ip netns exec SW python linkemu.py

It reads JSON lines on stdin, each joining two interfaces (or updating the impairment of an
existing pair), and answers ``{"ok": true}`` per line::

    {"a": "p5", "b": "p5w", "delay_ms": 30, "jitter_ms": 0, "loss_pct": 0}

Every frame received on one interface is sent out of the other after ``delay_ms`` (plus uniform
``+-jitter_ms``) unless dropped with probability ``loss_pct``; both directions are impaired
alike, as ``tc netem`` on both ends of a link would.  Raw ``AF_PACKET`` sockets with
``PACKET_VNET_HDR`` carry GSO and checksum-offload state across unchanged.  The process ends when
stdin closes.  Standard library only.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Final

ETH_P_ALL: Final = 0x0003
SOL_PACKET: Final = 263
PACKET_VNET_HDR: Final = 15
PACKET_OUTGOING: Final = 4
MAX_FRAME: Final = 1 << 18


@dataclass
class Impairment:
    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


class Emulator:
    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.peer: dict[int, socket.socket] = {}  # fileno -> socket to send out of
        self.imp: dict[int, Impairment] = {}  # fileno -> impairment of that direction
        self.pending: list[tuple[float, int, socket.socket, bytes]] = []
        self.counter = 0

    def configure(self, cfg: dict[str, object]) -> None:
        a, b = str(cfg["a"]), str(cfg["b"])
        imp = Impairment(
            float(str(cfg.get("delay_ms", 0))) / 1000,
            float(str(cfg.get("jitter_ms", 0))) / 1000,
            float(str(cfg.get("loss_pct", 0))) / 100,
        )
        for name in (a, b):
            if name not in self.socks:
                self.socks[name] = _open(name)
        sa, sb = self.socks[a], self.socks[b]
        self.peer[sa.fileno()] = sb
        self.peer[sb.fileno()] = sa
        self.imp[sa.fileno()] = imp
        self.imp[sb.fileno()] = imp

    def _pump(self, s: socket.socket) -> None:
        out = self.peer[s.fileno()]
        imp = self.imp[s.fileno()]
        for _ in range(256):
            try:
                frame, addr = s.recvfrom(MAX_FRAME)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # interface went away (lab teardown)
            if addr[2] == PACKET_OUTGOING:
                continue  # our own transmissions
            if imp.loss and random.random() < imp.loss:
                continue
            delay = imp.delay
            if imp.jitter:
                delay = max(0.0, delay + random.uniform(-imp.jitter, imp.jitter))
            if delay <= 0 and not self.pending:
                self._send(out, frame)
                continue
            self.counter += 1
            heapq.heappush(self.pending, (time.monotonic() + delay, self.counter, out, frame))

    @staticmethod
    def _send(out: socket.socket, frame: bytes) -> None:
        # A full queue or a vanished interface loses the frame, as on a real link.
        with contextlib.suppress(OSError):
            out.send(frame)

    def _release_due(self) -> None:
        now = time.monotonic()
        while self.pending and self.pending[0][0] <= now:
            _, _, out, frame = heapq.heappop(self.pending)
            self._send(out, frame)

    def serve(self) -> int:
        stdin = sys.stdin.fileno()
        buf = b""
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        while True:
            timeout = 1.0
            if self.pending:
                timeout = max(0.0, self.pending[0][0] - time.monotonic())
            ready, _, _ = select.select([stdin, *self.socks.values()], [], [], timeout)
            for item in ready:
                if isinstance(item, socket.socket):
                    self._pump(item)
            if stdin in ready:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    return 0
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    try:
                        self.configure(json.loads(line))
                        reply: dict[str, object] = {"ok": True}
                    except Exception as exc:
                        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    print(json.dumps(reply), flush=True)
            self._release_due()


if __name__ == "__main__":
    sys.exit(Emulator().serve())
