"""What every loopback benchmark shares: worker processes, result figures, environment,
rendering and the command line.

A benchmark module defines ``HANDLERS`` (operation name -> ``async (cmd, pipe) -> dict``)
and drives a :class:`WorkerPair` built with that module's name: the spawned workers import
the module and run the operations it names.  Only loopback addresses are used by the
benchmarks; every operation is bounded in time (``cmd["timeout"]``), and the workers are
always stopped (asked, terminated, then killed) by :meth:`WorkerPair.stop`; a worker also
exits by itself when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection as Pipe
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import crust
from crust.aio.eventqueue import EventStream
from crust.contact import Contact
from crust.events import MessageReceived, PeerLost

KiB = 1024
MiB = 1024 * 1024
SMALL = 64
"""Size of the small messages (messages/s and the latency probes)."""

T0 = struct.Struct(">d")
clock = time.monotonic
"""CLOCK_MONOTONIC on Linux: one system-wide clock, comparable across processes."""

Handler = Callable[[dict[str, Any], Pipe], Awaitable[dict[str, Any]]]
Progress = Callable[[str], None]


# =============================================================================== helpers


def probe(t0: float) -> bytes:
    """A SMALL-byte latency probe carrying its send time."""
    return T0.pack(t0) + bytes(SMALL - T0.size)


async def next_message(events: EventStream) -> MessageReceived:
    async for ev in events:
        if isinstance(ev, MessageReceived):
            return ev
    raise ConnectionError("service closed")


def ordered_identity(target: crust.PeerId, lesser: bool) -> crust.Identity:
    """An identity whose peer id is below (or above) ``target``'s.

    The greater peer id of a pair decides which connection is kept (SELECT), so the order
    changes which side waits for which control frame during ``connect()``.
    """
    while True:
        ident = crust.Identity.generate()
        if (ident.peer_id < target) == lesser:
            return ident


def host_port(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) -> ``(host, port)``."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


# =============================================================================== crust side
#
# The crust half of every benchmark: the same handlers over TCP or QUIC (``cmd["scheme"]``).


def crust_config(cmd: dict[str, Any], listen: bool) -> crust.Config:
    """``Config.for_testing`` with one listener of ``cmd["scheme"]`` (default ``tcp``) on
    127.0.0.1 (receiver) or none, plus the overrides in ``cmd["config"]``."""
    scheme = cmd.get("scheme", "tcp")
    overrides: dict[str, Any] = cmd.get("config", {})
    return crust.Config.for_testing(
        listen=(f"{scheme}://127.0.0.1:0",) if listen else (), **overrides
    )


def crust_contact(svc: crust.Service, cmd: dict[str, Any]) -> str:
    scheme = cmd.get("scheme", "tcp")
    return next(c for c in svc.contacts() if c.startswith(f"{scheme}://"))


async def crust_bulk_recv(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Receive ``count`` messages; with ``cmd["relay"]`` (a node's contact) have no listener,
    connect to that node and report the peer id instead of an address."""
    count: int = cmd["count"]
    got = nbytes = 0
    t_first = t_last = 0.0
    relay: str | None = cmd.get("relay")
    async with crust.Service(crust_config(cmd, relay is None)) as svc:
        if relay is None:
            pipe.send({"addr": crust_contact(svc, cmd)})
        else:  # reachable only through the relay node: the sender dials our peer id
            await svc.connect(relay)
            pipe.send({"addr": str(svc.peer_id)})
        cpu0 = time.process_time()
        async for ev in svc.events():
            if isinstance(ev, MessageReceived):
                if not got:
                    t_first = clock()
                got += 1
                nbytes += len(ev.data)
                if got >= count:
                    t_last = clock()
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


