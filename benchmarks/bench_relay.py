"""Relayed throughput: crust through a relay node against crust direct, in the same run.

Run ``python -m benchmarks.bench_relay [--json] [--quick]``, or import :func:`run`
(``crust bench --suites relay``).

Three processes on 127.0.0.1: a relay node, a receiver that has no listener and refuses
introductions (``hole_punching = false``, so the only way to reach it is a circuit through
the node) and a sender that connects to the node and then to the receiver's peer id.  The
sender checks that its connection's path is ``relayed`` before it starts.  Each relayed
transfer is paired with a direct crust TCP transfer of the same size between the same two
worker processes, and reported as ``ratio = relayed / direct``.

The node runs with its per-circuit bandwidth limit raised (``relay_rate``) so the figure
is what a relay can carry, not the default pacing of 4 MiB/s per circuit; its byte limit
is raised to fit the transfer.  MB/s counts payload bytes only; the node forwards the
ciphertext of both ends' records (plus its own framing), which its statistics report as
``relay_bytes``.

Loopback only; every transfer is bounded in bytes and in time, and the worker processes
are always stopped when :func:`run` returns.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from typing import Any

import crust
from benchmarks import common
from benchmarks.common import (
    BulkPlan,
    Handler,
    KiB,
    MiB,
    Worker,
    WorkerPair,
    bulk_once,
    crust_config,
    crust_contact,
    figure,
    median,
    size_name,
)

MODULE = "benchmarks.bench_relay"
SIZES = (KiB, 64 * KiB, MiB)

FULL = BulkPlan(total_bytes=256 * MiB, max_messages=100_000, repeats=3, timeout=180.0)
QUICK = BulkPlan(total_bytes=16 * MiB, max_messages=10_000, repeats=1, timeout=60.0)

ENDS = {"hole_punching": False}
"""Both ends: no punching, so the receiver is reachable only through a circuit."""


def relay_config(plan: BulkPlan) -> dict[str, Any]:
    return {
        "relay_rate": 1 << 40,
        "relay_max_bytes": max(4 * plan.total_bytes, 64 * MiB),
    }


async def relay_node(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Run a relay node until the parent sends anything on the pipe; its statistics."""
    async with crust.Service(crust_config(cmd, True)) as svc:
        pipe.send({"addr": crust_contact(svc, cmd)})
        cpu0 = time.process_time()
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        st = svc.statistics()
        return {
            "relay_bytes": st.relay_bytes,
            "relay_circuits": st.relay_circuits,
            "cpu_s": time.process_time() - cpu0,
        }


HANDLERS: dict[str, Handler] = {
    "crust_bulk_recv": common.crust_bulk_recv,
    "crust_bulk_send": common.crust_bulk_send,
    "relay_node": relay_node,
}


def _relayed_once(
    relay: Worker, pair: WorkerPair, plan: BulkPlan, size: int, count: int
) -> dict[str, Any]:
    relay.send({"op": "relay_node", "timeout": plan.timeout + 60, "config": relay_config(plan)})
    addr = relay.recv(30.0)["addr"]
    try:
        out = bulk_once(pair, "crust", size, count, plan.timeout, relay=addr, config=ENDS)
    finally:
        relay.send({"stop": True})
    node = relay.recv(30.0)
    if node["relay_circuits"] < 1 or node["relay_bytes"] < size * count:
        raise RuntimeError(f"the node did not carry the transfer: {node}")
    out["relay_node"] = node
    out["relay_cpu_ns_per_byte"] = node["cpu_s"] * 1e9 / (size * count)
    return out


def _bulk(
    relay: Worker, pair: WorkerPair, plan: BulkPlan, size: int, say: Callable[[str], None]
) -> dict[str, Any]:
    count = plan.message_count(size)
    direct: list[dict[str, Any]] = []
    relayed: list[dict[str, Any]] = []
    for rep in range(plan.repeats):
        say(f"relay bulk {size_name(size)} x {count}: direct, run {rep + 1}/{plan.repeats}")
        direct.append(bulk_once(pair, "crust", size, count, plan.timeout, config=ENDS))
        say(f"relay bulk {size_name(size)} x {count}: relayed, run {rep + 1}/{plan.repeats}")
        relayed.append(_relayed_once(relay, pair, plan, size, count))
    return figure(
        f"relay_bulk_{size}",
        f"relayed throughput, {size_name(size)} messages (vs crust direct)",
        "MB/s",
        median([r["mb_per_s"] for r in relayed]),
        median([r["mb_per_s"] for r in direct]),
        higher_is_better=True,
        details={"count": count, "size": size, "runs": {"crust": relayed, "direct": direct}},
    )


def run(
    quick: bool,
    *,
    progress: Callable[[str], None] | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Relayed vs direct bulk throughput per message size (JSON-ready, like the other
    suites)."""
    plan = common.choose_plan(quick, repeats, QUICK, FULL)
    say = progress or (lambda _msg: None)
    started = time.time()
    load_before = common.load_average()
    figures: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    relay = Worker(ctx, "bench-relay", MODULE)
    pair = WorkerPair(MODULE)
    try:
        for size in SIZES:
            common.run_step(
                figures,
                say,
                functools.partial(lambda s: [_bulk(relay, pair, plan, s, say)], size),
                f"relay bulk {size_name(size)}",
                f"relay_bulk_{size}",
                f"relayed throughput, {size_name(size)} messages (vs crust direct)",
                "MB/s",
                True,
            )
    finally:
        pair.stop()
        relay.stop()
    return common.results(
        "bench_relay",
        quick,
        plan,
        started,
        load_before,
        [
            "ratio = relayed / direct crust TCP, same sizes, same worker processes",
            "three processes on 127.0.0.1: relay node, receiver (reachable only through the "
            "node), sender; the node's per-circuit rate limit is raised for the run",
        ],
        figures,
    )


def main(argv: list[str] | None = None) -> int:
    return common.main(
        argv,
        prog="python -m benchmarks.bench_relay",
        description="crust through a relay node vs crust direct on loopback",
        run=lambda args, say: run(args.quick, progress=say, repeats=args.repeats),
        title="crust relayed throughput",
        baseline="crust direct TCP",
    )


if __name__ == "__main__":
    sys.exit(main())
