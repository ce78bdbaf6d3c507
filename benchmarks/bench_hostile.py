"""Hostile peers (crust issue 8, item 4): does a node under attack keep serving its peers?

A node runs in this process and echoes its honest peer's probes. A worker process (the
honest peer) measures the round-trip time of 64-byte probes, first with the node idle, then
while another worker attacks the same node with

* a **flood peer**: an authenticated crust peer (over QUIC) sending 64-byte messages as
  fast as it can; the node cuts it off at ``max_peer_bytes_per_second`` (below), and it
  comes back at once with a fresh identity, again and again;
* a **half-open handshake storm**: waves of TCP connections that send part of a handshake
  and are then reset, as fast as the attacker can open them.

Both come from another loopback address (127.0.0.66) than the honest peer (127.0.0.1).

Reported: p50 and p99 round trip, attacked / idle (target: p99 at most 2x idle), and what
the attack amounted to. Loopback only; every phase is bounded in time (about 30 s in all).

    .venv/bin/python -m benchmarks.bench_hostile            # rich table
    .venv/bin/python -m benchmarks.bench_hostile --json
    .venv/bin/python -m benchmarks.bench_hostile --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import crust
from benchmarks.common import (
    SMALL,
    Progress,
    Worker,
    environment,
    figure,
    host_port,
    load_average,
    main,
    pct,
    summary_ms,
)
from crust import errors
from crust.events import AbuseDetected, MessageReceived
from crust.proto.session import Session, SessionParams

MODULE = "benchmarks.bench_hostile"
ATTACKER = "127.0.0.66"
PACE = 0.005
"""Seconds between two probes of the honest peer."""
NODE_LIMITS: dict[str, Any] = {
    "max_peer_bytes_per_second": 1024 * 1024,
    "max_peer_burst_bytes": 1024 * 1024,
    "handshake_timeout": 2.0,
}
"""The attacked node's configuration beyond ``Config.for_testing``: a per-peer budget of
1 MiB/s (bursts of 1 MiB), what a node expecting chat-sized traffic would set."""
STORM_WAVE = 100
LINGER_RESET = struct.pack("ii", 1, 0)


# =============================================================================== workers


async def honest(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Connect to the node, time ``count`` probes (idle), report, wait for "go", time
    ``count`` more (under attack)."""
    loop = asyncio.get_running_loop()
    pin(set(cmd["node_cpus"]) if cmd.get("node_cpus") else None)
    cfg = crust.Config.for_testing(listen=())
    async with crust.Service(cfg) as svc:
        node = await svc.connect(cmd["tcp"])
        events = svc.events()

        async def measure() -> list[float]:
            rtts: list[float] = []
            for i in range(cmd["count"]):
                data = b"P" + i.to_bytes(4, "big") + bytes(SMALL - 5)
                t0 = time.monotonic()
                await svc.send(node, data)
                async for ev in events:
                    if isinstance(ev, MessageReceived) and ev.data == data:
                        break
                rtts.append(time.monotonic() - t0)
                await asyncio.sleep(PACE)
            return rtts

        idle = await measure()
        pipe.send({"idle": idle})
        go = await loop.run_in_executor(None, pipe.recv)
        assert go == "go"
        attacked = await measure()
    return {"attacked": attacked}


def pin(cpus: set[int] | None) -> set[int] | None:
    """Run this process on ``cpus`` only (Linux), when the machine has them; returns the
    CPUs it runs on (None where affinity is not supported)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    usable = os.sched_getaffinity(0)
    if cpus and cpus <= usable and cpus != usable:
        os.sched_setaffinity(0, cpus)
    return os.sched_getaffinity(0)


async def attack(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Flood peer and handshake storm against the node until the parent says "stop"."""
    loop = asyncio.get_running_loop()
    cpus = pin(set(cmd["attacker_cpus"]) if cmd.get("attacker_cpus") else None)
    stop = asyncio.Event()
    host, port = host_port(cmd["tcp"].split("://", 1)[1].split("#", 1)[0])
    counts = {"flood_connections": 0, "flood_messages": 0, "flood_refused": 0, "half_open": 0}

    async def flood() -> None:
        payload = os.urandom(SMALL)
        # QUIC dials leave from the listener's socket: the attacker's own address
        cfg = crust.Config.for_testing(listen=(f"quic://{ATTACKER}:0",), connect_timeout=2.0)
        while not stop.is_set():
            async with crust.Service(cfg) as svc:  # a fresh identity each time
                try:
                    node = await svc.connect(cmd["quic"])
                except errors.CrustError:
                    counts["flood_refused"] += 1
                    continue
                counts["flood_connections"] += 1
                with contextlib.suppress(errors.NotConnected):
                    while not stop.is_set():
                        for _ in range(500):
                            await svc.send(node, payload)
                            counts["flood_messages"] += 1
                        await asyncio.sleep(0)

    params = SessionParams(identity=crust.Identity.generate(), network_name="crust")
    opening = b"".join(bytes(b) for b in Session(params, initiator=True, now=0).data_to_send())

    async def half_open(i: int) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((ATTACKER, 0))
        try:
            await loop.sock_connect(s, (host, port))
            s.send(opening[: i % len(opening)])
        except OSError:
            s.close()
            return None
        return s

    async def storm() -> None:
        n = 0
        while not stop.is_set():
            socks = await asyncio.gather(*(half_open(n + i) for i in range(STORM_WAVE)))
            n += STORM_WAVE
            counts["half_open"] += STORM_WAVE
            for s in socks:
                if s is not None:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    s.close()

    kinds = cmd.get("attacks", ["flood", "storm"])
    tasks = [
        asyncio.ensure_future(job())
        for name, job in (("flood", flood), ("storm", storm))
        if name in kinds
    ]
    pipe.send({"started": True})
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    stop.set()
    done, _ = await asyncio.wait(tasks, timeout=10)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return {**counts, "attacker_cpus": sorted(cpus) if cpus else None}


