"""TCP transport: ``asyncio.BufferedProtocol`` reading into one preallocated buffer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

from crust.aio.connection import Connection, StreamTransport
from crust.contact import format_address

READ_BUFFER = 256 * 1024
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024


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


def sock_contact(transport: asyncio.BaseTransport, which: str) -> str:
    """``tcp://host:port`` of the transport's ``sockname`` or ``peername``."""
    addr: Any = transport.get_extra_info(which)
    if not addr:
        return "tcp://0.0.0.0:0"
    return format_address("tcp", addr)
