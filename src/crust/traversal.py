"""NAT traversal for a :class:`~crust.service.Service`: address discovery, introductions
through a connected node, and coordinated hole punching (UDP for QUIC, TCP simultaneous open).

The protocol logic (datagrams, candidates, the punch schedule) is sans-IO in
:mod:`crust.proto.punch`; this module runs it on sockets and timers and talks to the service.

Signalling rides on CONTROL frames of authenticated connections:

* ``{"t": "fw", "to": PEER, "m": {...}}`` asks the receiving node to forward ``m`` to ``PEER``;
  the node delivers ``{"t": "fw", "from": SENDER, "m": {...}, "obs": CONTACT}`` where
  ``from`` is the *authenticated* sender and ``obs`` the address the node sees it at, or
  answers ``{"t": "fwe", "to": PEER, "e": REASON}`` (not connected to that peer, rate limited).
* the forwarded messages, end to end between the two peers: ``intro`` (id, candidates,
  nonce), ``ack`` (id, candidates, nonce) or ``nak`` (id, reason), then ``sync`` (id): the
  introducing side measured the round trip between intro and ack and starts punching
  ``rtt / 2`` after sending ``sync``, which is when ``sync`` reaches the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from random import SystemRandom
from typing import TYPE_CHECKING, Any

from crust import errors
from crust.aio.tcp import TcpProtocol
from crust.aio.udp_mux import Address, UdpMux
from crust.contact import Contact, expand_wildcard
from crust.events import ExternalAddressChanged
from crust.identity import PeerId
from crust.proto import predict as pr
from crust.proto import punch as pp
from crust.proto import session as sp
from crust.types import EndpointPair

if TYPE_CHECKING:
    from crust.aio.connection import Connection
    from crust.service import Service

log = logging.getLogger("crust.traversal")

MAX_OBSERVERS = 32
"""Observations kept per protocol (one per observing peer, newest win)."""
MAX_PUNCHES = 16
"""Punches in progress at once (each side)."""
MAX_PUNCHES_PER_NODE = 4
"""Punches in progress that one node introduced to us: a node forging introductions cannot
take every punch slot."""
ECHO_TIMEOUT = 0.6
INTRO_TIMEOUT = 5.0
NODES_TRIED = 3
"""Connected peers asked, one after another, to introduce us to a peer."""
SYNC_WAIT = 10.0
MAX_PROMOTED = 16
"""Birthday sockets kept as QUIC endpoints; beyond this, idle ones are closed."""
MEASURE_RATE = (1.0, 4.0)
"""Allocation measurements (before a punch) per second, burst: each costs the node a few echoes,
and another peer's introductions could otherwise make us measure for every one."""
UNPREDICTABLE_FOR = 300.0
"""After a TCP allocation measurement found nothing to predict, do not measure again for this
long (each measurement costs the node three small connections)."""
UPGRADE_DELAYS = (5.0, 30.0, 120.0, 600.0)
"""Seconds before each attempt to replace a relayed connection by a punched one."""
"""How long the introduced side waits for ``sync`` after its ``ack``."""


