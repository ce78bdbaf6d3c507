"""TCP transport: ``asyncio.BufferedProtocol`` reading into one preallocated buffer."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any, cast

from crust.aio.connection import Connection, StreamTransport
from crust.contact import format_address

log = logging.getLogger("crust")

READ_BUFFER = 256 * 1024
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024
ACCEPT_BATCH = 4
"""Connections a listener accepts per readiness callback (the loop comes back to it after
one round of the other ready sockets). asyncio's own servers accept up to ``backlog``
(1024) at once and build a transport for each, which let a storm of connection attempts
hold the event loop for tens of milliseconds at a time; 4 to 16 measured alike under a
storm (docs/benchmarks.md, "Hostile peers")."""
ACCEPT_PAUSE = 1.0
"""Seconds a listener stops accepting after running out of file descriptors."""
LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on with 0 s: ``close()`` resets the connection (no TIME_WAIT, no FIN wait)."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

MAX_DROPPED_HOSTS = 256
"""Addresses a listener's kernel filter drops at most (the rest are refused at accept)."""
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
_INSN = struct.Struct("HBBI")
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_NET = 0xFFF00000
"""SKF_NET_OFF as an unsigned offset: loads relative to the IP header."""


def drop_filter(family: int, hosts: list[str]) -> bytes:
    """A classic BPF socket filter dropping every packet from ``hosts`` (IP literals of
    ``family``; others are skipped): attached to a listening socket it drops their SYNs in
    the kernel, so a refused address costs no accept, no socket and no event-loop time."""
    insns: list[tuple[int, int, int, int]] = []
    if family == socket.AF_INET:
        insns.append((_LD_W_ABS, 0, 0, _NET + 12))  # source address
        for host in hosts:
            try:
                (addr,) = struct.unpack(">I", socket.inet_pton(socket.AF_INET, host))
            except OSError:
                continue
            insns += [(_JEQ_K, 0, 1, addr), (_RET_K, 0, 0, 0)]
    else:
        for host in hosts:
            try:
                words = struct.unpack(">4I", socket.inet_pton(socket.AF_INET6, host))
            except OSError:
                continue
            # four words, each mismatch skipping to the next host's block; all equal: drop
            for i, word in enumerate(words):
                skip = 2 * (3 - i) + 1
                insns += [(_LD_W_ABS, 0, 0, _NET + 8 + 4 * i), (_JEQ_K, 0, skip, word)]
            insns.append((_RET_K, 0, 0, 0))
    insns.append((_RET_K, 0, 0, 0xFFFFFFFF))  # everything else: accept, whole
    return b"".join(_INSN.pack(*i) for i in insns)


_local = threading.local()


def _read_buffer() -> memoryview:
    """One read buffer per thread, shared by every TCP connection of its event loop: asyncio
    calls ``buffer_updated`` right after each read, and the session consumes the bytes (or
    copies the unfinished record) before the next read into it — so an idle connection does
    not hold 256 KiB of its own."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_BUFFER))
    return view


class TcpProtocol(asyncio.BufferedProtocol):
    """Bytes from the socket land in a preallocated buffer and go straight to the session.

    ``make_connection(transport)`` builds the :class:`Connection` once the socket is up (or
    returns None to refuse it, in which case the socket is closed at once).
    """

    def __init__(self, make_connection: Callable[[asyncio.Transport], Connection | None]) -> None:
        self._make = make_connection
        self._view = _read_buffer()
        self.conn: Connection | None = None
        self.made: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tr.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self._make(tr)
        except Exception as exc:
            tr.abort()
            if not self.made.done():
                self.made.set_exception(exc)
            return
        if conn is None:
            tr.abort()
            if not self.made.done():
                self.made.set_result(None)
            return
        self.conn = conn
        conn.attach(cast(StreamTransport, tr))
        if not self.made.done():
            self.made.set_result(conn)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is not None:
            conn.data_received(self._view[:nbytes])

    def eof_received(self) -> bool:
        return False  # close our side too; the session reports the loss

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.connection_lost(exc)
        if not self.made.done():
            self.made.set_result(None)

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


class TcpListener:
    """A listening TCP socket with its own accept loop (in place of ``loop.create_server``).

    At most :data:`ACCEPT_BATCH` connections per readiness callback, so established
    connections get their turn during a storm; and ``refuse(host)`` is asked before anything
    is built for a connection: a refused one costs an ``accept`` and a reset, no transport,
    protocol or task. Accepted sockets become :class:`TcpProtocol` transports in jobs
    started with ``spawn`` (the service's task group). ``sockets`` and ``close``/
    ``wait_closed`` are those of ``asyncio.Server``.
    """

    def __init__(
        self,
        sock: socket.socket,
        make_connection: Callable[[asyncio.Transport], Connection | None],
        refuse: Callable[[str], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = [sock]
        self._sock = sock
        self._make = make_connection
        self._refuse = refuse
        self._spawn = spawn
        self._closed = False
        self._filtered = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        make_connection: Callable[[asyncio.Transport], Connection | None],
        refuse: Callable[[str], bool],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        *,
        backlog: int = 1024,
    ) -> TcpListener:
        """Listen on ``host:port`` (an IP literal; port 0 = any) with ``SO_REUSEADDR`` and
        ``SO_REUSEPORT`` (hole punching connects from this very port)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
            return cls(sock, make_connection, refuse, spawn)
        except BaseException:
            sock.close()
            raise

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    # the waiting connections stay in the backlog; try again in a moment
                    log.warning("TCP listener: %s; accepting again in %.0f s", exc, ACCEPT_PAUSE)
                    self._loop.remove_reader(self._sock.fileno())
                    self._loop.call_later(ACCEPT_PAUSE, self._resume)
                return  # (ECONNABORTED and the like: the next readiness brings the rest)
            if self._refuse(str(addr[0]).partition("%")[0]):
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                conn.close()
                continue
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: TcpProtocol(self._make), conn)
        except OSError:
            conn.close()

    def drop_from(self, hosts: list[str]) -> bool:
        """Have the kernel drop connection attempts from ``hosts`` (replacing the previous
        list; empty: drop nothing). False where socket filters are not available (then
        ``refuse`` still turns them away at accept)."""
        if self._closed or not hasattr(socket, "AF_PACKET"):  # classic BPF: Linux
            return False
        try:
            if not hosts:
                if self._filtered:
                    self._sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
                    self._filtered = False
                return True
            program = drop_filter(self._sock.family, hosts[:MAX_DROPPED_HOSTS])
            buf = ctypes.create_string_buffer(program, len(program))  # copied by the kernel
            fprog = struct.pack("HL", len(program) // _INSN.size, ctypes.addressof(buf))
            self._sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self._filtered = True
            return True
        except OSError as exc:
            log.debug("TCP listener: no kernel filter (%s)", exc)
            return False

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        """Nothing to wait for: accepted connections belong to the service."""


def sock_contact(transport: asyncio.BaseTransport, which: str) -> str:
    """``tcp://host:port`` of the transport's ``sockname`` or ``peername``."""
    addr: Any = transport.get_extra_info(which)
    if not addr:
        return "tcp://0.0.0.0:0"
    return format_address("tcp", addr)
