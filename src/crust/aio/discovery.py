"""LAN discovery (the signed beacon on ``service_discovery_port``) and gossip of known peers.

:class:`LanDiscovery` owns one IPv4 UDP socket bound to the discovery port (``SO_REUSEADDR``,
``SO_REUSEPORT`` so several nodes on one host share it, ``SO_BROADCAST``) and drives a
:class:`crust.proto.beacon.Beacon`: every datagram it produces goes to the broadcast address
of each IPv4 interface of the host (ifaddr). One ``loop.call_at`` timer; the clock is read
once per callback. It is only created when ``Config.service_discovery`` is true.

:class:`Gossip` sends our directly connected peers' contacts to each connected peer (on connect
and every ``interval`` with jitter) and feeds what peers tell us into the service's known
contacts (see :mod:`crust.proto.gossip` for the bounds).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ifaddr

from crust.contact import Contact
from crust.errors import ConfigError, ProtocolError
from crust.identity import Identity, PeerId
from crust.proto import gossip
from crust.proto.beacon import ANNOUNCE_INTERVAL, Beacon

log = logging.getLogger("crust.discovery")

MAX_BROADCASTS = 16


def broadcast_addresses() -> list[str]:
    """The IPv4 broadcast address of every non-loopback interface (at most 16)."""
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv6 or not isinstance(ip.ip, str):
                continue
            try:
                net = ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}").network
            except ValueError:
                continue
            if net.is_loopback or net.prefixlen >= 31 or net.is_link_local:
                continue
            text = str(net.broadcast_address)
            if text not in out:
                out.append(text)
    return out[:MAX_BROADCASTS]


def lan_contacts(contacts: Sequence[str]) -> list[str]:
    """Our contacts worth announcing on a LAN: IP literals, not loopback or link-local,
    without the peer id pin (the beacon carries the peer id)."""
    out: list[str] = []
    for text in contacts:
        c = Contact.parse(text)
        ip = ipaddress.ip_address(c.host)
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified:
            continue
        plain = str(c.with_peer(None))
        if plain not in out:
            out.append(plain)
    return out


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: LanDiscovery) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.datagram_received(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("discovery socket error: %s", exc)


class LanDiscovery:
    """The beacon on the LAN. ``on_peer(peer, contacts)`` is called for every new peer and
    whenever a peer's contacts change (contacts pinned to the peer id)."""

    def __init__(
        self,
        identity: Identity,
        network_name: str,
        port: int,
        contacts: Sequence[str],
        on_peer: Callable[[PeerId, tuple[str, ...]], None],
        *,
        interval: float = ANNOUNCE_INTERVAL,
        destinations: Callable[[], list[str]] = broadcast_addresses,
    ) -> None:
        self.port = port
        self.on_peer = on_peer
        self.destinations = destinations
        self.beacon = Beacon(
            identity, network_name, lan_contacts(contacts), os.urandom, interval=interval
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.bind(("0.0.0.0", self.port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"cannot bind the discovery port {self.port}: {exc.strerror}",
                "service_discovery_port",
            ) from exc
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        self._transport = transport
        self.beacon.start(time.time())
        self._flush()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def set_contacts(self, contacts: Sequence[str]) -> None:
        if self._transport is None:
            return
        self.beacon.set_contacts(lan_contacts(contacts), time.time())
        self._flush()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.closed:
            return
        self.beacon.receive_datagram(data, addr, time.time())
        self._flush()

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.beacon.handle_timer(time.time())
        self._flush()

    def _flush(self) -> None:
        while (ev := self.beacon.next_event()) is not None:
            pinned = tuple(str(Contact.parse(c).with_peer(ev.peer)) for c in ev.contacts)
            self.on_peer(ev.peer, pinned)
        transport = self._transport
        if transport is None:
            return
        out = self.beacon.datagrams_to_send(time.time())
        if out:
            dests = self.destinations()
            for data in out:
                for host in dests:
                    try:
                        transport.sendto(data, (host, self.port))
                    except OSError as exc:
                        log.debug("beacon to %s: %s", host, exc)
        self._arm()

    def _arm(self) -> None:
        when = self.beacon.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def counters(self) -> dict[str, int]:
        return self.beacon.counters.as_dict()

    def peers(self) -> dict[PeerId, tuple[str, ...]]:
        """The LAN peers in the table, with contacts pinned to their peer ids."""
        return {
            peer: tuple(str(Contact.parse(c).with_peer(peer)) for c in contacts)
            for peer, contacts in self.beacon.peers().items()
        }


GOSSIP_INTERVAL = 120.0
PUSH_DELAY = gossip.MIN_GAP + 0.5
"""A new direct peer is told to the others this long after it connected (coalesced)."""


class Gossip:
    """Tell connected peers whom we are directly connected to; learn the same from them.

    ``direct()`` returns the peers we gossip about (those we dialled directly) with their
    contacts; ``connected()`` every connected peer (the recipients); ``send(peer, payload)``
    sends a CONTROL payload to a connected peer; ``learn(peer, contacts)`` records contacts
    learned second-hand.
    """

    def __init__(
        self,
        self_id: PeerId,
        direct: Callable[[], Mapping[PeerId, Sequence[str]]],
        recipients: Callable[[], Sequence[PeerId]],
        send: Callable[[PeerId, dict[str, Any]], None],
        learn: Callable[[PeerId, tuple[str, ...]], None],
        *,
        interval: float = GOSSIP_INTERVAL,
    ) -> None:
        self.self_id = self_id
        self.direct = direct
        self.recipients = recipients
        self.send = send
        self.learn = learn
        self.interval = interval
        self.limiter = gossip.GossipLimiter()
        self._outgoing = gossip.GossipLimiter()
        """Our own sends, so that we never trip a peer's rate limit."""
        self._changed = asyncio.Event()
        self.sent = 0
        self.received = 0
        self.learned = 0
        self.rejected = 0
        self.rate_limited = 0

    def payload_for(self, peer: PeerId) -> dict[str, Any] | None:
        entries = {p: c for p, c in self.direct().items() if p != peer and p != self.self_id}
        if not entries:
            return None
        return gossip.encode(entries)

    def connected(self, peer: PeerId) -> None:
        """A connection to ``peer`` was kept: tell it our direct peers, and soon tell the
        others about it (one coalesced push)."""
        self._send_to(peer)
        if peer in self.direct() and len(self.recipients()) > 1:
            self._changed.set()

    def _send_to(self, peer: PeerId) -> None:
        payload = self.payload_for(peer)
        if payload is None:
            return
        if not self._outgoing.allow(peer, asyncio.get_running_loop().time()):
            return
        self.send(peer, payload)
        self.sent += 1

    def tick(self) -> None:
        """A round: every connected peer gets our current list."""
        for peer in list(self.recipients()):
            self._send_to(peer)

    def received_from(self, peer: PeerId, payload: Mapping[str, Any], now: float) -> None:
        self.received += 1
        if not self.limiter.allow(peer, now):
            self.rate_limited += 1
            return
        try:
            entries = gossip.parse(payload)
        except ProtocolError as exc:
            self.rejected += 1
            log.debug("gossip from %s rejected: %s", peer, exc)
            return
        for other, contacts in entries.items():
            if other in (self.self_id, peer):
                continue
            self.learn(other, contacts)
            self.learned += 1

    async def run(self) -> None:
        """Rounds every ``interval`` (±25 % jitter), and a push shortly after a new direct
        peer connected (after the receivers' rate-limit gap), until cancelled."""
        while True:
            try:
                async with asyncio.timeout(self.interval * random.uniform(0.75, 1.25)):
                    await self._changed.wait()
                await asyncio.sleep(PUSH_DELAY)
            except TimeoutError:
                pass
            self._changed.clear()
            self.tick()

    def counters(self) -> dict[str, int]:
        return {
            "gossip_sent": self.sent,
            "gossip_received": self.received,
            "gossip_learned": self.learned,
            "gossip_rejected": self.rejected,
            "gossip_rate_limited": self.rate_limited,
        }
