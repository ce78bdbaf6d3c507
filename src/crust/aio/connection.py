"""Drive one :class:`~crust.proto.session.Session` over an asyncio transport.

The transport-specific part (TCP here, a QUIC stream later) only delivers bytes with
:meth:`Connection.data_received`, reports flow control, and writes what the driver hands it.
One ``loop.call_at`` timer per connection; the clock is read once per callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from crust.events import MessageReceived
from crust.identity import PeerId
from crust.proto.session import CloseCode, Closed, Session, SessionEvent

WRITE_CHUNK = 256 * 1024
"""Bytes of records produced per pull while the transport accepts more."""


class Owner(Protocol):
    """What a connection reports to (the service)."""

    def deliver(self, event: MessageReceived, conn: Connection) -> None: ...

    def session_event(self, conn: Connection, event: SessionEvent) -> None: ...

    def over_limit(self, conn: Connection) -> None:
        """The remote sent more than its :attr:`Connection.rx_limit` allows."""
        ...


class RateLimit:
    """A token bucket counting bytes: ``rate`` per second, at most ``burst`` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: int, now: float) -> bool:
        """Spend ``amount``; False (and nothing spent) when the bucket does not hold it."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.stamp = now
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True


class StreamTransport(Protocol):
    def writelines(self, data: list[bytes | bytearray], /) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool: ...


class Connection:
    """A session bound to a transport. Created by the transport adapter, owned by the service."""

    def __init__(
        self,
        owner: Owner,
        session: Session,
        *,
        transport_name: str,
        outbound: bool,
        remote: str,
        local: str,
        path: str = "direct",
    ) -> None:
        self.owner = owner
        self.session = session
        self.transport_name = transport_name
        self.outbound = outbound
        self.remote = remote
        self.local = local
        self.path = path
        self.transport: StreamTransport | None = None
        self.selected = False
        self.policy_ok = False
        """Our own checks of the remote identity passed (blacklist, whitelist, self)."""
        self.peer_accepted = False
        """The remote (when it has the lesser peer id) accepted our identity."""
        self.closed = False
        self.on_close: list[Callable[[Connection], None]] = []
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._flush_scheduled = False
        self._write_paused = False
        self._read_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.rx_limit: RateLimit | None = None
        """Bytes the remote may send us (checked before the session sees them)."""

    @property
    def peer_id(self) -> PeerId | None:
        return self.session.peer_id

    def __repr__(self) -> str:
        who = self.peer_id.short() if self.peer_id else "?"
        arrow = "->" if self.outbound else "<-"
        return f"<Connection {self.transport_name} {arrow} {self.remote} peer={who}>"

    # ----------------------------------------------------------- from the transport

    def attach(self, transport: StreamTransport) -> None:
        self.transport = transport
        self.flush()
        self._arm_timer()

    def data_received(self, data: bytes | bytearray | memoryview) -> None:
        now = self._loop.time()
        limit = self.rx_limit
        if limit is not None and not limit.take(len(data), now):
            if not self.session.closed:
                self.owner.over_limit(self)
            return
        self.session.receive_data(data, now)
        self._after_input()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.session.connection_lost(None)
        self._drain_events()
        self._set_closed()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    # ----------------------------------------------------------- from the service

    def send(self, data: bytes, priority: int, signed: bool = False) -> bool:
        ok = self.session.send_message(data, priority, signed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)
        if self.session.queue_full:
            self._writable.clear()
        return ok

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def queue_full(self) -> bool:
        return self.session.queue_full

    def control_changed(self) -> None:
        """The service queued a control frame (select, ping, control): write it soon."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Clean close: queued messages, then CLOSE; the transport closes when the peer
        answers or after a short deadline."""
        self.session.close(code, reason, self._loop.time())
        self._after_input()

    def abort(self, code: int = CloseCode.PROTOCOL_ERROR, reason: str = "aborted") -> None:
        self.session.abort(code, reason)
        self._after_input()

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    # ----------------------------------------------------------- internals

    def _after_input(self) -> None:
        self._drain_events()
        self.flush()
        if self.session.closed:
            self._finish_transport()
        else:
            self._arm_timer()

    def _drain_events(self) -> None:
        events = self.session.events
        owner = self.owner
        while events:
            ev = events.popleft()
            if type(ev) is MessageReceived:
                owner.deliver(ev, self)
            else:
                owner.session_event(self, ev)

    def flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        session = self.session
        while not self._write_paused:
            data = session.data_to_send(WRITE_CHUNK)
            if not data:
                break
            transport.writelines(data)
        if not session.queue_full and not self._writable.is_set():
            self._writable.set()

    def _arm_timer(self) -> None:
        when = self.session.get_timer()
        if when is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.session.handle_timer(self._loop.time())
        self._after_input()

    def _finish_transport(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            final = self.session.closed_event
            if final is not None and final.code in (CloseCode.TIMEOUT, CloseCode.LIMIT):
                transport.abort()  # the peer is gone, or cut off: do not wait to flush
            else:
                # a clean close: what the session still holds (queued messages packed before
                # CLOSE) is handed over even while writing is paused, then the transport
                # flushes it all and closes
                rest = self.session.data_to_send()
                if rest:
                    transport.writelines(rest)
                transport.close()
        self._set_closed()

    def _set_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writable.set()
        callbacks, self.on_close = self.on_close, []
        for cb in callbacks:
            cb(self)


def closed_reason(event: Closed) -> str:
    """A human-readable reason for PeerLost."""
    if event.error is not None:
        return f"{type(event.error).__name__}: {event.error}"
    who = "peer" if event.by_peer else "local"
    try:
        name = CloseCode(event.code).name.lower()
    except ValueError:
        name = f"code {event.code}"
    return f"closed by {who} ({name}{': ' + event.reason if event.reason else ''})"