async def crust_bulk_send(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    count: int = cmd["count"]
    payload = os.urandom(cmd["size"])
    relay: str | None = cmd.get("relay")
    async with crust.Service(crust_config(cmd, False)) as svc:
        events = svc.events()
        if relay is None:
            peer = await svc.connect(cmd["addr"])
        else:
            await svc.connect(relay)
            peer = await svc.connect(crust.PeerId.parse(cmd["addr"]))
            path = svc.connection(peer).path
            if path != "relayed":
                raise RuntimeError(f"expected a relayed connection, got {path!r}")
        send = svc.send
        cpu0 = time.process_time()
        t_start = clock()
        for _ in range(count):
            await send(peer, payload, 0)
        t_sent = clock()
        await next_message(events)
        t_ack = clock()
        cpu1 = time.process_time()
    return {"t_start": t_start, "t_sent": t_sent, "t_ack": t_ack, "cpu_s": cpu1 - cpu0}


async def crust_echo(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """Echo every message back; record each probe's one-way time (send -> received here)."""
    count: int = cmd["count"]
    one_way: list[float] = []
    async with crust.Service(crust_config(cmd, True)) as svc:
        pipe.send({"addr": crust_contact(svc, cmd)})
        cpu0 = time.process_time()
        async for ev in svc.events():
            if isinstance(ev, MessageReceived):
                one_way.append(clock() - T0.unpack_from(ev.data)[0])
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


Cycle = Callable[[], Awaitable[tuple[float, float, float, float]]]
"""One new connection: dial + handshake, probe, echo, close -> ``(t0, connected,
echoed, closed)`` clock times."""


async def sequential_cycles(cycle: Cycle, count: int) -> dict[str, Any]:
    """``count`` cycles one after the other: connect, round-trip and whole-cycle times."""
    connect: list[float] = []
    round_trip: list[float] = []
    whole: list[float] = []
    cpu0 = time.process_time()
    for _ in range(count):
        t0, t1, t2, t3 = await cycle()
        connect.append(t1 - t0)
        round_trip.append(t2 - t0)
        whole.append(t3 - t0)
    cpu = time.process_time() - cpu0
    return {"connect": connect, "round_trip": round_trip, "cycle": whole, "cpu_s": cpu}


async def concurrent_cycles(cycles: Sequence[Cycle], per_client: int) -> dict[str, Any]:
    """One client per entry of ``cycles``, each running ``per_client`` cycles at once."""

    async def client(cycle: Cycle) -> None:
        for _ in range(per_client):
            await cycle()

    t_start = clock()
    async with asyncio.TaskGroup() as tg:
        for cycle in cycles:
            tg.create_task(client(cycle))
    t_end = clock()
    return {"seconds": t_end - t_start, "connections": per_client * len(cycles)}


def crust_cycle(svc: crust.Service, addr: str) -> Cycle:
    events = svc.events()

    async def cycle() -> tuple[float, float, float, float]:
        t0 = clock()
        peer = await svc.connect(addr)
        t1 = clock()
        await svc.send(peer, probe(t0), 0)
        await next_message(events)
        t2 = clock()
        await svc.disconnect(peer)
        return t0, t1, t2, clock()

    return cycle


async def crust_connect_seq(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    addr: str = cmd["addr"]
    target = Contact.parse(addr).peer_id
    assert target is not None
    ident = ordered_identity(target, cmd["order"] == "lesser")
    async with crust.Service(crust_config(cmd, False), identity=ident) as svc:
        return await sequential_cycles(crust_cycle(svc, addr), cmd["count"])


async def crust_cycles(cmd: dict[str, Any], pipe: Pipe) -> dict[str, Any]:
    """``concurrency`` clients, each: connect, send a probe, await the echo, disconnect."""
    async with contextlib.AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(crust.Service(crust_config(cmd, False)))
            for _ in range(cmd["concurrency"])
        ]
        cycles = [crust_cycle(svc, cmd["addr"]) for svc in services]
        return await concurrent_cycles(cycles, cmd["count"] // cmd["concurrency"])


# =============================================================================== worker side


async def _dispatch(handlers: dict[str, Handler], cmd: dict[str, Any], pipe: Pipe) -> Any:
    async with asyncio.timeout(cmd["timeout"]):
        return await handlers[cmd["op"]](cmd, pipe)


def _exit_with_parent(parent: int) -> None:
    """Watchdog thread: end this worker as soon as the process that started it is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _run_command(handlers: dict[str, Handler], cmd: dict[str, Any], pipe: Pipe) -> Any:
    """Run one command; with ``cmd["profile"]`` (a directory) under cProfile, the stats
    written to ``<dir>/<op>-<pid>-<n>.prof``."""
    profile_dir: str | None = cmd.get("profile")
    if not profile_dir:
        return asyncio.run(_dispatch(handlers, cmd, pipe))
    import cProfile

    prof = cProfile.Profile()
    try:
        return prof.runcall(asyncio.run, _dispatch(handlers, cmd, pipe))
    finally:
        os.makedirs(profile_dir, exist_ok=True)
        n = sum(1 for name in os.listdir(profile_dir) if name.startswith(cmd["op"]))
        prof.dump_stats(os.path.join(profile_dir, f"{cmd['op']}-{os.getpid()}-{n}.prof"))


def worker_main(pipe: Pipe, parent: int, module: str) -> None:
    """A benchmark worker process: run commands from ``pipe`` until None or EOF, looking
    each operation up in ``module``'s ``HANDLERS``."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    handlers: dict[str, Handler] = importlib.import_module(module).HANDLERS
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
            result = _run_command(handlers, cmd, pipe)
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

    def __init__(self, ctx: multiprocessing.context.SpawnContext, name: str, module: str) -> None:
        self.pipe, child = ctx.Pipe()
        self.proc: BaseProcess = ctx.Process(
            target=worker_main, args=(child, os.getpid(), module), name=name, daemon=True
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
    """A receiver and a sender process running ``module``'s handlers; restarted after any
    failure."""

    def __init__(self, module: str, *, profile: str | None = None) -> None:
        self._module = module
        self._profile = profile
        self._ctx = multiprocessing.get_context("spawn")
        self._receiver: Worker | None = None
        self._sender: Worker | None = None

    def _start(self) -> tuple[Worker, Worker]:
        if self._receiver is None:
            self._receiver = Worker(self._ctx, "bench-receiver", self._module)
        if self._sender is None:
            self._sender = Worker(self._ctx, "bench-sender", self._module)
        return self._receiver, self._sender

    def stop(self) -> None:
        workers, self._receiver, self._sender = (self._receiver, self._sender), None, None
        for w in workers:
            if w is not None:
                w.stop()

    def run(
        self, recv_cmd: dict[str, Any], send_cmd: dict[str, Any], timeout: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Start ``recv_cmd``; once it reports its ``addr``, run ``send_cmd`` against it."""
        receiver, sender = self._start()
        try:
            extra = {"timeout": timeout, "profile": self._profile}
            receiver.send({**recv_cmd, **extra})
            ready = receiver.recv(30.0 + timeout)
            sender.send({**send_cmd, "addr": ready["addr"], **extra})
            sent = sender.recv(timeout + 15.0)
            received = receiver.recv(timeout + 15.0)
        except BaseException:
            self.stop()
            raise
        return received, sent


# =============================================================================== plans


@dataclasses.dataclass(frozen=True)
class BulkPlan:
    """How much a suite's bulk transfers carry (suites extend it with their own fields)."""

    total_bytes: int
    """Payload bytes per bulk transfer, at most ..."""
    max_messages: int
    """... and at most this many messages."""
    repeats: int
    timeout: float
    """Seconds one measurement may take before it is abandoned."""

    def message_count(self, size: int) -> int:
        return max(1, min(self.total_bytes // size, self.max_messages))


P = TypeVar("P", bound=BulkPlan)


def choose_plan(quick: bool, repeats: int | None, quick_plan: P, full_plan: P) -> P:
    """The suite's quick or full plan, with ``repeats`` (at least 1) when given."""
    plan = quick_plan if quick else full_plan
    return plan if repeats is None else dataclasses.replace(plan, repeats=max(1, repeats))


def cycles_figure(
    pair: WorkerPair,
    plan: Any,
    baseline: str,
    progress: Progress,
    extra: Callable[[str], dict[str, Any]] = lambda _kind: {},
) -> dict[str, Any]:
    """New connections/s with ``plan.concurrency`` clients cycling (connect, probe, echo,
    close) ``plan.cycles_count`` times in all, crust against the ``baseline`` handlers."""
    rates: dict[str, float] = {}
    for kind in ("crust", baseline):
        progress(f"connections/s: {kind}, {plan.cycles_count} with {plan.concurrency} clients")
        more = extra(kind)
        _, s = pair.run(
            {"op": f"{kind}_echo", "count": plan.cycles_count, **more},
            {
                "op": f"{kind}_cycles",
                "count": plan.cycles_count,
                "concurrency": plan.concurrency,
                **more,
            },
            plan.timeout,
        )
        rates[kind] = s["connections"] / s["seconds"]
    return figure(
        "connections_concurrent",
        f"new connections/s, {plan.concurrency} concurrent clients",
        "conn/s",
        rates["crust"],
        rates[baseline],
        higher_is_better=True,
        details={"connections": plan.cycles_count, "concurrency": plan.concurrency},
    )


def results(
    name: str,
    quick: bool,
    plan: BulkPlan,
    started: float,
    load_before: list[float] | None,
    notes: list[str],
    figures: list[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-ready result every suite's ``run`` returns: what ran, where, when, for how
    long, the notes and the figures (``extra`` keys go to the top level, ``environment``
    entries under ``env_<key>`` into the environment)."""
    env = environment()
    env["load_average_before"] = load_before
    for key in [k for k in extra if k.startswith("env_")]:
        env[key[4:]] = extra.pop(key)
    return {
        "benchmark": f"crust {name}",
        "mode": "quick" if quick else "full",
        "plan": dataclasses.asdict(plan),
        **extra,
        "environment": env,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "notes": notes,
        "figures": figures,
    }


# =============================================================================== figures


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {
        "p50": pct(xs, 50) * 1e3,
        "p90": pct(xs, 90) * 1e3,
        "p99": pct(xs, 99) * 1e3,
        "mean": statistics.fmean(xs) * 1e3,
        "min": min(xs) * 1e3,
        "max": max(xs) * 1e3,
    }


def figure(
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


def size_name(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB} MiB"
    if size >= KiB:
        return f"{size // KiB} KiB"
    return f"{size} B"


def bulk_once(
    pair: WorkerPair,
    kind: str,
    size: int,
    count: int,
    timeout: float,
    **extra: Any,
) -> dict[str, Any]:
    """One bulk transfer with the ``{kind}_bulk_recv`` / ``{kind}_bulk_send`` handlers.

    The receiver reports ``t_first``, ``t_last``, ``messages``, ``bytes`` and ``cpu_s``; the
    sender ``t_start``, ``t_sent``, ``t_ack`` and ``cpu_s``.  ``extra`` goes to both.
    """
    r, s = pair.run(
        {"op": f"{kind}_bulk_recv", "count": count, **extra},
        {"op": f"{kind}_bulk_send", "size": size, "count": count, **extra},
        timeout,
    )
    if r["messages"] != count or r["bytes"] != size * count:
        raise RuntimeError(f"{kind}: received {r['messages']} messages, {r['bytes']} bytes")
    seconds = r["t_last"] - s["t_start"]
    out = {
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
    for side, res in (("receiver", r), ("sender", s)):
        if "stats" in res:
            out[f"{side}_stats"] = res["stats"]
    return out


def run_step(
    figures: list[dict[str, Any]],
    say: Progress,
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
            figure(key, name, unit, None, None, higher_is_better=higher_is_better, error=str(exc))
        )


# =============================================================================== environment


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


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# =============================================================================== output


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit == "MB/s":
        return f"{value:,.1f} MB/s"
    return f"{value:,.0f} {unit}"


def render(results: dict[str, Any], title: str, baseline: str) -> None:
    """Print ``results`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    env = results["environment"]
    console = Console() if sys.stdout.isatty() else Console(width=132)
    table = Table(
        title=f"{title} ({results['mode']})",
        caption=(
            f"Python {env['python']}, cryptography {env['cryptography']} ({env['openssl']}), "
            f"{env['cpu']} x{env['cpus']}; ratio = crust / baseline ({baseline})"
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


def main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    run: Callable[[argparse.Namespace, Progress], dict[str, Any]],
    title: str,
    baseline: str,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """The command line every benchmark shares: ``--json``, ``--quick``, ``--repeats``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="much smaller counts (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="bulk repeats (median)")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="run every worker command under cProfile, stats written to DIR (slows it down)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    # SIGTERM ends the run like Ctrl-C does: through the finally that stops the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(args, stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        render(results, title, baseline)
    return 1 if any(f["error"] for f in results["figures"]) else 0
