"""``crust node``: run a Service, print its events, obey JSON commands read from stdin.

The node stops on ``{"cmd": "quit"}``, SIGINT or SIGTERM (exit code 0) — never on end of input:
a node started with ``stdin=/dev/null`` keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console

from crust import errors
from crust.cli.protocol import (
    BadCommand,
    JsonObject,
    dumps,
    encode_event,
    error_fields,
    get_bool,
    get_data,
    get_int,
    get_peer,
    get_str,
    parse_command,
    to_json,
)
from crust.cli.render import render
from crust.config import Config
from crust.contact import Contact
from crust.identity import Identity, PeerId
from crust.service import Service

log = logging.getLogger("crust.cli")

COMMANDS = (
    "bootstrap",
    "connect",
    "send",
    "disconnect",
    "peers",
    "endpoints",
    "statistics",
    "quit",
)


class Output:
    """Where events go: JSON lines, or rich one-liners. Every line is flushed at once.

    When stdout goes away (the reader exited) output is dropped silently; the node keeps running
    until it is told to stop.
    """

    def __init__(self, json_mode: bool, stream: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self._stream = stream if stream is not None else sys.stdout
        self._console = Console(file=self._stream, highlight=False, soft_wrap=True)
        self._broken = False

    def emit(self, obj: JsonObject) -> None:
        if self._broken:
            return
        try:
            if self.json_mode:
                self._stream.write(dumps(obj) + "\n")
            else:
                self._console.print(render(obj))
            self._stream.flush()
        except BrokenPipeError:
            self._broken = True
            # keep the interpreter's final flush from failing again
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._stream.fileno())
                os.close(devnull)

    def note(self, text: str) -> None:
        """A hint for humans (rich mode only)."""
        if not self.json_mode and not self._broken:
            self._console.print(text, style="dim")


@dataclass
class NodeOptions:
    config: Config
    identity: Identity
    contacts: tuple[str, ...] = ()
    json_mode: bool = False
    metrics_port: int | None = None
    """Serve the statistics for Prometheus on this port (0: any free port)."""
    metrics_host: str = "127.0.0.1"


class _PeerLock:
    """Keeps one peer's sends in command order even when the send queue is full."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Node:
    """The running node: a Service, its output, and the commands in flight."""

    def __init__(
        self, svc: Service, out: Output, stop: asyncio.Event, tg: asyncio.TaskGroup
    ) -> None:
        self.svc = svc
        self.out = out
        self.stop = stop
        self._tg = tg
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_locks: dict[PeerId, _PeerLock] = {}
        self._handlers: dict[str, Callable[[JsonObject], Awaitable[JsonObject | None]]] = {
            "bootstrap": self._bootstrap,
            "connect": self._connect,
            "send": self._send,
            "disconnect": self._disconnect,
            "peers": self._peers,
            "endpoints": self._endpoints,
            "statistics": self._statistics,
            "quit": self._quit,
        }

    # ------------------------------------------------------------ tasks

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------ input

    async def read_commands(self) -> None:
        """Read command lines from stdin until end of input; each runs in its own task."""
        limit = 8 * self.svc.config.max_message_size + 64 * 1024
        fd = _stdin_fd()
        if fd is None:
            self._input_closed()
            return
        if not _pollable(fd):
            # a file (crust node < commands.jsonl) or /dev/null: reading it never blocks
            with os.fdopen(os.dup(fd), "rb") as f:
                while line := f.readline(limit + 1):
                    if len(line) > limit:
                        self._reply({}, _error_obj(BadCommand(f"line longer than {limit} bytes")))
                        break
                    self._take_line(line)
                    await asyncio.sleep(0)
            self._input_closed()
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit)
        pipe = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe
            )
        except (ValueError, OSError) as exc:
            pipe.close()
            log.warning("cannot read commands from stdin: %s", exc)
            self._input_closed()
            return
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    self._reply({}, _error_obj(BadCommand(f"line longer than {limit} bytes")))
                    continue
                if not line:
                    break
                self._take_line(line)
        finally:
            transport.close()
            # the pipe transport made the (shared) open file description non-blocking
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
        self._input_closed()

    def _input_closed(self) -> None:
        self.out.emit({"event": "input_closed"})
        self.out.note("no more commands from stdin; the node runs until SIGINT or SIGTERM")

    def _take_line(self, line: bytes) -> None:
        if line.strip():
            self.spawn(self.handle_line(line))

    async def handle_line(self, line: bytes) -> None:
        """Run one command line; every failure becomes an ``error`` line, never a crash."""
        cmd: JsonObject = {}
        try:
            cmd = parse_command(line)
            handler = self._handlers.get(cmd["cmd"])
            if handler is None:
                raise BadCommand(f"unknown command {cmd['cmd']!r} (one of {', '.join(COMMANDS)})")
            reply = await handler(cmd)
        except Exception as exc:
            if not isinstance(exc, errors.CrustError):
                log.debug("command %r failed", cmd, exc_info=True)
            self._reply(cmd, _error_obj(exc))
            return
        if reply is not None:
            self._reply(cmd, reply)

    def _reply(self, cmd: JsonObject, obj: JsonObject) -> None:
        if obj.get("event") == "error" and isinstance(cmd.get("cmd"), str):
            obj["cmd"] = cmd["cmd"]
        if "id" in cmd:
            obj["id"] = to_json(cmd["id"])
        self.out.emit(obj)

    # ------------------------------------------------------------ events

    async def pump_events(self) -> None:
        """Print every library event until the service closes."""
        async for event in self.svc.events():
            try:
                line = encode_event(event)
            except Exception as exc:  # never let one odd event stop the output
                log.exception("cannot encode %r", event)
                line = _error_obj(exc)
            self.out.emit(line)

    async def connect_at_start(self, contact: str) -> None:
        with contextlib.suppress(errors.CrustError):  # reported as a connect_failed event
            await self.svc.connect(contact)

    # ------------------------------------------------------------ commands

    async def _bootstrap(self, cmd: JsonObject) -> JsonObject | None:
        # the service reports bootstrap_connected / bootstrap_failed as events itself
        with contextlib.suppress(errors.BootstrapFailed):
            await self.svc.bootstrap()
        return None

    async def _connect(self, cmd: JsonObject) -> JsonObject | None:
        target: str | PeerId | list[str]
        raw = cmd.get("to")
        if isinstance(raw, list) and raw and all(isinstance(c, str) for c in raw):
            # several contacts of one peer, raced
            target = [c for c in raw if Contact.parse(c, field="to")]
        elif "://" in get_str(cmd, "to"):
            target = get_str(cmd, "to")
            Contact.parse(target, field="to")
        else:
            target = get_peer(cmd, "to")
        try:
            peer = await self.svc.connect(target)
        except errors.ServiceClosed:
            raise
        except errors.CrustError:
            return None  # the library reported it as a connect_failed event
        return {"event": "connected", "peer": str(peer), "to": raw}

    async def _send(self, cmd: JsonObject) -> JsonObject | None:
        peer = get_peer(cmd)
        data = get_data(cmd)
        priority = get_int(cmd, "priority", 0)
        signed = get_bool(cmd, "signed", False)
        entry = self._send_locks.setdefault(peer, _PeerLock())
        entry.users += 1
        try:
            async with entry.lock:
                await self.svc.send(peer, data, priority, signed=signed)
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._send_locks[peer]
        return {"event": "sent", "peer": str(peer), "bytes": len(data), "priority": priority}

    async def _disconnect(self, cmd: JsonObject) -> JsonObject | None:
        peer = get_peer(cmd)
        await self.svc.disconnect(peer)
        return {"event": "disconnected", "peer": str(peer)}

    async def _peers(self, cmd: JsonObject) -> JsonObject | None:
        rows: list[JsonObject] = []
        for peer in self.svc.peers():
            try:
                details = self.svc.connection(peer)
            except errors.NotConnected:
                continue
            rows.append({"peer": str(peer), **to_json(details)})
        return {"event": "peers", "peers": rows}

    async def _endpoints(self, cmd: JsonObject) -> JsonObject | None:
        return {
            "event": "endpoints",
            "endpoints": [to_json(ep) for ep in self.svc.endpoints()],
            "contacts": self.svc.contacts(),
            "role": self.svc.role,
        }

    async def _statistics(self, cmd: JsonObject) -> JsonObject | None:
        return {"event": "statistics", **to_json(self.svc.statistics())}

    async def _quit(self, cmd: JsonObject) -> JsonObject | None:
        self.stop.set()
        return None


