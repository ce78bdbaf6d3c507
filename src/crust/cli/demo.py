"""``crust demo``: four peers on loopback connect, talk, and move data — in a few seconds.

Nothing to set up, no root, no files: every Service uses ``Config.for_testing()`` (loopback
listener, no beacon, no port mapping, no bootstrap cache) and an in-memory identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

import crust
from crust.config import Config
from crust.events import MessageReceived
from crust.identity import PeerId
from crust.service import Service

NAMES = ("alice", "bob", "carol", "dave")
COLORS = ("magenta", "cyan", "green", "yellow")
BULK_SIZE = 64 * 1024
BULK_SECONDS = 1.0
SMALL_SIZE = 64
SMALL_SECONDS = 0.5
STEP_TIMEOUT = 5.0
BURST_PRIORITY = 1
"""Bulk traffic: waits for room in the send queue instead of being dropped."""


class DemoPeer:
    """One Service and what it received."""

    def __init__(self, name: str, color: str, svc: Service) -> None:
        self.name = name
        self.color = color
        self.svc = svc
        self.inbox: list[tuple[PeerId, bytes, float]] = []
        self.burst_messages = 0
        self.burst_bytes = 0
        self.last_receive = 0.0
        self._changed = asyncio.Event()

    @property
    def label(self) -> str:
        return f"[bold {self.color}]{self.name}[/]"

    @property
    def padded(self) -> str:
        return f"[bold {self.color}]{self.name:<5}[/]"

    def has_hellos(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.inbox) >= n

    async def pump(self) -> None:
        """Consume every event (the queue must keep moving) and record messages."""
        async for event in self.svc.events():
            if isinstance(event, MessageReceived):
                now = time.perf_counter()
                if event.priority == BURST_PRIORITY:
                    self.burst_messages += 1
                    self.burst_bytes += len(event.data)
                    self.last_receive = now
                else:
                    self.inbox.append((event.peer, event.data, now))
                self._changed.set()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not done():
                self._changed.clear()
                await self._changed.wait()


class Demo:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.peers: list[DemoPeer] = []
        self.started = time.perf_counter()
        self.results: list[str] = []

    def step(self, number: int, total: int, text: str) -> None:
        self.console.print()
        self.console.print(f"[bold blue]{number}/{total}[/] [bold]{text}[/]")

    def ok(self, text: str) -> None:
        self.console.print(f"  [green]✓[/] {text}")

    def peer_of(self, peer_id: PeerId) -> DemoPeer:
        return next(p for p in self.peers if p.svc.peer_id == peer_id)

    async def run(self) -> None:
        total = 6
        cfg = Config.for_testing(
            listen=("tcp://127.0.0.1:0", "quic://127.0.0.1:0"),
            heartbeat_interval=0.2,
            heartbeat_timeout=5.0,
        )

        self.step(1, total, "Starting four peers on loopback")
        async with contextlib.AsyncExitStack() as stack:
            for name, color in zip(NAMES, COLORS, strict=True):
                svc = await stack.enter_async_context(Service(cfg))
                self.peers.append(DemoPeer(name, color, svc))
                self.ok(
                    f"{self.peers[-1].padded}  id [magenta]{svc.peer_id.short()}…[/]"
                    f"  listening on {', '.join(ep.local for ep in svc.endpoints())}"
                )
            async with asyncio.TaskGroup() as tg:
                pumps = [tg.create_task(p.pump()) for p in self.peers]
                try:
                    await self.scenario(total)
                finally:
                    for task in pumps:
                        task.cancel()
            self.step(total, total, "Closing everything")
            t0 = time.perf_counter()
            await asyncio.gather(*(p.svc.aclose() for p in self.peers))
            self.ok(f"all peers closed in {(time.perf_counter() - t0) * 1000:.0f} ms")

    async def scenario(self, total: int) -> None:
        await self.connect_mesh(2, total)
        await self.exchange(3, total)
        await self.throughput(4, total)
        await self.report(5, total)

    async def connect_mesh(self, step: int, total: int) -> None:
        self.step(step, total, "Connecting every pair (a full mesh, each link authenticated)")
        alice, bob = self.peers[0], self.peers[1]

        async def dial(a: DemoPeer, b: DemoPeer, note: str = "") -> tuple[str, float]:
            t0 = time.perf_counter()
            contacts = b.svc.contacts()
            if a is self.peers[2] and b is self.peers[3]:  # carol and dave talk over QUIC
                contacts = [c for c in contacts if c.startswith("quic://")]
                note = "  (QUIC only)"
            got = await a.svc.connect(contacts)
            if got != b.svc.peer_id:
                raise RuntimeError(f"{a.name} reached {got}, not {b.name}")
            seconds = time.perf_counter() - t0
            d = a.svc.connection(got)
            return f"{a.padded} → {b.padded}  {d.transport}/{d.path}{note}", seconds

        pairs = list(itertools.combinations(self.peers, 2))
        # alice and bob also dial each other at the same moment: crust keeps one connection
        dials = [dial(a, b) for a, b in pairs] + [dial(bob, alice, "  (simultaneous dial)")]
        for text, seconds in await asyncio.gather(*dials):
            self.ok(f"{text}  in {seconds * 1000:.1f} ms")
        counts = {p.name: len(p.svc.peers()) for p in self.peers}
        links = sum(p.svc.statistics().connections for p in self.peers) // 2
        if any(n != len(self.peers) - 1 for n in counts.values()):
            raise RuntimeError(f"mesh incomplete: {counts}")
        self.ok(f"{len(pairs)} pairs, {links} connections: one per pair")
        self.ok("alice and bob dialled each other at once and still share one connection")

    async def exchange(self, step: int, total: int) -> None:
        self.step(step, total, "Saying hello both ways on every link")
        sent_at: dict[tuple[PeerId, PeerId], float] = {}
        for a, b in itertools.permutations(self.peers, 2):
            sent_at[(a.svc.peer_id, b.svc.peer_id)] = time.perf_counter()
            await a.svc.send(b.svc.peer_id, f"hello {b.name}, this is {a.name}".encode())
        expected = len(self.peers) - 1
        for p in self.peers:
            await p.wait_until(p.has_hellos(expected))
        for p in self.peers:
            for sender, data, received in p.inbox:
                latency = received - sent_at[(sender, p.svc.peer_id)]
                self.console.print(
                    f"    {self.peer_of(sender).padded} → {p.padded}  "
                    f"[italic]{data.decode()!r}[/]  [dim]{latency * 1000:.2f} ms[/]",
                    highlight=False,
                )
        self.ok(f"{len(sent_at)} messages delivered, in order, end-to-end encrypted")

    async def burst(self, size: int, seconds: float) -> tuple[int, int, float]:
        """alice sends ``size``-byte messages to bob for ``seconds``; returns (messages,
        bytes, seconds from the first send to the last delivery)."""
        alice, bob = self.peers[0], self.peers[1]
        payload = bytes(size)
        start_messages, start_bytes = bob.burst_messages, bob.burst_bytes
        sent = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                await alice.svc.send(bob.svc.peer_id, payload, BURST_PRIORITY)
            sent += 64
            await asyncio.sleep(0)  # let the receiving side run (both ends share this loop)
        await bob.wait_until(lambda: bob.burst_messages - start_messages >= sent)
        elapsed = max(bob.last_receive - t0, 1e-9)
        return sent, bob.burst_bytes - start_bytes, elapsed

    async def throughput(self, step: int, total: int) -> None:
        self.step(step, total, "Throughput burst alice → bob (both ends in this one process)")
        with self.console.status(f"sending {BULK_SIZE // 1024} KiB messages…"):
            n, nbytes, secs = await self.burst(BULK_SIZE, BULK_SECONDS)
        bulk = (
            f"[bold]{nbytes / secs / 1e6:,.1f} MB/s[/] "
            f"({n:,} x {BULK_SIZE // 1024} KiB in {secs:.2f} s)"
        )
        self.ok(f"bulk:  {bulk}")
        with self.console.status(f"sending {SMALL_SIZE}-byte messages…"):
            n2, _, secs2 = await self.burst(SMALL_SIZE, SMALL_SECONDS)
        small = f"[bold]{n2 / secs2:,.0f} msgs/s[/] ({n2:,} x {SMALL_SIZE} B in {secs2:.2f} s)"
        self.ok(f"small: {small}")
        self.results = [f"bulk   {bulk}", f"small  {small}"]

    def rtt_measured(self) -> bool:
        return all(p.svc.connection(q).rtt is not None for p in self.peers for q in p.svc.peers())

    async def report(self, step: int, total: int) -> None:
        self.step(step, total, "Connections and counters")
        # rtt comes from the heartbeats (every 0.2 s here), which raise no event: poll
        async with asyncio.timeout(STEP_TIMEOUT):
            while not self.rtt_measured():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        links = Table(title="Links", title_style="bold", header_style="bold blue")
        for column in ("link", "transport", "path", "listener", "rtt"):
            links.add_column(column, justify="right" if column == "rtt" else "left")
        for a, b in itertools.combinations(self.peers, 2):
            d = a.svc.connection(b.svc.peer_id)
            arrow = "→" if d.outbound else "←"
            rtt = "—" if d.rtt is None else f"{d.rtt * 1000:.2f} ms"
            listener = d.remote if d.outbound else d.local
            links.add_row(
                Text.from_markup(f"{a.label} {arrow} {b.label}"), d.transport, d.path, listener, rtt
            )
        self.console.print(links)
        counters = Table(title="Counters", title_style="bold", header_style="bold blue")
        counters.add_column("peer")
        counters.add_column("peer id")
        for column in ("peers", "msgs tx", "msgs rx", "MB tx", "MB rx"):
            counters.add_column(column, justify="right")
        for p in self.peers:
            s = p.svc.statistics()
            counters.add_row(
                Text.from_markup(p.label),
                f"{p.svc.peer_id.short()}…",
                str(s.peers),
                f"{s.messages_sent:,}",
                f"{s.messages_received:,}",
                f"{s.bytes_sent / 1e6:,.1f}",
                f"{s.bytes_received / 1e6:,.1f}",
            )
        self.console.print(counters)
        self.console.print(
            Panel(
                "\n".join(self.results),
                title="[bold]throughput alice → bob[/]",
                border_style="green",
                expand=False,
            )
        )


async def run_demo(console: Console | None = None) -> int:
    """Run the demo; returns the exit code (0 when every step worked)."""
    console = console if console is not None else Console(highlight=False)
    console.print(
        Panel(
            "Four peers on [bold]loopback[/]: start, connect in a full mesh, exchange "
            "messages, move data, close.\nNo setup, no root, no files.",
            title=f"[bold]crust {crust.__version__} demo[/]",
            border_style="blue",
            expand=False,
        )
    )
    demo = Demo(console)
    try:
        await demo.run()
    except Exception as exc:
        failures = exc.exceptions if isinstance(exc, ExceptionGroup) else (exc,)
        for failure in failures:
            console.print(f"[bold red]demo failed:[/] {type(failure).__name__}: {failure}")
        return 1
    console.print()
    console.print(
        f"[bold green]Done[/] in {time.perf_counter() - demo.started:.1f} s. "
        "Next: [bold]crust node --help[/]"
    )
    return 0