class TokenBucket:
    """``rate`` per second, bursts of ``burst``; ``take(now)`` says whether one more is allowed."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class BucketMap:
    """A bounded map of token buckets (one per key); the oldest keys are forgotten first."""

    def __init__(self, rate: float, burst: float, limit: int = 1024) -> None:
        self.rate, self.burst, self.limit = rate, burst, limit
        self._buckets: OrderedDict[Any, TokenBucket] = OrderedDict()

    def take(self, key: Any, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.limit:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)


@dataclass
class _Punch:
    """One punch towards ``peer`` (either side)."""

    peer: PeerId
    nonce: bytes
    outbound: bool
    """We asked for it (the user called connect)."""
    remote_tcp: list[Address] = field(default_factory=list)
    remote_quic: list[Address] = field(default_factory=list)
    token: bytes = b""
    peer_symmetric: bool = False
    predicted_tcp: list[Address] = field(default_factory=list)
    predicted_quic: list[Address] = field(default_factory=list)
    """Where the other side predicts its next NAT mappings (sequential allocation)."""
    advertised_quic: bool = False
    """We told the other side where our next UDP mappings will be."""
    spray: pp.BirthdaySpray | None = None
    prime_at: float | None = None
    """Birthday probing, symmetric side: when to open the extra sockets (after the
    prediction round when predictions were exchanged)."""
    sockets: list[socket.socket] = field(default_factory=list)
    """Birthday probing, symmetric side: the extra sockets (closed when the punch ends)."""
    plan: pp.PunchPlan | None = None
    task: asyncio.Task[None] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    via: Connection | None = None
    """The node that introduced it (only that node's ``sync`` starts it)."""


class Traversal:
    """The service's NAT traversal; created and owned by :class:`Service`."""

    def __init__(self, service: Service) -> None:
        self.svc = service
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._observed: dict[str, OrderedDict[PeerId, str]] = {
            "tcp": OrderedDict(),
            "quic": OrderedDict(),
        }
        self._external: dict[str, str] = {}
        self._seen_by: OrderedDict[PeerId, str] = OrderedDict()
        self._external_ips: list[str] = []
        self._punches: dict[PeerId, _Punch] = {}
        self._upgrading: set[PeerId] = set()
        self.by_nat_pair: dict[str, list[int]] = {}
        """Punch attempts and successes by NAT pair (see :meth:`_nat_pair`)."""
        self.symmetric: bool | None = None
        """Our UDP mapping depends on the destination (learnt from two addresses of a node)."""
        cfg = service.config
        self.birthday = pp.BirthdayParams(sockets=cfg.birthday_sockets, probes=cfg.birthday_probes)
        self.prediction_count = cfg.port_prediction
        self.allocation: dict[str, tuple[str, pr.Allocation] | None] = {"tcp": None, "quic": None}
        """Per protocol: our external IP and the sequential allocation last measured."""
        self._tcp_unpredictable_until = 0.0
        self._measurements = TokenBucket(*MEASURE_RATE, now=now)
        self._promoted: list[UdpMux] = []
        """Birthday sockets that carried a punch, now serving their QUIC connection."""
        self._by_token: dict[bytes, _Punch] = {}
        self._echo_waiters: dict[bytes, tuple[asyncio.Future[Address], Address]] = {}
        """Address echoes in flight: token -> (answer, the address asked)."""
        self._intro_waiters: dict[
            int, tuple[asyncio.Future[dict[str, Any]], Connection, PeerId]
        ] = {}
        """Introductions in flight: id -> (answer, the node asked, the peer introduced to)."""
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._forward_per_peer = BucketMap(rate=2.0, burst=10.0)
        self._forward_total = TokenBucket(rate=200.0, burst=400.0, now=now)
        self._echo_total = TokenBucket(rate=500.0, burst=1000.0, now=now)
        self._intro_per_peer = BucketMap(rate=1.0, burst=5.0)
        self._intro_per_node = BucketMap(rate=2.0, burst=10.0)
        self.counters: dict[str, int] = {
            "punch_attempts": 0,
            "punch_successes": 0,
            "punch_failures": 0,
            "introductions_forwarded": 0,
            "introductions_refused": 0,
            "echo_replies": 0,
            "punch_datagrams_dropped": 0,
            "allocations_measured": 0,
            "port_predictions": 0,
        }

    # ================================================================ address discovery

    def observe(self, conn: Connection, observed: Any) -> None:
        """A peer told us (in its hello) the address it sees this connection come from."""
        peer = conn.peer_id
        if peer is None or not isinstance(observed, str):
            return
        try:
            seen = Contact.parse(observed)
        except errors.ConfigError:
            return
        if not seen.is_ip or seen.scheme != conn.transport_name:
            return
        ip = ipaddress.ip_address(seen.host)
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            return
        self._seen_by.pop(peer, None)
        self._seen_by[peer] = str(seen.with_peer(None))
        while len(self._seen_by) > MAX_OBSERVERS:
            self._seen_by.popitem(last=False)
        if conn.outbound and "quic" not in self._external and self._listener_mux() is not None:
            # learn the QUIC listener's mapping too (one small datagram to this peer's UDP port)
            self.svc._spawn(self.learn_udp_mapping(peer))
        if seen.host not in self._external_ips:
            self._external_ips.insert(0, seen.host)
            del self._external_ips[8:]
        scheme = seen.scheme
        # a TCP connection we dialed leaves from an ephemeral port: only its IP tells anything;
        # a QUIC one leaves from the listener's own socket, so it shows the listener's mapping
        if scheme == "tcp" and conn.outbound:
            return
        table = self._observed[scheme]
        table.pop(peer, None)
        table[peer] = str(seen.with_peer(None))
        while len(table) > MAX_OBSERVERS:
            table.popitem(last=False)
        self._update_external(scheme)

    def _update_external(self, scheme: str) -> None:
        """The external endpoint is what most observers agree on (the newest on a tie)."""
        table = self._observed[scheme]
        if not table:
            return
        votes: dict[str, int] = {}
        for text in table.values():
            votes[text] = votes.get(text, 0) + 1
        newest = next(reversed(table.values()))
        best = max(votes, key=lambda t: (votes[t], t == newest))
        if best in self.local_contacts(scheme):
            return  # not behind a NAT for this protocol
        if self._external.get(scheme) == best:
            return
        self._external[scheme] = best
        eps = self.svc._endpoints
        for i, ep in enumerate(eps):
            if ep.protocol == scheme:
                eps[i] = EndpointPair(ep.protocol, ep.local, best)
        self.svc._emit(ExternalAddressChanged(best))
        log.info("external %s address: %s", scheme, best)

    def observed_by(self, peer: PeerId) -> str | None:
        """The address ``peer`` last said it sees us at (any connection, any protocol)."""
        return self._seen_by.get(peer)

    def external(self, scheme: str) -> str | None:
        return self._external.get(scheme)

    def local_contacts(self, scheme: str) -> list[str]:
        out: list[str] = []
        for ep in self.svc._endpoints:
            if ep.protocol != scheme:
                continue
            c = Contact.parse(ep.local)
            for host in expand_wildcard(c.host):
                out.append(str(Contact(scheme, host, c.port)))
        return out

    def candidates(self, *, loopback: bool) -> list[str]:
        """Our candidates: external endpoints, then local ones (and, for TCP, each external IP
        with the listening port: most NATs keep the port when they can)."""
        out: list[str] = []
        for scheme in ("quic", "tcp"):
            ext = self._external.get(scheme)
            if ext:
                out.append(ext)
            ports = [Contact.parse(c).port for c in self.local_contacts(scheme)]
            for ip in self._external_ips:
                out.extend(str(Contact.from_address(scheme, (ip, p))) for p in dict.fromkeys(ports))
            for c in self.local_contacts(scheme):
                if loopback == ipaddress.ip_address(Contact.parse(c).host).is_loopback:
                    out.append(c)
        return list(pp.clean_candidates(out, limit=pp.MAX_CANDIDATES))

    # ================================================================ UDP datagrams

    def on_datagram(self, mux: UdpMux, data: bytes, addr: Address) -> bool:
        """A non-QUIC datagram on one of our UDP sockets. False: refused (not a punch
        datagram, no punch or echo with that token, an echo answer from an address we did
        not ask, echo answers rate-limited) — counted in ``punch_datagrams_dropped`` and
        charged to the sender's junk budget by the mux."""
        if not pp.is_punch(data):
            self.counters["punch_datagrams_dropped"] += 1
            return False
        try:
            dgram = pp.parse(data)
        except errors.ProtocolError:
            self.counters["punch_datagrams_dropped"] += 1
            return False
        now = self._loop.time()
        addr = (addr[0].partition("%")[0], addr[1])
        if dgram.kind is pp.Kind.ECHO_REQUEST:
            if self._echo_total.take(now):
                self.counters["echo_replies"] += 1
                mux.sendto(pp.encode(pp.Kind.ECHO_REPLY, dgram.token, addr), addr)
                return True
            self.counters["punch_datagrams_dropped"] += 1
            return False
        if dgram.kind is pp.Kind.ECHO_REPLY:
            entry = self._echo_waiters.get(dgram.token)
            if entry is None or not _same_address(entry[1], addr) or dgram.address is None:
                # a guessed token, a late answer or one from an address we did not ask
                self.counters["punch_datagrams_dropped"] += 1
                return False
            del self._echo_waiters[dgram.token]
            if not entry[0].done():
                entry[0].set_result(dgram.address)
            return True
        punch = self._by_token.get(dgram.token)
        if punch is None or punch.plan is None:
            self.counters["punch_datagrams_dropped"] += 1
            return False
        if _own(addr, mux):
            # our own probe, sent to a "LAN" candidate that is in fact our own address
            self.counters["punch_datagrams_dropped"] += 1
            return True
        punch.plan.datagram_received(dgram, addr, now)
        self._run_actions(punch, mux)
        return True

    async def echo(self, mux: UdpMux, server: Address, timeout: float = ECHO_TIMEOUT) -> Address:
        """Ask ``server`` (a crust node's UDP port) which address it sees ``mux`` at."""
        token = os.urandom(pp.TOKEN_LEN)
        fut: asyncio.Future[Address] = self._loop.create_future()
        self._echo_waiters[token] = (fut, server)
        try:
            async with asyncio.timeout(timeout):
                delay = 0.1
                while True:
                    mux.sendto(pp.encode(pp.Kind.ECHO_REQUEST, token), server)
                    done, _ = await asyncio.wait({fut}, timeout=delay)
                    if done:
                        return fut.result()
                    delay *= 2
        finally:
            self._echo_waiters.pop(token, None)

    async def learn_udp_mapping(self, via: PeerId, *, measure: bool = False) -> None:
        """Find our QUIC listener's external mapping from a node's UDP port (address echo),
        and — when the node has a second address — whether the mapping changes with the
        destination (a symmetric NAT: then the mapping is useless to others).  With
        ``measure``, behind a symmetric NAT, also measure its port allocation (for port
        prediction, right before a punch)."""
        mux = self._listener_mux()
        if mux is None:
            return
        first: tuple[str, Address] | None = None
        servers: list[Address] = []
        for text in self.svc._known.get(via, []):
            c = Contact.parse(text)
            if c.scheme != "quic" or ipaddress.ip_address(c.host).version != (
                6 if mux.family == socket.AF_INET6 else 4
            ):
                continue
            if ipaddress.ip_address(c.host).is_loopback:
                continue
            try:
                seen = await self.echo(mux, (c.host, c.port))
            except (TimeoutError, OSError):
                continue
            servers.append((c.host, c.port))
            if first is None:
                first = (c.host, seen)
                continue
            if c.host == first[0]:
                continue
            # a second address of the same node: does our mapping depend on the destination?
            self.symmetric = seen[1] != first[1][1] or seen[0] != first[1][0]
            log.info("UDP mapping %s and %s: symmetric=%s", first[1], seen, self.symmetric)
            break
        if first is None:
            return
        if measure and self.symmetric and self.prediction_count:
            await self._measure_allocation(servers, mux.family)
        if not self.symmetric:
            table = self._observed["quic"]
            table.pop(via, None)
            table[via] = str(Contact.from_address("quic", first[1]))
            self._update_external("quic")

    async def _measure_allocation(self, servers: list[Address], family: int) -> None:
        """Port prediction: create a few new UDP mappings in quick succession (one fresh
        socket each, echoed by the node) and see whether their ports follow a fixed step."""
        self.allocation["quic"] = None

        async def probe(i: int) -> tuple[int | None, Address]:
            return None, await self._echo_fresh(servers[i % len(servers)], family)

        self.allocation["quic"] = await self._sample_allocation("UDP", probe)

    async def _sample_allocation(
        self, what: str, probe: Callable[[int], Awaitable[tuple[int | None, Address]]]
    ) -> tuple[str, pr.Allocation] | None:
        """Create :data:`~crust.proto.predict.MIN_SAMPLES` new mappings in quick succession
        (``probe(i)``: the local port when the NAT may have kept it, and the address the node
        saw) and measure their allocation: ``(external host, allocation)``, or None when it
        is not predictable (a failed echo, the local port kept, another external address, or
        no fixed step)."""
        samples: list[pr.PortSample] = []
        host = None
        for i in range(pr.MIN_SAMPLES):
            try:
                local_port, seen = await probe(i)
            except (TimeoutError, OSError, errors.ProtocolError):
                return None
            if seen[1] == local_port or (host is not None and seen[0] != host):
                return None  # no translation, or no single counter to predict
            host = seen[0]
            samples.append(pr.PortSample(seen[1], self._loop.time()))
        allocation = pr.measure(samples)
        self.counters["allocations_measured"] += 1
        log.info(
            "%s port allocation %s: %s",
            what,
            [s.port for s in samples],
            f"sequential, step {allocation.delta}" if allocation else "not predictable",
        )
        if allocation is None or host is None:
            return None
        return host, allocation

    async def _echo_fresh(
        self, server: Address, family: int, timeout: float = ECHO_TIMEOUT
    ) -> Address:
        """Address echo from a new UDP socket (so from a new NAT mapping), closed after."""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            token = os.urandom(pp.TOKEN_LEN)
            request = pp.encode(pp.Kind.ECHO_REQUEST, token)
            async with asyncio.timeout(timeout):
                delay = 0.1
                while True:
                    sock.sendto(request, server)
                    try:
                        async with asyncio.timeout(delay):
                            while True:
                                data, _ = await self._loop.sock_recvfrom(sock, 2048)
                                with contextlib.suppress(errors.ProtocolError):
                                    reply = pp.parse(data)
                                    if (
                                        reply.kind is pp.Kind.ECHO_REPLY
                                        and reply.token == token
                                        and reply.address is not None
                                    ):
                                        return reply.address
                    except TimeoutError:
                        delay *= 2
        finally:
            sock.close()

    async def _measure_tcp_allocation(self, via: PeerId) -> None:
        """Port prediction over TCP: a few new connections to the node's TCP listener in
        quick succession (address echo: the node only reports the address it sees), and
        whether their external ports follow a fixed step.  A NAT that keeps the local port
        (or reports ours) needs no prediction: the listening port is the guess already."""
        now = self._loop.time()
        self.allocation["tcp"] = None
        if (
            not self.prediction_count
            or self.symmetric is False
            or now < self._tcp_unpredictable_until
            or not self.svc._servers
        ):
            return
        servers: list[Address] = []
        for text in self.svc._known.get(via, []):
            c = Contact.parse(text)
            if c.scheme == "tcp" and c.is_ip and not ipaddress.ip_address(c.host).is_loopback:
                servers.append((c.host, c.port))
        if not servers:
            return

        async def probe(i: int) -> tuple[int | None, Address]:
            return await self._tcp_echo(servers[i % len(servers)])

        measured = await self._sample_allocation("TCP", probe)
        if measured is None:
            self._tcp_unpredictable_until = now + UNPREDICTABLE_FOR
        self.allocation["tcp"] = measured

    async def _tcp_echo(
        self, server: Address, timeout: float = ECHO_TIMEOUT
    ) -> tuple[int, Address]:
        """(our local port, the address the node sees) of one new TCP connection."""
        sock = socket.socket(socket.AF_INET6 if ":" in server[0] else socket.AF_INET)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await self._loop.sock_connect(sock, server)
                local_port = int(sock.getsockname()[1])
                await self._loop.sock_sendall(sock, sp.echo_request(self.svc.config.network_name))
                reply = b""
                while True:
                    chunk = await self._loop.sock_recv(sock, sp.ECHO_REPLY_MAX + 1 - len(reply))
                    if not chunk:
                        raise errors.ProtocolError("connection closed before the address echo")
                    reply += chunk
                    seen = sp.parse_echo_reply(reply)
                    if seen is not None:
                        return local_port, seen
        finally:
            sock.close()

    async def _learn_for_punch(self, via: PeerId) -> None:
        """Right before an intro / ack: our mappings, and (behind a symmetric NAT) the port
        allocation to predict from (rate-limited; an earlier measurement is never reused:
        the punch it was made for has used its ports)."""
        self.allocation = {"tcp": None, "quic": None}
        measure = bool(self.prediction_count) and self._measurements.take(self._loop.time())
        await self.learn_udp_mapping(via, measure=measure)
        if measure:
            await self._measure_tcp_allocation(via)

    def predictions(self) -> list[str]:
        """Contacts where our next mappings will likely be (port prediction), from a fresh
        measurement; empty when there is none (no symmetric NAT, random allocation)."""
        out: list[str] = []
        now = self._loop.time()
        for scheme in ("quic", "tcp"):
            measured = self.allocation.get(scheme)
            if measured is None or not measured[1].fresh(now):
                continue
            host, allocation = measured
            for port in allocation.predict(self.prediction_count):
                out.append(str(Contact.from_address(scheme, (host, port))))
        return out

    def _listener_mux(self, family: int = socket.AF_INET) -> UdpMux | None:
        for mux in self.svc._muxes:
            if mux.family == family and not mux.closed:
                return mux
        return None

    # ================================================================ signalling

    def handle_control(self, conn: Connection, payload: dict[str, Any]) -> None:
        """A CONTROL frame from an authenticated peer."""
        peer = conn.peer_id
        if peer is None:
            return
        kind = payload.get("t")
        if kind == "fw":
            if "to" in payload:
                self._forward(conn, peer, payload)
            elif "from" in payload:
                self._forwarded(conn, payload)
        elif kind == "fwe":
            ref = payload.get("ref")
            entry = self._intro_waiters.get(ref) if isinstance(ref, int) else None
            if entry is None or entry[1] is not conn:
                # no introduction of ours is waiting for that node's answer
                self.counters["introductions_refused"] += 1
                return
            if not entry[0].done():
                entry[0].set_result({"k": "nak", "e": str(payload.get("e", "refused"))[:200]})

    def _forward(self, conn: Connection, sender: PeerId, payload: dict[str, Any]) -> None:
        """We are the node: pass ``m`` on to ``to`` if we are connected to it."""
        now = self._loop.time()
        to, inner = payload.get("to"), payload.get("m")
        ref = inner.get("id") if isinstance(inner, dict) else None

        def refuse(reason: str) -> None:
            self.counters["introductions_refused"] += 1
            conn.session.send_control({"t": "fwe", "to": to, "ref": ref, "e": reason})
            conn.control_changed()

        if not isinstance(to, bytes) or len(to) != 32 or not isinstance(inner, dict):
            refuse("malformed")
            return
        if not self.svc.config.hole_punching and not self.svc.config.relay:
            refuse("introductions disabled")
            return
        if not (self._forward_per_peer.take(sender, now) and self._forward_total.take(now)):
            refuse("rate limited")
            self.svc.abuse(conn.remote, sender, "flood")
            return
        target = self.svc._active.get(PeerId(to))
        if target is None or target.closed or PeerId(to) == sender:
            refuse("not connected to that peer")
            return
        self.counters["introductions_forwarded"] += 1
        target.session.send_control(
            {"t": "fw", "from": bytes(sender), "m": inner, "obs": conn.remote}
        )
        target.control_changed()

    def _send_via(self, node: Connection, to: PeerId, inner: dict[str, Any]) -> None:
        node.session.send_control({"t": "fw", "to": bytes(to), "m": inner})
        node.control_changed()

    def _forwarded(self, node: Connection, payload: dict[str, Any]) -> None:
        """A message another peer sent us through ``node``. What the node claims is checked
        against what we know: a forged one is dropped and counted in
        ``introductions_refused`` (it can at worst start one bounded punch, whose
        connection must still prove the claimed peer id)."""
        sender_raw, inner = payload.get("from"), payload.get("m")
        ref = inner.get("id") if isinstance(inner, dict) else None
        if (
            not isinstance(sender_raw, bytes)
            or len(sender_raw) != 32
            or not isinstance(inner, dict)
            or not isinstance(ref, int)
            or PeerId(sender_raw) in (self.svc.peer_id, node.peer_id)
        ):
            # malformed, or "from" ourselves or from the forwarding node itself: a node
            # forwards other peers' messages, never its own or ours
            self.counters["introductions_refused"] += 1
            return
        sender = PeerId(sender_raw)
        kind = inner.get("k")
        if kind in ("ack", "nak"):
            entry = self._intro_waiters.get(ref)
            if entry is None or entry[1] is not node or entry[2] != sender:
                # not an answer to an introduction we sent through that node to that peer
                self.counters["introductions_refused"] += 1
                return
            if not entry[0].done():
                entry[0].set_result({**inner, "from": sender, "obs": payload.get("obs")})
            return
        if kind == "intro":
            self.svc._spawn(self._introduced(node, sender, inner, payload.get("obs")))
        elif kind == "sync":
            punch = self._punches.get(sender)
            if punch is None or punch.outbound or punch.plan is not None or punch.via is not node:
                self.counters["introductions_refused"] += 1
                return
            self._start(punch, self._loop.time())
        else:
            self.counters["introductions_refused"] += 1

    async def _introduced(
        self, node: Connection, sender: PeerId, inner: dict[str, Any], obs: Any
    ) -> None:
        """``sender`` wants to punch to us: answer with our candidates, wait for ``sync``."""
        ref = inner["id"]
        nonce = inner.get("n")
        reason = self._refusal(sender, node)
        if reason is None and (not isinstance(nonce, bytes) or len(nonce) != pp.TOKEN_LEN):
            reason = "malformed"
        if reason is not None:
            self.counters["introductions_refused"] += 1
            self._send_via(node, sender, {"k": "nak", "id": ref, "e": reason})
            return
        assert isinstance(nonce, bytes)
        punch = _Punch(sender, os.urandom(pp.TOKEN_LEN), outbound=False, via=node)
        punch.peer_symmetric = inner.get("sym") is True
        self._set_remote(punch, inner.get("c"), obs, inner.get("p"))
        self._register(punch, nonce)
        try:
            if node.peer_id is not None:
                await self._learn_for_punch(node.peer_id)
            loopback = _is_loopback(node.remote)
            ack: dict[str, Any] = {
                "k": "ack",
                "id": ref,
                "c": self.candidates(loopback=loopback),
                "n": punch.nonce,
                "sym": self.symmetric is True,
            }
            self._advertise(punch, ack)
            self._send_via(node, sender, ack)
            async with asyncio.timeout(
                SYNC_WAIT + pp.PunchParams().rounds * pp.PunchParams().round_duration
            ):
                await punch.started.wait()
                await self.svc._wait_direct(sender)
        except TimeoutError:
            pass
        finally:
            self._unregister(punch)

    def _refusal(self, peer: PeerId, node: Connection) -> str | None:
        svc = self.svc
        if not svc.config.hole_punching:
            return "hole punching disabled"
        if svc._is_direct(peer):
            return "already connected"
        if peer in self._punches:
            return "punch already in progress"
        if len(self._punches) >= MAX_PUNCHES:
            return "too many punches in progress"
        introduced = sum(1 for p in self._punches.values() if p.via is node and not p.outbound)
        if introduced >= MAX_PUNCHES_PER_NODE:
            return "too many punches introduced by that node"
        if not svc._peer_allowed(peer, "0.0.0.0"):
            return "refused"
        now = self._loop.time()
        if not self._intro_per_node.take(node.peer_id, now):
            svc.abuse(node.remote, node.peer_id, "flood")
            return "rate limited"
        if not self._intro_per_peer.take(peer, now):
            return "rate limited"
        return None

    def _advertise(self, punch: _Punch, message: dict[str, Any]) -> None:
        """Add our predicted mappings (if any) to an intro / ack."""
        predicted = self.predictions()
        if predicted:
            message["p"] = predicted
            punch.advertised_quic = any(p.startswith("quic://") for p in predicted)
            self.counters["port_predictions"] += 1
            log.info("punch to %s: predicted %s", punch.peer.short(), predicted)

    def _set_remote(self, punch: _Punch, cands: Any, obs: Any, predicted: Any = None) -> None:
        """The other side's candidates, plus guesses from the address the node saw it at,
        and the ports it predicts for its next mappings (only on IPs it is known by)."""
        items = cands if isinstance(cands, list) else []
        tcp, quic = pp.split_candidates(pp.clean_candidates(items))
        if isinstance(obs, str):
            with contextlib.suppress(errors.ConfigError):
                seen = Contact.parse(obs)
                if seen.is_ip:
                    if seen.scheme == "quic":
                        quic.insert(0, (seen.host, seen.port))
                    for port in dict.fromkeys(p for _, p in tcp):
                        tcp.append((seen.host, port))
                    for port in dict.fromkeys(p for _, p in quic):
                        quic.append((seen.host, port))
        # LAN addresses first: on one LAN they answer first and the path stays local
        # (rather than hairpinning through the router)
        punch.remote_tcp = _lan_first(tcp)[: pp.MAX_CANDIDATES]
        punch.remote_quic = _lan_first(quic)[: pp.MAX_CANDIDATES]
        if isinstance(predicted, list | tuple) and self.prediction_count:
            hosts = {h for h, _ in punch.remote_tcp + punch.remote_quic}
            punch.predicted_tcp, punch.predicted_quic = pp.split_predicted(predicted, hosts)

    def _register(self, punch: _Punch, their_nonce: bytes) -> None:
        token = pp.shared_token(punch.nonce, their_nonce)
        punch.plan = None
        self._punches[punch.peer] = punch
        self._by_token[token] = punch
        punch.token = token

    def _unregister(self, punch: _Punch) -> None:
        if self._punches.get(punch.peer) is punch:
            del self._punches[punch.peer]
        if self._by_token.get(punch.token) is punch:
            del self._by_token[punch.token]
        if punch.plan is not None:
            punch.plan.finish()
        if punch.task is not None:
            punch.task.cancel()
        self._close_birthday_sockets(punch)

    # ================================================================ punching

    async def punch(self, peer: PeerId) -> PeerId:
        """Reach ``peer`` through a connected node: introduction, then a coordinated punch."""
        svc = self.svc
        if not svc.config.hole_punching:
            raise errors.HolePunchFailed("hole punching is disabled (hole_punching = false)")
        if peer in self._punches:
            raise errors.HolePunchFailed(f"a punch to {peer} is already in progress")
        if len(self._punches) >= MAX_PUNCHES:
            raise errors.LimitExceeded("too many punches in progress")
        nodes = svc._helpers_first(
            [(p, c) for p, c in list(svc._active.items()) if p != peer and not c.closed]
        )
        if not nodes:
            raise errors.HolePunchFailed(f"no connected node to introduce us to {peer}")
        reasons: list[str] = []
        for node in nodes[:NODES_TRIED]:
            try:
                return await self._punch_via(node, peer)
            except errors.HolePunchFailed as exc:
                reasons.append(str(exc))
                if "refused" in str(exc) or "punch failed" in str(exc):
                    break
        self.counters["punch_failures"] += 1
        raise errors.HolePunchFailed(f"cannot punch to {peer}: " + "; ".join(reasons))

    async def _punch_via(self, node: Connection, peer: PeerId) -> PeerId:
        node_id = node.peer_id
        assert node_id is not None
        punch = _Punch(peer, os.urandom(pp.TOKEN_LEN), outbound=True, via=node)
        self._punches[peer] = punch
        ref = self._next_id = (self._next_id + 1) & 0x7FFFFFFF
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._intro_waiters[ref] = (fut, node, peer)
        try:
            await self._learn_for_punch(node_id)
            cands = self.candidates(loopback=_is_loopback(node.remote))
            intro: dict[str, Any] = {
                "k": "intro",
                "id": ref,
                "c": cands,
                "n": punch.nonce,
                "sym": self.symmetric is True,
            }
            self._advertise(punch, intro)
            sent = self._loop.time()
            self._send_via(node, peer, intro)
            try:
                async with asyncio.timeout(INTRO_TIMEOUT):
                    reply = await fut
            except TimeoutError:
                raise errors.HolePunchFailed(
                    f"no answer to the introduction via {node_id.short()}"
                ) from None
            if reply.get("k") != "ack":
                raise errors.HolePunchFailed(
                    f"introduction via {node_id.short()}: {reply.get('e')}"
                )
            nonce = reply.get("n")
            if not isinstance(nonce, bytes) or len(nonce) != pp.TOKEN_LEN:
                raise errors.HolePunchFailed("malformed introduction answer")
            rtt = self._loop.time() - sent
            punch.peer_symmetric = reply.get("sym") is True
            self._set_remote(punch, reply.get("c"), reply.get("obs"), reply.get("p"))
            self._register(punch, nonce)
            self._send_via(node, peer, {"k": "sync", "id": ref})
            self._start(punch, self._loop.time() + rtt / 2)
            return await self._outcome(punch)
        finally:
            self._intro_waiters.pop(ref, None)
            self._unregister(punch)

    async def _outcome(self, punch: _Punch) -> PeerId:
        """Wait until the peer is connected (any path) or the plan expires."""
        self.counters["punch_attempts"] += 1
        assert punch.task is not None
        waiter = asyncio.ensure_future(self.svc._wait_direct(punch.peer))
        try:
            done, _ = await asyncio.wait({waiter, punch.task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        pair = self._nat_pair(punch)
        counts = self.by_nat_pair.setdefault(pair, [0, 0])
        counts[0] += 1
        if waiter in done and not waiter.cancelled() and waiter.exception() is None:
            self.counters["punch_successes"] += 1
            counts[1] += 1
            return punch.peer
        self.counters["punch_failures"] += 1
        raise errors.HolePunchFailed(f"punch failed: no path to {punch.peer} answered")

    def _nat_pair(self, punch: _Punch) -> str:
        """``"ours/theirs"``: each side's UDP mapping as far as known (``cone``,
        ``symmetric`` or ``unknown`` for ours when no node could tell)."""
        mine = {True: "symmetric", False: "cone", None: "unknown"}[self.symmetric]
        return f"{mine}/{'symmetric' if punch.peer_symmetric else 'cone'}"

    def _start(self, punch: _Punch, at: float) -> None:
        role = pp.birthday_roles(self.symmetric is True, punch.peer_symmetric)
        public = [a for a in punch.remote_quic if not pp.is_lan(a[0])]
        params = pp.PunchParams()
        punch.plan = pp.PunchPlan(
            token=punch.token,
            tcp=punch.remote_tcp,
            quic=punch.remote_quic,
            start=at,
            dialer=punch.outbound if role is None else role == "spray",
            params=params,
            predicted=punch.predicted_quic,
            predicted_tcp=punch.predicted_tcp,
        )
        # port prediction first: birthday probing only after the first round
        predicting = punch.advertised_quic if role == "prime" else bool(punch.predicted_quic)
        birthday_at = at + params.round_duration if predicting else at
        log.info(
            "punch to %s: role %s, tcp %s, quic %s, predicted %s",
            punch.peer.short(),
            role,
            punch.remote_tcp,
            punch.remote_quic,
            punch.predicted_quic + punch.predicted_tcp,
        )
        if role == "spray" and public:
            rng = SystemRandom()
            ports = rng.sample(range(1024, 65536), min(self.birthday.probes, 64512))
            punch.spray = pp.BirthdaySpray(
                punch.token, public[0][0], ports, birthday_at, rate=self.birthday.rate
            )
        elif role == "prime" and public:
            punch.prime_at = birthday_at
        punch.started.set()
        punch.task = asyncio.ensure_future(self._drive(punch))

    # ---------------------------------------------------------------- birthday probing

    def _open_birthday_sockets(self, punch: _Punch) -> None:
        """Symmetric side: many sockets, each a fresh NAT mapping that lets the other side's
        address in once it has sent there (``_prime``); the other side sprays probes at
        random ports until one lands on a mapping."""
        for _ in range(self.birthday.sockets):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind(("0.0.0.0", 0))
            except OSError:
                break  # out of descriptors or ports: probe with what we have
            punch.sockets.append(sock)
            self._loop.add_reader(sock.fileno(), self._birthday_readable, punch, sock)

    def _prime(self, punch: _Punch) -> None:
        datagram = pp.encode(pp.Kind.PROBE, punch.token)
        targets = [a for a in punch.remote_quic if not pp.is_lan(a[0])]
        for sock in punch.sockets:
            for addr in targets:
                with contextlib.suppress(OSError):
                    sock.sendto(datagram, addr)

    def _birthday_readable(self, punch: _Punch, sock: socket.socket) -> None:
        try:
            data, addr = sock.recvfrom(2048)
        except OSError:
            return
        if not pp.is_punch(data) or punch.plan is None or punch.plan.done:
            return
        try:
            dgram = pp.parse(data)
        except errors.ProtocolError:
            return
        if dgram.token != punch.token or dgram.kind is not pp.Kind.PROBE:
            return
        # this socket's mapping is the one the other side found: it now carries QUIC
        self._close_birthday_sockets(punch, keep=sock)
        mux = UdpMux(
            sock,
            acceptor=self.svc._accept_quic,
            max_connections=self.svc.config.max_connections,
            max_pending_handshakes=self.svc.config.max_pending_handshakes,
        )
        self.svc._hook(mux)
        # keep the promoted sockets bounded: close idle ones beyond MAX_PROMOTED
        idle = [m for m in self._promoted if m.connection_count == 0]
        for m in idle[: max(0, len(self._promoted) + 1 - MAX_PROMOTED)]:
            m.close()
            self._promoted.remove(m)
        self._promoted.append(mux)
        addr = (addr[0], addr[1])
        if addr not in punch.plan.working:
            punch.plan.working.append(addr)
        with contextlib.suppress(OSError):
            mux.sendto(pp.encode(pp.Kind.ACK, punch.token), addr)

    def _close_birthday_sockets(self, punch: _Punch, keep: socket.socket | None = None) -> None:
        for sock in punch.sockets:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock.fileno())
            if sock is not keep:
                sock.close()
        punch.sockets = []

    async def _drive(self, punch: _Punch) -> None:
        """Run the plan's timer until it expires or the peer is connected."""
        plan = punch.plan
        assert plan is not None
        next_prime = plan.start
        while not plan.done:
            if self.svc._is_direct(punch.peer):
                plan.finish()
                break
            times = [t for t in (plan.get_timer(),) if t is not None]
            if punch.spray is not None and (t := punch.spray.get_timer()) is not None:
                times.append(t)
            if punch.prime_at is not None:
                times.append(punch.prime_at)
            if punch.sockets:
                times.append(next_prime)
            if not times:
                break
            delay = max(0.0, min(times) - self._loop.time())
            if delay:
                await asyncio.sleep(delay)
            now = self._loop.time()
            if punch.prime_at is not None and now >= punch.prime_at:
                punch.prime_at = None
                self._open_birthday_sockets(punch)
                next_prime = now
            plan.handle_timer(now)
            if punch.sockets and now >= next_prime:
                next_prime = now + self.birthday.prime_interval
                self._prime(punch)
            if punch.spray is not None and not plan.done:
                mux = self._listener_mux()
                for probe in punch.spray.handle_timer(now):
                    if mux is not None and not mux.closed:
                        with contextlib.suppress(OSError):
                            mux.sendto(probe.datagram, probe.address)
            self._run_actions(punch, None)
        self._close_birthday_sockets(punch)

    def _run_actions(self, punch: _Punch, via: UdpMux | None) -> None:
        """Carry out the plan's actions; UDP ones from ``via`` (the socket a datagram came
        in on) or else the listener socket of the destination's address family."""
        plan = punch.plan
        if plan is None:
            return
        for action in plan.actions():
            mux = via
            if mux is None and isinstance(action, pp.SendProbe | pp.DialQuic):
                family = socket.AF_INET6 if ":" in action.address[0] else socket.AF_INET
                mux = self._listener_mux(family)
            if isinstance(action, pp.SendProbe):
                if mux is not None and not mux.closed:
                    with contextlib.suppress(OSError):
                        mux.sendto(action.datagram, action.address)
            elif isinstance(action, pp.DialQuic):
                if mux is not None and not self.svc._is_direct(punch.peer):
                    self.svc._spawn(self._dial_quic(punch, mux, action.address))
            elif isinstance(action, pp.DialTcp) and not self.svc._is_direct(punch.peer):
                self.svc._spawn(self._dial_tcp(punch, action.address))

    def punched_address(self, addr: Address, scheme: str) -> PeerId | None:
        """The peer a running punch expects a connection from at ``addr`` (inbound).

        The exact address first; else the same IP (a symmetric NAT on the other side picks a
        new port for every destination, so its SYN arrives from a port nobody announced)."""
        running = [p for p in self._punches.values() if p.plan is not None]
        for punch in running:
            assert punch.plan is not None
            known = (
                punch.remote_tcp + punch.predicted_tcp
                if scheme == "tcp"
                else punch.plan.working + punch.remote_quic + punch.predicted_quic
            )
            if addr in known:
                return punch.peer
        for punch in running:
            assert punch.plan is not None
            known = punch.remote_tcp if scheme == "tcp" else punch.plan.working + punch.remote_quic
            if any(host == addr[0] for host, _ in known):
                return punch.peer
        return None

    async def _dial_quic(self, punch: _Punch, mux: UdpMux, addr: Address) -> None:
        contact = Contact.from_address("quic", addr, punch.peer)
        with contextlib.suppress(errors.CrustError, OSError):
            await self.svc._attempt_quic(contact, mux=mux, path="punched")

    async def _dial_tcp(self, punch: _Punch, addr: Address) -> None:
        """One TCP simultaneous-open attempt from the listening port."""
        svc = self.svc
        listen = self._tcp_listen_address(addr)
        if listen is None:
            return
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setblocking(False)
            sock.bind(listen)
            plan = punch.plan
            timeout = plan.params.tcp_retry if plan is not None else 0.5
            async with asyncio.timeout(timeout):
                await self._loop.sock_connect(sock, addr)
        except (OSError, TimeoutError):
            sock.close()
            return
        if svc._is_direct(punch.peer):
            sock.close()
            return
        initiator = svc.peer_id < punch.peer
        make = svc._tcp_dialed(
            initiator=initiator, expected=punch.peer, outbound=punch.outbound, path="punched"
        )
        try:
            _, protocol = await self._loop.create_connection(lambda: TcpProtocol(make), sock=sock)
        except OSError:
            sock.close()
            return
        conn = await protocol.made
        if conn is not None and initiator:
            with contextlib.suppress(errors.CrustError):
                await svc._keep_attempt(conn)

    def _tcp_listen_address(self, dest: Address) -> tuple[str, int] | None:
        want_v6 = ":" in dest[0]
        for server in self.svc._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                if (sock.family == socket.AF_INET6) == want_v6:
                    return host, port
        return None

    def inbound_role(self, remote: str, scheme: str) -> tuple[PeerId, bool, bool] | None:
        """For an inbound connection from an address a punch expects:
        (peer, are we the handshake initiator, did we ask for the punch)."""
        try:
            c = Contact.parse(remote)
        except errors.ConfigError:
            return None
        peer = self.punched_address((c.host, c.port), scheme)
        if peer is None:
            return None
        return peer, self.svc.peer_id < peer, self._punches[peer].outbound

    # ================================================================ relay -> direct

    def relayed(self, peer: PeerId) -> None:
        """A relayed connection to ``peer`` is up: keep trying to go direct in the background
        (the introduction rides on the node's connections; the punched connection then
        replaces the relayed one without losing, duplicating or reordering a message)."""
        if peer not in self._upgrading and self.svc.config.hole_punching:
            self._upgrading.add(peer)
            self.svc._spawn(self._upgrade_loop(peer))

    async def _upgrade_loop(self, peer: PeerId) -> None:
        try:
            for delay in UPGRADE_DELAYS:
                await asyncio.sleep(delay)
                conn = self.svc._active.get(peer)
                if conn is None or conn.path != "relayed":
                    return
                with contextlib.suppress(errors.CrustError):
                    await self.punch(peer)
                    return
        finally:
            self._upgrading.discard(peer)

    # ================================================================ out-of-band info

    async def prepare(self) -> pp.ConnectionInfo:
        nodes = [p for p, c in self.svc._active.items() if not c.closed]
        for node in nodes[:NODES_TRIED]:
            await self._learn_for_punch(node)
            if self._external.get("quic") or self.symmetric or self.allocation["tcp"]:
                break
        public = pp.PublicConnectionInfo(
            self.svc.peer_id,
            tuple(self.candidates(loopback=not self._external_ips)),
            os.urandom(pp.TOKEN_LEN),
            tuple(self.predictions()),
        )
        if public.predicted:
            self.counters["port_predictions"] += 1
        return pp.ConnectionInfo(public, self._loop.time())

    async def connect_with_info(
        self, ours: pp.ConnectionInfo, theirs: pp.PublicConnectionInfo
    ) -> PeerId:
        peer = theirs.peer_id
        if peer == self.svc.peer_id:
            raise errors.InvalidArgument("that connection info is our own")
        if self.svc._is_direct(peer):
            return peer
        if not self.svc.config.hole_punching:
            raise errors.HolePunchFailed("hole punching is disabled (hole_punching = false)")
        if peer in self._punches:
            raise errors.HolePunchFailed(f"a punch to {peer} is already in progress")
        punch = _Punch(peer, ours.public.nonce, outbound=self.svc.peer_id < peer)
        punch.advertised_quic = any(p.startswith("quic://") for p in ours.public.predicted)
        self._set_remote(punch, list(theirs.candidates), None, list(theirs.predicted))
        self._register(punch, theirs.nonce)
        try:
            self._start(punch, self._loop.time())
            return await self._outcome(punch)
        finally:
            self._unregister(punch)

    def close(self) -> None:
        for punch in list(self._punches.values()):
            self._unregister(punch)
        for mux in self._promoted:
            mux.close()
        self._promoted.clear()
        for fut in [f for f, _ in self._echo_waiters.values()] + [
            f for f, _, _ in self._intro_waiters.values()
        ]:
            if not fut.done():
                fut.cancel()


def _lan_first(addrs: list[Address]) -> list[Address]:
    return sorted(dict.fromkeys(addrs), key=lambda a: not pp.is_lan(a[0]))


def _same_address(a: Address, b: Address) -> bool:
    try:
        return a[1] == b[1] and ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return False


def _own(addr: Address, mux: UdpMux) -> bool:
    """``addr`` is this very socket (a probe we sent to one of our own addresses)."""
    host, port = mux.local_address[0], mux.local_address[1]
    return addr[1] == port and (addr[0] == host or addr[0] in expand_wildcard(host))


def _is_loopback(contact: str) -> bool:
    with contextlib.suppress(errors.ConfigError, ValueError):
        return ipaddress.ip_address(Contact.parse(contact).host).is_loopback
    return False