def _error_obj(exc: BaseException) -> JsonObject:
    return {"event": "error", **error_fields(exc)}


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait for ``fd`` (pipes, sockets, terminals can; regular files
    and /dev/null cannot: epoll refuses them)."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return False
    with selectors.DefaultSelector() as sel:
        try:
            sel.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def _stdin_fd() -> int | None:
    """stdin's file descriptor, or None when there is no usable stdin (closed, detached)."""
    if sys.stdin is None:
        return None
    try:
        fd = sys.stdin.fileno()
        os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None
    return fd


async def run_node(opts: NodeOptions) -> int:
    """Run the node until quit/SIGINT/SIGTERM; returns the exit code."""
    out = Output(opts.json_mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    svc = Service(opts.config, identity=opts.identity)
    exporter = None
    try:
        await svc.start()
        ready: JsonObject = {
            "event": "ready",
            "peer_id": str(svc.peer_id),
            "contacts": svc.contacts(),
        }
        if opts.metrics_port is not None:
            from crust.metrics import MetricsExporter

            exporter = MetricsExporter(svc, host=opts.metrics_host, port=opts.metrics_port)
            await exporter.start()
            host = f"[{exporter.host}]" if ":" in exporter.host else exporter.host
            ready["metrics"] = f"http://{host}:{exporter.port}/metrics"
        out.emit(ready)
        if sys.stdin is not None and sys.stdin.isatty() and not opts.json_mode:
            out.note('commands: one JSON object per line, e.g. {"cmd": "peers"}; Ctrl-C stops')
        async with asyncio.TaskGroup() as tg:
            node = Node(svc, out, stop, tg)
            tg.create_task(node.pump_events())
            node.spawn(node.read_commands())
            for contact in opts.contacts:
                node.spawn(node.connect_at_start(contact))
            await stop.wait()
            node.cancel_all()
            await svc.aclose()  # ends the event stream, so the pump finishes
    finally:
        if exporter is not None:
            await exporter.aclose()
        await svc.aclose()
        for sig in installed:
            loop.remove_signal_handler(sig)
    out.emit({"event": "stopped"})
    return 0
