"""Scale: one node holding many authenticated peers at once (crust issue 8, item 2).

The node runs in this process; ``--clients`` worker processes each open ``--peers`` crust
services (no listeners) that connect to it over loopback TCP and stay connected with
heartbeats running. Measured: time to connect them all, the node's memory per idle
connection (RSS and Python heap growth, divided by the number of peers), and that a message
sent by the node to every peer arrives at every peer.

    .venv/bin/python -m benchmarks.bench_scale                  # 1000 peers (4 x 250)
    .venv/bin/python -m benchmarks.bench_scale --clients 2 --peers 50 --json   # smoke

Loopback only; every wait is bounded; the workers exit when the parent is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import sys
import time
import tracemalloc
from multiprocessing.connection import Connection as Pipe
from typing import Any

import crust
from crust.events import MessageReceived, PeerConnected

TIMEOUT = 120.0


def rss_bytes() -> int:
    """Current resident set size (Linux /proc), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def client_main(pipe: Pipe, contact: str, peers: int) -> None:
    asyncio.run(_client(pipe, contact, peers))


async def _client(pipe: Pipe, contact: str, peers: int) -> None:
    cfg = crust.Config.for_testing(listen=(), heartbeat_interval=5.0, heartbeat_timeout=30.0)
    async with contextlib.AsyncExitStack() as stack:
        services = [await stack.enter_async_context(crust.Service(cfg)) for _ in range(peers)]
        sem = asyncio.Semaphore(32)

        async def one(svc: crust.Service) -> None:
            async with sem:
                await svc.connect(contact)

        await asyncio.gather(*(one(s) for s in services))
        pipe.send({"connected": len(services)})

        # wait for the node's broadcast on every peer
        async def receive(svc: crust.Service) -> bool:
            async for ev in svc.events():
                if isinstance(ev, MessageReceived):
                    return ev.data == b"to everyone"
            return False

        got = await asyncio.wait_for(asyncio.gather(*(receive(s) for s in services)), TIMEOUT)
        pipe.send({"received": sum(got)})
        # stay until told to stop (heartbeats keep running meanwhile)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, pipe.recv)


async def run(clients: int, peers: int) -> dict[str, Any]:
    tracemalloc.start()
    cfg = crust.Config.for_testing(
        listen=("tcp://127.0.0.1:0",),
        max_connections=clients * peers + 16,
        max_connections_per_ip=clients * peers + 16,
        max_pending_handshakes=256,
        heartbeat_interval=5.0,
        heartbeat_timeout=30.0,
        event_queue_size=clients * peers * 4,
    )
    ctx = multiprocessing.get_context("spawn")
    async with crust.Service(cfg) as node:
        contact = node.contacts()[0]
        gc.collect()
        rss0, heap0 = rss_bytes(), tracemalloc.get_traced_memory()[0]
        procs, pipes = [], []
        for _ in range(clients):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(child, contact, peers), daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        try:
            for pipe in pipes:
                msg = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), TIMEOUT)
                assert msg["connected"] == peers
            connect_s = time.monotonic() - start
            # the node's side of each connection is up once its PeerConnected arrived
            seen = 0
            async with asyncio.timeout(TIMEOUT):
                async for ev in node.events():
                    seen += isinstance(ev, PeerConnected)
                    if seen >= clients * peers:
                        break
            held = len(node.peers())
            gc.collect()
            rss1, heap1 = rss_bytes(), tracemalloc.get_traced_memory()[0]
            for peer in node.peers():
                await node.send(peer, b"to everyone")
            received = 0
            for pipe in pipes:
                msg = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), TIMEOUT)
                received += msg["received"]
        finally:
            for pipe in pipes:
                with contextlib.suppress(OSError):
                    pipe.send("stop")
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
    n = clients * peers
    return {
        "peers": n,
        "held": held,
        "connect_seconds": round(connect_s, 2),
        "connections_per_second": round(n / connect_s, 1),
        "rss_per_connection_kib": round((rss1 - rss0) / max(held, 1) / 1024, 1),
        "heap_per_connection_kib": round((heap1 - heap0) / max(held, 1) / 1024, 1),
        "delivered": received,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--peers", type=int, default=250, help="peers per client process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.clients, args.peers))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    ok = result["held"] == result["peers"] == result["delivered"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