HANDLERS = {"honest": honest, "attack": attack}


# =============================================================================== parent


async def _node(
    count: int, say: Progress, timeout: float, pin_cpus: bool, attacks: list[str]
) -> tuple[list[float], list[float], dict[str, Any]]:
    cfg = crust.Config.for_testing(**NODE_LIMITS)  # TCP and QUIC on 127.0.0.1
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    good = Worker(ctx, "bench-honest", MODULE)
    bad = Worker(ctx, "bench-attacker", MODULE)
    # the attacker stands for other machines: with two CPUs or more, it gets its own, and
    # the node and its honest peer share the first (both phases alike)
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    node_cpus: list[int] | None = None
    attacker_cpus: list[int] | None = None
    if pin_cpus and len(usable) >= 2:
        node_cpus, attacker_cpus = usable[:1], usable[1:]
        pin(set(node_cpus))
    abuse: dict[str, int] = {}
    flood_messages = 0
    try:
        async with crust.Service(cfg) as node:

            async def serve() -> None:
                nonlocal flood_messages
                async for ev in node.events():
                    if isinstance(ev, MessageReceived):
                        if ev.data[:1] == b"P":
                            await node.send(ev.peer, ev.data)
                        else:
                            flood_messages += 1
                    elif isinstance(ev, AbuseDetected):
                        abuse[ev.kind] = abuse.get(ev.kind, 0) + 1

            server = asyncio.ensure_future(serve())
            tcp, quic = (
                next(c for c in node.contacts() if c.startswith(s)) for s in ("tcp", "quic")
            )
            extra = {
                "timeout": timeout,
                "tcp": tcp,
                "quic": quic,
                "node_cpus": node_cpus,
                "attacker_cpus": attacker_cpus,
                "attacks": attacks,
            }
            say(f"idle: {count} probes")
            good.send({"op": "honest", "count": count, **extra})
            idle = (await loop.run_in_executor(None, good.recv, timeout))["idle"]
            say("attack: flood peer + half-open storm")
            bad.send({"op": "attack", **extra})
            await loop.run_in_executor(None, bad.recv, 30.0)
            before = node.statistics()
            say(f"under attack: {count} probes")
            good.pipe.send("go")
            attacked = (await loop.run_in_executor(None, good.recv, timeout))["attacked"]
            after = node.statistics()
            bad.pipe.send("stop")
            counts = await loop.run_in_executor(None, bad.recv, 30.0)
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
    finally:
        good.stop()
        bad.stop()
    details = {
        **counts,
        "flood_messages_delivered": flood_messages,
        "abuse_events": abuse,
        "node_limits_hit": after.limits_hit - before.limits_hit,
        "node_handshake_failures": after.handshake_failures - before.handshake_failures,
        "node_limits": NODE_LIMITS,
        "node_cpus": node_cpus,
    }
    return idle, attacked, details


def run(args: argparse.Namespace, say: Progress) -> dict[str, Any]:
    count = 200 if args.quick else 1500
    timeout = 60.0
    attacks = ["flood", "storm"] if args.attack == "both" else [args.attack]
    idle, attacked, details = asyncio.run(_node(count, say, timeout, not args.no_pin, attacks))
    figures = []
    for p in (50, 99):
        a, b = pct(attacked, p) * 1e3, pct(idle, p) * 1e3
        ratio = a / b if b > 0 else None
        figures.append(
            figure(
                f"rtt_p{p}",
                f"64 B probe round trip, p{p} (under attack vs idle)",
                "ms",
                a,
                b,
                higher_is_better=False,
                target="<= 2.00x idle" if p == 99 else None,
                met=None if p != 99 or ratio is None else ratio <= 2.0,
                details={"idle": summary_ms(idle), "attacked": summary_ms(attacked), **details},
            )
        )
    return {
        "mode": "quick" if args.quick else "full",
        "probes_per_phase": count,
        "figures": figures,
        "attack": details,
        "load_average": load_average(),
        "environment": environment(),
    }


def cli(argv: list[str] | None = None) -> int:
    return main(
        argv,
        prog="bench_hostile",
        description=(__doc__ or "").splitlines()[0],
        run=run,
        title="crust under attack: honest round trip",
        baseline="the same node idle",
        add_arguments=_arguments,
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not give the attacker its own CPU (all processes share every CPU)",
    )
    parser.add_argument(
        "--attack",
        choices=("both", "flood", "storm"),
        default="both",
        help="which attack runs during the second phase (default: both at once)",
    )


if __name__ == "__main__":
    sys.exit(cli())
