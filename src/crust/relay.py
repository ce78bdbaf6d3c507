"""Relayed connections: a crust session end to end through a node both peers are connected to.

The node side is :class:`~crust.proto.relay.RelayTable` (admission, routing, limits); this
module runs it for the service and provides :class:`RelayLink`, the stream transport an end's
:class:`~crust.aio.connection.Connection` writes to. Messages an end sends to the node are
``ro ra rx rd rk`` (open, accept, close, data, credit); the node's messages to an end are
``Ri Ra Rx Rd Rk`` — distinct names, because one connection may carry circuits in both roles.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, cast

from crust import errors
from crust.identity import PeerId
from crust.proto.relay import MAX_CHUNK, RelayLimits, RelayTable

if TYPE_CHECKING:
    from crust.aio.connection import Connection
    from crust.service import Service

log = logging.getLogger("crust.relay")

OPEN_TIMEOUT = 5.0
MAX_END_CIRCUITS = 64


def _send(conn: Connection, payload: dict[str, Any]) -> None:
    if not conn.closed:
        conn.session.send_control(payload)
        conn.control_changed()


class RelayLink:
    """One end of a circuit, as the stream transport of a relayed :class:`Connection`."""

    def __init__(self, relay: Relay, node: Connection, cid: int, window: int) -> None:
        self.relay = relay
        self.node = node
        self.cid = cid
        self.conn: Connection | None = None
        self._credit = window
        self._out: deque[bytes] = deque()
        self._unacked_in = 0
        self._window = window
        self._paused_in: deque[bytes] | None = None
        self._closing = False
        self._drain_then_close = False
        self._write_paused = False

    # ----------------------------------------------------------- StreamTransport

    def writelines(self, data: list[bytes | bytearray], /) -> None:
        if self._closing:
            return
        for buf in data:
            view = memoryview(buf)
            for i in range(0, len(view), MAX_CHUNK):
                self._out.append(bytes(view[i : i + MAX_CHUNK]))
        self._pump()

    def close(self) -> None:
        """Graceful: what is already written still goes out (as credit allows), then the
        circuit closes."""
        if not self._out:
            self._shut(send=True)
        else:
            self._drain_then_close = True

    def abort(self) -> None:
        self._shut(send=True)

    def pause_reading(self) -> None:
        if self._paused_in is None:
            self._paused_in = deque()

    def resume_reading(self) -> None:
        held, self._paused_in = self._paused_in, None
        while held:
            self._deliver(held.popleft())

    def is_closing(self) -> bool:
        return self._closing or self._drain_then_close

    # ----------------------------------------------------------- from the node

    def on_data(self, data: bytes) -> None:
        if self._paused_in is not None:
            self._paused_in.append(data)  # bounded: the sender never exceeds our window
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if self.conn is not None and not self._closing:
            self.conn.data_received(data)
        self._unacked_in += len(data)
        if self._unacked_in >= self._window // 4 or not self._out:
            _send(self.node, {"t": "rk", "c": self.cid, "k": self._unacked_in})
            self._unacked_in = 0

    def on_credit(self, size: int) -> None:
        self._credit += size
        self._pump()

    def _pump(self) -> None:
        while self._out and self._credit >= len(self._out[0]):
            chunk = self._out.popleft()
            self._credit -= len(chunk)
            _send(self.node, {"t": "rd", "c": self.cid, "d": chunk})
        if self._drain_then_close and not self._out:
            self._shut(send=True)
            return
        conn = self.conn
        if conn is None:
            return
        if self._out and not self._write_paused:
            self._write_paused = True
            conn.pause_writing()
        elif not self._out and self._write_paused:
            self._write_paused = False
            conn.resume_writing()

    def lost(self) -> None:
        """The circuit ended (the node said so, or our connection to it closed)."""
        self._shut(send=False)

    def _shut(self, *, send: bool) -> None:
        if self._closing:
            return
        self._closing = True
        self._out.clear()
        if send:
            _send(self.node, {"t": "rx", "c": self.cid, "e": "closed"})
        self.relay._links.pop((self.node, self.cid), None)
        conn = self.conn
        if conn is not None:
            asyncio.get_running_loop().call_soon(conn.connection_lost, None)


class Relay:
    """Both roles for one service: the node that forwards circuits, and the ends."""

    def __init__(self, service: Service, limits: RelayLimits | None = None) -> None:
        self.svc = service
        self.table = RelayTable(limits or RelayLimits())
        self._links: dict[tuple[Connection, int], RelayLink] = {}
        self._opening: dict[tuple[Connection, int], asyncio.Future[str | None]] = {}
        self._next = 0
        self.counters = {"relay_circuits": 0, "relay_bytes": 0, "relay_refused": 0}

    # ================================================================ end: open

    async def connect_via(self, node: Connection, peer: PeerId) -> PeerId:
        """Open a circuit to ``peer`` through ``node`` and run a crust session over it."""
        if len(self._links) >= MAX_END_CIRCUITS:
            raise errors.LimitExceeded("too many relayed connections")
        self._next = self._next % (2**31 - 2) + 1
        cid = self._next
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        key = (node, cid)
        self._opening[key] = fut
        link = RelayLink(self, node, cid, self.table.limits.window)
        self._links[key] = link
        try:
            _send(node, {"t": "ro", "to": bytes(peer), "c": cid})
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    refusal = await fut
            except TimeoutError:
                refusal = "no answer"
            if refusal is not None:
                raise errors.ConnectError(f"relay {node.peer_id}: {refusal}")
        except BaseException:
            self._links.pop(key, None)
            raise
        finally:
            self._opening.pop(key, None)
        conn = self._attach(link, peer, initiator=True, outbound=True)
        return await self.svc._keep_attempt(conn)

    def _attach(
        self, link: RelayLink, peer: PeerId, *, initiator: bool, outbound: bool
    ) -> Connection:
        node = link.node
        conn = self.svc._new_connection(
            node.remote,
            node.local,
            initiator=initiator,
            expected=peer,
            transport_name=node.transport_name,
            outbound=outbound,
            path="relayed",
        )
        link.conn = conn
        conn.attach(link)
        return conn

    # ================================================================ control messages

    def handle_control(self, conn: Connection, payload: dict[str, Any]) -> bool:
        """Relay messages (returns False for others)."""
        kind = payload.get("t")
        cid = payload.get("c")
        if not isinstance(kind, str) or kind[:1] not in ("r", "R") or len(kind) != 2:
            return False
        if not isinstance(cid, int) or isinstance(cid, bool):
            return True
        try:
            if kind[0] == "r":
                self._at_node(conn, kind, cid, payload)
            else:
                self._at_end(conn, kind, cid, payload)
        except (errors.ProtocolError, errors.LimitExceeded) as exc:
            self._refuse_circuit(conn, cid, str(exc))
            if isinstance(exc, errors.ProtocolError):  # broke the circuit protocol
                kind = "oversized" if isinstance(exc, errors.OversizedInput) else "garbage"
                self.svc.abuse(conn.remote, conn.peer_id, kind)
        return True

    def _refuse_circuit(self, conn: Connection, cid: int, reason: str) -> None:
        self.counters["relay_refused"] += 1
        other = self.table.close(conn, cid)
        _send(conn, {"t": "Rx", "c": cid, "e": reason})
        if other is not None:
            _send(_conn(other[0]), {"t": "Rx", "c": other[1], "e": reason})

    def _at_node(self, conn: Connection, kind: str, cid: int, p: dict[str, Any]) -> None:
        now = asyncio.get_running_loop().time()
        if kind == "ro":
            to = p.get("to")
            if not self.svc.config.relay:
                raise errors.LimitExceeded("relaying is disabled here")
            if not isinstance(to, bytes) or len(to) != 32:
                raise errors.ProtocolError("malformed relay request")
            target = self.svc._active.get(PeerId(to))
            if target is None or target.closed or target is conn:
                self.counters["relay_refused"] += 1
                _send(conn, {"t": "Rx", "c": cid, "e": "not connected to that peer"})
                return
            b_cid = self.table.open(conn, cid, target, now)
            assert conn.peer_id is not None
            _send(target, {"t": "Ri", "c": b_cid, "from": bytes(conn.peer_id)})
        elif kind == "ra":
            a_key, a_cid = self.table.accept(conn, cid)
            self.counters["relay_circuits"] += 1
            _send(_conn(a_key), {"t": "Ra", "c": a_cid})
        elif kind == "rx":
            other = self.table.close(conn, cid)
            if other is not None:
                _send(_conn(other[0]), {"t": "Rx", "c": other[1], "e": str(p.get("e", ""))[:100]})
        elif kind == "rd":
            data = p.get("d")
            if not isinstance(data, bytes):
                raise errors.ProtocolError("relay data must be bytes")
            to_key, to_cid = self.table.route_data(conn, cid, len(data), now)
            self.counters["relay_bytes"] += len(data)
            _send(_conn(to_key), {"t": "Rd", "c": to_cid, "d": data})
        elif kind == "rk":
            size = p.get("k")
            if not isinstance(size, int) or isinstance(size, bool):
                raise errors.ProtocolError("bad relay credit")
            to_key, to_cid, delay = self.table.route_credit(conn, cid, size, now)
            credit = {"t": "Rk", "c": to_cid, "k": size}
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, _send, _conn(to_key), credit)
            else:
                _send(_conn(to_key), credit)

    def _at_end(self, node: Connection, kind: str, cid: int, p: dict[str, Any]) -> None:
        key = (node, cid)
        if kind == "Ri":
            self._incoming(node, cid, p.get("from"))
            return
        if kind == "Ra":
            fut = self._opening.get(key)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind == "Rx":
            fut = self._opening.get(key)
            if fut is not None and not fut.done():
                fut.set_result(str(p.get("e", "refused"))[:200])
            link = self._links.get(key)
            if link is not None:
                link.lost()
            return
        link = self._links.get(key)
        if link is None:
            return
        if kind == "Rd":
            data = p.get("d")
            if isinstance(data, bytes):
                link.on_data(data)
        elif kind == "Rk":
            size = p.get("k")
            if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= 2**31:
                link.on_credit(size)

    def _incoming(self, node: Connection, cid: int, sender: Any) -> None:
        """The node offers us a circuit from ``sender``."""
        reason = None
        if not isinstance(sender, bytes) or len(sender) != 32:
            reason = "malformed"
        elif PeerId(sender) in self.svc._active:
            reason = "already connected"
        elif not self.svc._peer_allowed(PeerId(sender), "0.0.0.0"):
            reason = "refused"
        elif len(self._links) >= MAX_END_CIRCUITS or (node, cid) in self._links:
            reason = "too many relayed connections"
        if reason is not None:
            self.counters["relay_refused"] += 1
            _send(node, {"t": "rx", "c": cid, "e": reason})
            return
        assert isinstance(sender, bytes)
        link = RelayLink(self, node, cid, self.table.limits.window)
        self._links[(node, cid)] = link
        _send(node, {"t": "ra", "c": cid})
        self._attach(link, PeerId(sender), initiator=False, outbound=False)

    # ================================================================ lifetime

    def connection_closed(self, conn: Connection) -> None:
        """One of our connections closed: circuits through it (either role) end."""
        for other_key, other_cid in self.table.drop(conn):
            _send(_conn(other_key), {"t": "Rx", "c": other_cid, "e": "the other end left"})
        for (node, cid), link in list(self._links.items()):
            if node is conn:
                link.lost()
                fut = self._opening.get((node, cid))
                if fut is not None and not fut.done():
                    fut.set_result("connection to the relay lost")

    def close(self) -> None:
        for link in list(self._links.values()):
            link.lost()
        for fut in self._opening.values():
            if not fut.done():
                fut.cancel()


def _conn(key: Hashable) -> Connection:
    """The relay table's keys are our connections."""
    return cast("Connection", key)
