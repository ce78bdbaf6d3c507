"""py-libp2p baseline: bulk throughput of one noise + yamux stream over loopback TCP.

py-libp2p is what a Python user would otherwise pick for encrypted, authenticated peer to
peer streams, so ``crust bench`` pairs crust's TCP bulk throughput with it.  It is an
optional dependency (``pip install -e '.[bench]'``); without it this suite reports itself
as skipped (``run`` raises :class:`ModuleNotFoundError`, which ``crust bench`` turns into
the skip reason).

The measurement matches the crust one of :mod:`benchmarks.bench_tcp`: receiver and sender
in two separate processes on 127.0.0.1, a bounded number of payload bytes written as
messages of 64 KiB or 1 MiB on one stream, timed from the sender's first write to the
receiver's last read (CLOCK_MONOTONIC, comparable across processes).  py-libp2p runs on
trio; the hosts are built with only Noise as the security protocol and yamux as the muxer,
with no discovery, no UPnP and an in-memory key pair.

The figures carry the py-libp2p value as ``baseline`` and leave ``crust`` empty: ``crust
bench`` fills it from the TCP suite of the same run (``crust_key`` in the details).

Run ``python -m benchmarks.bench_libp2p [--quick]`` for the py-libp2p numbers alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import BulkPlan, KiB, MiB, choose_plan, size_name

SIZES = (64 * KiB, MiB)
PROTOCOL = "/crust-bench/bulk/1.0.0"
BULK_TARGET_RATIO = 5.0
"""crust's goal: at least five times py-libp2p's bulk throughput."""
ROOT = Path(__file__).resolve().parents[1]


Plan = BulkPlan
FULL = Plan(total_bytes=256 * MiB, max_messages=100_000, repeats=3, timeout=180.0)
QUICK = Plan(total_bytes=32 * MiB, max_messages=30_000, repeats=1, timeout=60.0)


# ------------------------------------------------------------------------- worker processes


def _host(key_seed: bytes) -> Any:
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    key_pair = create_new_key_pair(key_seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: noise},
        muxer_preference="YAMUX",
        enable_mDNS=False,
        enable_upnp=False,
    )


async def _serve(total: int) -> None:
    """Listen on loopback, print the address, read ``total`` bytes from one stream."""
    import multiaddr
    import trio
    from libp2p.custom_types import TProtocol

    host = _host(b"r" * 32)
    done = trio.Event()

    async def handler(stream: Any) -> None:
        got = 0
        t_first = 0.0
        while got < total:
            chunk = await stream.read(MiB)
            if not chunk:
                break
            if got == 0:
                t_first = time.monotonic()
            got += len(chunk)
        # the result goes out first: the host's teardown is not part of the measurement
        print(json.dumps({"t_first": t_first, "t_last": time.monotonic(), "bytes": got}))
        sys.stdout.flush()
        await stream.write(b"k")
        with trio.move_on_after(5):  # until the sender has the ack and closes its side
            while await stream.read(KiB):
                pass
        done.set()

    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        host.set_stream_handler(TProtocol(PROTOCOL), handler)
        addr = next(str(a) for a in host.get_addrs() if "/ip4/127.0.0.1/" in str(a))
        print(json.dumps({"addr": addr}), flush=True)
        await done.wait()


async def _send(addr: str, size: int, count: int) -> dict[str, Any]:
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr

    host = _host(b"s" * 32)
    payload = bytes(size)
    async with host.run(listen_addrs=[]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
        t_start = time.monotonic()
        for _ in range(count):
            await stream.write(payload)
        t_sent = time.monotonic()
        ack = await stream.read(1)
        t_ack = time.monotonic()
        await stream.close()
    if ack != b"k":
        raise RuntimeError("no acknowledgement from the receiver")
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack}


def _worker(argv: list[str]) -> int:
    """``--serve TOTAL`` or ``--send ADDR SIZE COUNT``: one side, result as a JSON line."""
    import trio

    if argv[0] == "--serve":
        trio.run(_serve, int(argv[1]))
    else:
        print(json.dumps(trio.run(_send, argv[1], int(argv[2]), int(argv[3]))), flush=True)
    return 0


# ------------------------------------------------------------------------------ the driver


def available() -> str | None:
    """Why py-libp2p cannot be used here, or None when it can."""
    for module in ("libp2p", "trio", "multiaddr"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[bench]')"
    return None


class _Worker:
    """One worker process: its stdout lines are read by a thread into a queue (so a wait
    has a deadline), its stderr goes to a file (never a pipe that could fill up)."""

    def __init__(self, *args: str) -> None:
        self.err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by bulk_once
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_libp2p", "--worker", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")  # end of output

    def next_json(self, deadline: float, what: str) -> dict[str, Any]:
        """The next JSON line the worker prints, waiting until ``deadline`` at most."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if not line.startswith("{"):
            self.stop()
            self.err.seek(0)
            tail = self.err.read().strip().splitlines()[-1:] or ["no output in time"]
            raise RuntimeError(f"py-libp2p {what} failed: {tail[0]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.reader.join(5.0)  # the pipe ends with the process
        if self.proc.stdout is not None and not self.reader.is_alive():
            self.proc.stdout.close()


def bulk_once(size: int, count: int, timeout: float) -> dict[str, Any]:
    total = size * count
    workers = [_Worker("--serve", str(total))]
    try:
        deadline = time.monotonic() + timeout
        server = workers[0]
        addr = server.next_json(deadline, "listener")["addr"]
        workers.append(_Worker("--send", addr, str(size), str(count)))
        r = server.next_json(deadline, "receiver")
        s = workers[1].next_json(deadline, "sender")
    finally:
        for w in workers:
            w.stop()
            w.err.close()
    if r["bytes"] != total:
        raise RuntimeError(f"py-libp2p: received {r['bytes']} of {total} bytes")
    seconds = r["t_last"] - s["t_start"]
    return {"seconds": seconds, "mb_per_s": total / seconds / 1e6, "bytes": total}


def run(
    quick: bool,
    *,
    progress: Callable[[str], None] | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """py-libp2p bulk throughput per message size; ``ModuleNotFoundError`` without it."""
    missing = available()
    if missing is not None:
        raise ModuleNotFoundError(missing, name="libp2p")
    plan = choose_plan(quick, repeats, QUICK, FULL)
    say = progress or (lambda _msg: None)
    started = time.time()
    figures: list[dict[str, Any]] = []
    for size in SIZES:
        count = plan.message_count(size)
        runs: list[dict[str, Any]] = []
        error: str | None = None
        try:
            for rep in range(plan.repeats):
                say(f"bulk {size_name(size)} x {count}: py-libp2p run {rep + 1}/{plan.repeats}")
                runs.append(bulk_once(size, count, plan.timeout))
                say(f"    {runs[-1]['mb_per_s']:.1f} MB/s")
        except Exception as exc:
            error = str(exc)
            say(f"bulk {size_name(size)} failed: {exc}")
        value = sorted(r["mb_per_s"] for r in runs)[len(runs) // 2] if runs else None
        figures.append(
            {
                "key": f"bulk_{size}_vs_libp2p",
                "figure": f"bulk throughput, {size_name(size)} messages, vs py-libp2p",
                "unit": "MB/s",
                "crust": None,
                "baseline": value if error is None else None,
                "ratio": None,
                "higher_is_better": True,
                "target": f">= {BULK_TARGET_RATIO:.0f}x py-libp2p",
                "met": None,
                "details": {
                    "messages": count,
                    "crust_key": f"bulk_{size}",
                    "target_ratio": BULK_TARGET_RATIO,
                    "runs": runs,
                },
                "error": error,
            }
        )
    import libp2p

    return {
        "benchmark": "crust bench_libp2p",
        "mode": "quick" if quick else "full",
        "plan": dataclasses.asdict(plan),
        "libp2p": getattr(libp2p, "__version__", None) or _dist_version("libp2p"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "notes": ["py-libp2p: one noise + yamux stream over loopback TCP, two processes"],
        "figures": figures,
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--worker"]:
        return _worker(args_in[1:])
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_libp2p",
        description="py-libp2p noise+yamux stream bulk throughput on loopback",
    )
    parser.add_argument("--quick", action="store_true", help="much smaller counts")
    parser.add_argument("--repeats", type=int, default=None, help="repeats (median)")
    args = parser.parse_args(args_in)
    results = run(args.quick, progress=lambda m: print(m, file=sys.stderr), repeats=args.repeats)
    print(json.dumps(results, indent=2))
    return 1 if any(f["error"] for f in results["figures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
