"""The public :class:`Service`: listeners, connection racing, one connection per peer, events."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from crust import errors
from crust.aio.connection import Connection, RateLimit, closed_reason
from crust.aio.discovery import Gossip, LanDiscovery
from crust.aio.eventqueue import EventQueue, EventStream
from crust.aio.keylog import KeyLog
from crust.aio.portmap import GrantedMapping, MappingRequest, PortMapper, is_private_external
from crust.aio.quic import QuicLink, QuicSettings
from crust.aio.stun import StunDispatcher
from crust.aio.tcp import TcpListener, TcpProtocol, sock_contact
from crust.aio.udp_mux import DROPPED_STATS, Address, UdpMux
from crust.bootstrap import Bootstrapper
from crust.ca import TrustStore
from crust.config import Config, parse_acl_entry
from crust.contact import Contact, expand_wildcard, format_address
from crust.events import (
    AbuseDetected,
    ConnectFailed,
    Event,
    LanPeerDiscovered,
    ListenerFailed,
    ListenerStarted,
    MessageReceived,
    PeerConnected,
    PeerLost,
    PortMappingGranted,
)
from crust.identity import Identity, PeerId
from crust.proto.punch import ConnectionInfo, PublicConnectionInfo
from crust.proto.relay import RelayLimits
from crust.proto.session import (
    Accepted,
    CloseCode,
    Closed,
    ControlReceived,
    HandshakeCompleted,
    PongReceived,
    Selected,
    Session,
    SessionEvent,
    SessionParams,
    SignatureRejected,
    State,
)
from crust.proto.stun import StunResponder
from crust.reachability import Reachability
from crust.relay import Relay
from crust.traversal import BucketMap, Traversal
from crust.types import ConnectionDetails, EndpointPair, Statistics

log = logging.getLogger("crust")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_KNOWN_PEERS = 4096
MAX_CONTACTS_PER_PEER = 16
HANDOVER_TIMEOUT = 10.0
"""How long the greater peer id waits for the other side to close a replaced relayed path."""
FLOOD_PENALTY = 60.0
"""Seconds a peer cut off for sending beyond ``max_peer_bytes_per_second`` is refused: its
peer id, and new connections from its address (a flooder could otherwise come back with a
fresh identity for a fresh burst; the address's established connections stay up)."""
MAX_PENALTIES = 4096
FAILED_HANDSHAKES = (10.0, 100.0)
"""Inbound handshakes per second (and burst) that may fail (garbage, a reset, a stall) from
one address; beyond that the address is refused for :data:`FAILURE_PENALTY` seconds, so a
storm of half-open connections cannot keep the node building and tearing down sessions
(honest peers' handshakes do not fail: they are never counted)."""
FAILURE_PENALTY = 10.0
PENALIZED = "address cut off for a while (flood or failed handshakes)"
JUNK_LIMIT = (200.0, 1000.0)
"""Refused datagrams per second (and burst) one source IP may send to a UDP socket of ours
before the rest of its unrouted datagrams are dropped unread (``UdpMux.junk_limit``)."""


class _Counters:
    """Mutable counters; :meth:`Service.statistics` snapshots them."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.dropped: dict[int, int] = {}
        self.connects_outbound = 0
        self.connects_inbound = 0
        self.connect_failures = 0
        self.handshake_failures = 0
        self.heartbeat_timeouts = 0
        self.protocol_errors = 0
        self.refused = 0
        self.blacklisted = 0
        self.duplicates_closed = 0
        self.by_path: dict[str, int] = {}
        self.signed_sent = 0
        self.signed_received = 0
        self.signature_failures = 0
        self.abuse: dict[str, int] = {}
        self.limits_hit = 0
        # per transport: [bytes sent, bytes received, messages sent, messages received]
        self.by_transport: dict[str, list[int]] = {}

    def absorb(self, session: Session, transport: str) -> None:
        t = self.by_transport.setdefault(transport, [0, 0, 0, 0])
        t[0] += session.bytes_sent
        t[1] += session.bytes_received
        t[2] += session.messages_sent
        t[3] += session.messages_received
        self.bytes_sent += session.bytes_sent
        self.bytes_received += session.bytes_received
        self.messages_sent += session.messages_sent
        self.messages_received += session.messages_received
        for prio, n in session.dropped.items():
            self.dropped[prio] = self.dropped.get(prio, 0) + n
        self.signed_sent += session.signed_sent
        self.signed_received += session.signed_received
        self.signature_failures += session.signature_failures


class Service:
    """A crust endpoint: ``async with Service(config, identity=ident) as svc: ...``.

    Every background job belongs to the service's TaskGroup; leaving the ``async with``
    block (or :meth:`aclose`) closes every connection and listener.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        identity: Identity | None = None,
        quic_trust: TrustStore | None = None,
    ) -> None:
        """``quic_trust``: the roots QUIC's public-ca mode verifies against instead of the
        system's (see crust.ca.TrustStore)."""
        self.config = config if config is not None else Config()
        self._quic_trust = quic_trust
        self.identity = identity if identity is not None else Identity.generate()
        self.peer_id: PeerId = self.identity.peer_id
        cfg = self.config
        self._params = SessionParams(
            identity=self.identity,
            network_name=cfg.network_name,
            max_message_size=cfg.max_message_size,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_timeout=cfg.heartbeat_timeout,
            handshake_timeout=cfg.handshake_timeout,
            send_queue_size=cfg.send_queue_size,
        )
        self._events = EventQueue(cfg.event_queue_size, self._pause_reading, self._resume_reading)
        self._conns: set[Connection] = set()
        self._conn_hosts: dict[Connection, str] = {}
        self._handshaking: set[Connection] = set()
        """Connections whose handshake is still running (max_pending_handshakes)."""
        self._per_host: dict[str, int] = {}
        """Connections by remote host (max_connections_per_ip is checked on every accept:
        counting them by parsing every connection's address made a storm quadratic)."""
        self._active: dict[PeerId, Connection] = {}
        self._ready: dict[Connection, asyncio.Future[PeerId]] = {}
        self._peer_waiters: dict[PeerId, list[asyncio.Future[None]]] = {}
        self._pongs: dict[Connection, asyncio.Event] = {}
        self._replaced: set[Connection] = set()
        self._handover: dict[Connection, list[MessageReceived]] = {}
        self._log_paths: dict[PeerId, str] = {}  # peer -> "transport path", for log lines
        self._draining: set[Connection] = set()
        """Replaced (relayed) connections still delivering what was in flight."""
        """Connections whose messages wait for the connection they replace to drain."""
        self._servers: list[TcpListener] = []
        self._muxes: list[UdpMux] = []
        """QUIC listeners: one UDP socket each, also used to dial out."""
        self._client_muxes: dict[str, UdpMux] = {}
        """Client-only QUIC sockets (by bind host) when no listener fits a destination."""
        self._quic_settings: QuicSettings | None = None
        self._keylog: KeyLog | None = None
        self._endpoints: list[EndpointPair] = []
        self._portmapper: PortMapper | None = None
        self._mapped: dict[tuple[str, int], GrantedMapping] = {}
        """Port mappings granted on the gateway, by (tcp/udp, internal port)."""
        self._known: dict[PeerId, list[str]] = {}
        self._counters = _Counters()
        self._black_peers: set[PeerId] = set()
        self._black_nets: list[IpNetwork] = []
        self._white_peers: set[PeerId] = set()
        self._white_nets: list[IpNetwork] = []
        for item in cfg.blacklist:
            self._add_acl(item, self._black_peers, self._black_nets, "blacklist")
        for item in cfg.whitelist:
            self._add_acl(item, self._white_peers, self._white_nets, "whitelist")
        self._traversal: Traversal | None = None
        self._relay: Relay | None = None
        self._reachability: Reachability | None = None
        self._peer_roles: dict[PeerId, str] = {}
        self._abuse_reports = BucketMap(rate=0.1, burst=1.0)
        """What each connected peer says it is in its hello (``node`` once proven)."""
        self._penalties: dict[PeerId | str, float] = {}
        self._drops_timer: asyncio.TimerHandle | None = None
        """Peer ids and hosts refused until the given time (flooding, failed handshakes)."""
        self._failures = BucketMap(*FAILED_HANDSHAKES, limit=MAX_PENALTIES)
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._bootstrapper = Bootstrapper(
            cfg, self.peer_id, connect=self.connect, emit=self._emit, spawn=self._spawn
        )
        self._running = False
        self._closed = False
        self._discovery: LanDiscovery | None = None
        self._gossip = Gossip(
            self.peer_id, self._direct_peers, self.peers, self._send_control, self._learn
        )

    # ================================================================= lifetime

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        if self._running or self._closed:
            raise errors.ServiceClosed("a service starts once")
        if self.config.keylog_file is not None:
            self._keylog = KeyLog.open(self.config.keylog_file)
            self._params.keylog = self._keylog.write_noise
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._running = True
        self._traversal = Traversal(self)
        cfg = self.config
        self._relay = Relay(
            self,
            RelayLimits(
                max_circuits=cfg.relay_max_circuits,
                max_circuits_per_peer=cfg.relay_max_circuits_per_peer,
                max_bytes=cfg.relay_max_bytes,
                max_seconds=cfg.relay_max_seconds,
                rate=float(cfg.relay_rate),
            ),
        )
        self._reachability = Reachability(self)
        for text in self.config.listen:
            contact = Contact.parse(text, field="listen")
            if contact.scheme == "tcp":
                await self._listen_tcp(contact)
            else:
                self._listen_quic(contact)
        if self.config.port_mapping:
            await self._start_port_mapping()
        self._params.hello_extra["contacts"] = self.contacts()[:MAX_CONTACTS_PER_PEER]
        await self._start_discovery()
        await self._bootstrapper.start()

    async def aclose(self) -> None:
        """Close every connection (cleanly, briefly), every listener and every task."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        if self._drops_timer is not None:
            self._drops_timer.cancel()
        for server in self._servers:
            server.close()
        if self._traversal is not None:
            self._traversal.close()
        if self._discovery is not None:
            self._discovery.close()
        # relayed connections first: their clean close travels over the connections to
        # their nodes, which must still be open
        await self._close_connections([c for c in self._conns if c.path == "relayed"], 0.5)
        if self._relay is not None:
            self._relay.close()
        await self._close_connections(list(self._conns), 1.0)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._portmapper is not None:
            await self._portmapper.aclose()  # deletes the mappings (bounded in time)
        for mux in [*self._muxes, *self._client_muxes.values()]:
            mux.close()
        await self._bootstrapper.aclose()
        for task in list(self._tasks):
            task.cancel()
        if self._tg is not None:
            await self._tg.__aexit__(None, None, None)
        for conn in list(self._ready):
            self._fail_ready(conn, errors.ServiceClosed("service closed"))
        self._events.close()
        if self._keylog is not None:
            self._keylog.close()

    async def _close_connections(self, conns: list[Connection], timeout: float) -> None:
        """Close ``conns`` cleanly (queued messages first), aborting what is still open after
        ``timeout`` seconds."""
        for conn in conns:
            conn.close(CloseCode.SHUTDOWN, "service closing")
        waiters = [self._closed_future(c) for c in conns if not c.closed]
        if waiters:
            _, pending = await asyncio.wait(waiters, timeout=timeout)
            for fut in pending:
                fut.cancel()
        for conn in conns:
            if not conn.closed and conn.transport is not None:
                conn.transport.abort()

    def _closed_future(self, conn: Connection) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_: Connection) -> None:
            if not fut.done():
                fut.set_result(None)

        conn.on_close.append(done)
        return fut

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background job in the service's TaskGroup; a failure is logged, never
        propagated into the user's task."""
        if self._tg is None or not self._running:
            coro.close()
            return

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("crust background job failed")

        task = self._tg.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check_running(self) -> None:
        if not self._running:
            raise errors.ServiceClosed("the service is not running")

    # ================================================================= listeners

    async def _listen_tcp(self, contact: Contact) -> None:
        try:
            server = TcpListener.bind(
                contact.host,
                contact.port,
                self._make_inbound,
                self._refuse_inbound,
                self._spawn,
                backlog=1024,
            )
        except OSError as exc:
            err = errors.ConfigError(f"cannot listen on {contact}: {exc.strerror}", "listen")
            err.__cause__ = exc
            self._emit(ListenerFailed(str(contact), err))
            return
        self._servers.append(server)
        for sock in server.sockets:
            local = str(Contact.from_address("tcp", sock.getsockname()))
            self._endpoints.append(EndpointPair("tcp", local, None))
            self._emit(ListenerStarted(local))

    def _quic(self) -> QuicSettings:
        """The TLS side of QUIC (quic_certificates mode; peer identity is always proven by
        the Noise handshake inside the stream). ConfigError names a bad field."""
        if self._quic_settings is None:
            self._quic_settings = QuicSettings.from_config(
                self.config,
                self.identity,
                trust=self._quic_trust,
                secrets_log=self._keylog.file if self._keylog is not None else None,
            )
        return self._quic_settings

    def _listen_quic(self, contact: Contact) -> None:
        try:
            self._quic()
            mux = UdpMux.bind(
                contact.host,
                contact.port,
                acceptor=self._accept_quic,
                max_connections=self.config.max_connections,
                max_pending_handshakes=self.config.max_pending_handshakes,
            )
        except errors.ConfigError as exc:
            self._emit(ListenerFailed(str(contact), exc))
            return
        except OSError as exc:
            err = errors.ConfigError(f"cannot listen on {contact}: {exc.strerror}", "listen")
            err.__cause__ = exc
            self._emit(ListenerFailed(str(contact), err))
            return
        self._hook(mux)
        self._muxes.append(mux)
        local = str(Contact.from_address("quic", mux.local_address))
        self._endpoints.append(EndpointPair("quic", local, None))
        self._emit(ListenerStarted(local))

    def _accept_quic(
        self, mux: UdpMux, addr: Address, original_dcid: bytes, retry_scid: bytes | None
    ) -> QuicLink | None:
        """A new validated QUIC client (after Retry): refuse early or create its link."""
        reason = self._inbound_refusal(addr[0])
        if reason == PENALIZED:
            self._counters.refused += 1
            return None  # no TLS work for an address we cut off: its Initials are dropped
        link = QuicLink.accept(
            mux,
            addr,
            original_dcid,
            retry_scid,
            self._quic(),
            on_ready=self._quic_inbound_ready,
            on_failed=self._quic_inbound_failed,
            datagram_size=self.config.quic_max_datagram_size,
        )
        if reason is not None:
            # the address is validated (Retry): tell it at once (CONNECTION_REFUSED)
            self._counters.refused += 1
            log.debug("refused QUIC from %s: %s", addr, reason)
            link.refusal = reason
        return link

    def _quic_inbound_ready(self, link: QuicLink) -> None:
        reason = self._inbound_refusal(link.remote_address[0])
        if reason is not None:
            self._counters.refused += 1
            link.abort()
            return
        punched = self._traversal.inbound_role(link.remote, "quic") if self._traversal else None
        conn = self._new_connection(
            link.remote,
            link.local,
            initiator=False,
            expected=link.certified_peer,  # CA modes: Noise must prove the certificate's id
            transport_name="quic",
            outbound=punched[2] if punched else False,
            path="punched" if punched else "direct",
        )
        self._mark_mapped(conn)
        link.attach(conn)

    def _quic_inbound_failed(self, link: QuicLink, err: BaseException) -> None:
        if isinstance(err, errors.HandshakeError):
            self._counters.handshake_failures += 1

    def _dial_mux(self, contact: Contact) -> UdpMux:
        """The UDP socket to dial ``contact`` from: a listener's (same family, able to reach
        it) or a client-only one, created on first use and closed with the service."""
        target = ipaddress.ip_address(contact.host)
        for mux in self._muxes:
            bound = ipaddress.ip_address(mux.local_address[0])
            if bound.version != target.version or not mux.can_dial():
                continue
            if bound.is_unspecified or bound.is_loopback == target.is_loopback:
                return mux
        if target.is_loopback:
            host = str(ipaddress.ip_address("::1" if target.version == 6 else "127.0.0.1"))
        else:
            host = "::" if target.version == 6 else "0.0.0.0"
        client = self._client_muxes.get(host)
        if client is None or client.closed:
            try:
                client = UdpMux.bind(
                    host, 0, acceptor=None, max_connections=self.config.max_connections
                )
            except OSError as exc:
                raise errors.ConnectError(f"{contact}: cannot open a UDP socket: {exc}") from exc
            self._hook(client)
            self._client_muxes[host] = client
        if not client.can_dial():
            self._counters.limits_hit += 1
            raise errors.LimitExceeded("max_connections reached")
        return client

    def _hook(self, mux: UdpMux) -> None:
        """Non-QUIC datagrams on a UDP socket: STUN (a Binding responder, so every crust node
        is also a STUN server on its QUIC port, and our own client transactions), then
        punching and address echo (traversal)."""
        StunDispatcher.for_mux(mux).responder = StunResponder(allow_response_port=False)
        mux.junk_limit = JUNK_LIMIT
        mux.on_abuse = lambda addr, kind: self.abuse(format_address("quic", addr), None, kind)
        if self.config.keylog_file is not None:
            # debugging with Wireshark: a capture on this host sees a GSO send as one
            # oversized packet, so send datagram by datagram while the key log is on
            mux.sender.gso = False
        traversal = self._traversal
        if traversal is not None:
            mux.on_other_datagram = lambda data, addr: traversal.on_datagram(mux, data, addr)

    # ================================================================= port mapping

    async def _start_port_mapping(self) -> None:
        """Map every IPv4 listener that is not on loopback (TCP as tcp, QUIC as udp)."""
        requests: list[MappingRequest] = []
        for ep in self._endpoints:
            c = Contact.parse(ep.local)
            if c.family_v6 or ipaddress.ip_address(c.host).is_loopback:
                continue
            requests.append(MappingRequest("tcp" if ep.protocol == "tcp" else "udp", c.port))
        if not requests:
            return
        self._portmapper = PortMapper(
            requests, on_granted=self._on_port_mapped, on_lost=self._on_port_unmapped
        )
        await self._portmapper.__aenter__()

    def _on_port_mapped(self, m: GrantedMapping) -> None:
        scheme = "tcp" if m.protocol == "tcp" else "quic"
        self._mapped[(m.protocol, m.internal[1])] = m
        external = str(Contact.from_address(scheme, m.external))
        for i, ep in enumerate(self._endpoints):
            c = Contact.parse(ep.local)
            if ep.protocol == scheme and c.port == m.internal[1] and not c.family_v6:
                self._endpoints[i] = EndpointPair(ep.protocol, ep.local, external)
        self._params.hello_extra["contacts"] = self.contacts()[:MAX_CONTACTS_PER_PEER]
        if self._discovery is not None:
            self._discovery.set_contacts(self.contacts())
        internal = str(Contact.from_address(scheme, m.internal))
        self._emit(PortMappingGranted(m.method, internal, external, m.lifetime))
        if self._reachability is not None:
            self._reachability.endpoints_changed()

    def _on_port_unmapped(self, m: GrantedMapping, error: errors.PortMappingError) -> None:
        """A mapping could not be renewed: stop announcing its external contact."""
        log.info("port mapping of %s lost: %s", m.internal, error)
        self._mapped.pop((m.protocol, m.internal[1]), None)
        scheme = "tcp" if m.protocol == "tcp" else "quic"
        for i, ep in enumerate(self._endpoints):
            if ep.protocol == scheme and Contact.parse(ep.local).port == m.internal[1]:
                self._endpoints[i] = EndpointPair(ep.protocol, ep.local, None)
        self._params.hello_extra["contacts"] = self.contacts()[:MAX_CONTACTS_PER_PEER]

    def _mark_mapped(self, conn: Connection) -> None:
        """An inbound connection from a public address to a mapped port came in through the
        gateway's mapping: its path is "mapped"."""
        if not self._mapped:
            return
        proto = "tcp" if conn.transport_name == "tcp" else "udp"
        local, remote = Contact.parse(conn.local), Contact.parse(conn.remote)
        if (proto, local.port) in self._mapped and not is_private_external(remote.host):
            conn.path = "mapped"

    @property
    def role(self) -> str:
        """``"node"`` once a dial-back from another address proved that others can reach our
        listeners (or ``Config.role`` says so), else ``"client"``."""
        if self._reachability is None:
            return self.config.role if self.config.role != "auto" else "client"
        return self._reachability.role

    def _helpers_first(self, peers: list[tuple[PeerId, Connection]]) -> list[Connection]:
        """Connected peers to ask for introductions and relays: proven nodes first."""
        ranked = sorted(peers, key=lambda pc: self._peer_roles.get(pc[0]) != "node")
        return [c for _, c in ranked]

    def endpoints(self) -> list[EndpointPair]:
        """Every listener with its local and (when known) external contact."""
        return list(self._endpoints)

    def contacts(self) -> list[str]:
        """Contacts others can dial (wildcards expanded to this host's addresses), each pinned
        to our peer id."""
        out: list[str] = []
        for ep in self._endpoints:
            for c in (ep.external, ep.local):
                if c is None:
                    continue
                contact = Contact.parse(c)
                for host in expand_wildcard(contact.host):
                    text = str(Contact(contact.scheme, host, contact.port, self.peer_id))
                    if text not in out:
                        out.append(text)
        return out

    # ================================================================= connecting

    async def bootstrap(self) -> PeerId:
        """Reach the network: the bootstrap cache's nodes (newest first), then the
        hard-coded contacts, several at a time. Returns the first node reached (its
        connection stays up) and emits ``BootstrapConnected``; else emits ``BootstrapFailed``
        and raises :class:`crust.errors.BootstrapFailed` listing every attempt's error."""
        self._check_running()
        return await self._bootstrapper.run()

    async def connect(self, target: str | PeerId | Sequence[str]) -> PeerId:
        """Connect to a contact, to several contacts of one peer (raced), or to a peer id.

        Returns the peer id once the single connection to that peer is up.
        """
        self._check_running()
        try:
            contacts, want = self._targets(target)
            if want is not None and want in self._active:
                return want
            async with asyncio.timeout(self.config.connect_timeout):
                if isinstance(target, PeerId) or (isinstance(target, str) and "://" not in target):
                    assert want is not None
                    return await self._reach(want, contacts)
                return await self._race(contacts)
        except TimeoutError as exc:
            err: BaseException = errors.ConnectTimeout(f"connect to {target} timed out")
            err.__cause__ = exc
        except errors.CrustError as exc:
            err = exc
        self._counters.connect_failures += 1
        self._emit(ConnectFailed(_target_text(target), err))
        raise err

    def _targets(self, target: str | PeerId | Sequence[str]) -> tuple[list[Contact], PeerId | None]:
        if isinstance(target, str) and "://" not in target:
            target = PeerId.parse(target)
        if isinstance(target, PeerId):
            if target in self._active:
                return [], target
            known = self._known.get(target, [])
            return [Contact.parse(c).with_peer(target) for c in known], target
        items = [target] if isinstance(target, str) else list(target)
        if not items:
            raise errors.ConfigError("no contact given", "target")
        contacts = [Contact.parse(c, field="target") for c in items]
        pins = {c.peer_id for c in contacts if c.peer_id is not None}
        if len(pins) > 1:
            raise errors.ConfigError("contacts name different peer ids", "target")
        pin = pins.pop() if pins else None
        return [c.with_peer(pin) for c in contacts], pin

    async def _reach(self, peer: PeerId, contacts: list[Contact]) -> PeerId:
        """A bare peer id: its known contacts directly and, once those failed or after
        ``punch_delay``, a hole punch introduced by a connected node; the first one wins."""
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[PeerId]] = set()
        errs: list[BaseException] = []
        if contacts:
            pending.add(asyncio.ensure_future(self._race(contacts)))
        traversal = self._traversal if self.config.hole_punching else None
        punch_at = loop.time() + self.config.punch_delay
        punching = False
        try:
            while True:
                if (
                    traversal is not None
                    and not punching
                    and (not pending or loop.time() >= punch_at)
                ):
                    punching = True
                    pending.add(asyncio.ensure_future(traversal.punch(peer)))
                if not pending:
                    break
                timeout = None
                if traversal is not None and not punching:
                    timeout = max(0.0, punch_at - loop.time())
                won, _, pending = await _first_success(pending, timeout, errs)
                if won is not None:
                    return won
        finally:
            await _cancel_all(pending)
        try:
            return await self._relayed(peer)
        except errors.ConnectError as exc:
            errs.append(exc)
        if len(errs) == 1:
            raise errs[0]
        if any(isinstance(e, errors.HolePunchFailed) for e in errs):
            raise errors.HolePunchFailed(f"cannot reach {peer}", errs)
        raise errors.ConnectError(f"cannot reach {peer}", errs)

    async def _relayed(self, peer: PeerId) -> PeerId:
        """The last resort: a circuit through a connected node (up to 3 are asked)."""
        assert self._relay is not None
        nodes = self._helpers_first(
            [(p, c) for p, c in list(self._active.items()) if p != peer and not c.closed]
        )
        if not nodes:
            raise errors.ConnectError(f"no known contact for {peer} and no connected node to ask")
        errs: list[BaseException] = []
        for node in nodes[:3]:
            try:
                return await self._relay.connect_via(node, peer)
            except errors.CrustError as exc:
                errs.append(exc)
        raise errors.ConnectError(f"no relay to {peer}", errs)

    async def _race(self, contacts: list[Contact]) -> PeerId:
        """Happy Eyeballs: start attempts staggered (IPv6 first, families interleaved; TCP
        gets a ``tcp_head_start`` over QUIC), first one to be established wins, the others are
        cancelled. An attempt that fails starts the next one at once."""
        contacts = await self._resolve(contacts)
        if not contacts:
            raise errors.ConnectError("no usable contact")
        if len(contacts) == 1:
            return await self._attempt(contacts[0])
        schedule = self._schedule(contacts)
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending: set[asyncio.Task[PeerId]] = set()
        errs: list[BaseException] = []
        start_next = False
        try:
            while schedule or pending:
                elapsed = loop.time() - start
                while schedule and (start_next or not pending or schedule[0][0] <= elapsed):
                    start_next = False
                    pending.add(asyncio.ensure_future(self._attempt(schedule.pop(0)[1])))
                timeout = max(0.0, schedule[0][0] - elapsed) if schedule else None
                won, done, pending = await _first_success(pending, timeout, errs)
                if won is not None:
                    return won
                start_next = bool(done)
        finally:
            await _cancel_all(pending)
        if all(type(e) is type(errs[0]) for e in errs):
            raise errs[0]
        raise errors.ConnectError("every contact failed", errs)

    def _schedule(self, contacts: list[Contact]) -> list[tuple[float, Contact]]:
        """When each attempt starts (seconds after the first): TCP contacts every
        ``connect_stagger``; QUIC contacts likewise but ``tcp_head_start`` later when there is
        TCP to race against."""
        stagger = self.config.connect_stagger
        tcp = [c for c in contacts if c.scheme == "tcp"]
        quic = [c for c in contacts if c.scheme != "tcp"]
        head = self.config.tcp_head_start if tcp else 0.0
        out = [(i * stagger, c) for i, c in enumerate(tcp)]
        out += [(head + i * stagger, c) for i, c in enumerate(quic)]
        out.sort(key=lambda item: item[0])
        return out

    async def _resolve(self, contacts: list[Contact]) -> list[Contact]:
        out: list[Contact] = []
        loop = asyncio.get_running_loop()
        for c in contacts:
            if c.port == 0:
                raise errors.ConfigError(f"{c}: cannot connect to port 0", "target")
            if c.is_ip:
                out.append(c)
                continue
            kind = socket.SOCK_STREAM if c.scheme == "tcp" else socket.SOCK_DGRAM
            try:
                infos = await loop.getaddrinfo(c.host, c.port, type=kind)
            except OSError as exc:
                raise errors.ConnectError(f"cannot resolve {c.host}: {exc}") from exc
            for info in infos:
                ip = Contact.from_address(c.scheme, (str(info[4][0]), c.port), c.peer_id)
                alt = Contact(ip.scheme, ip.host, ip.port, ip.peer_id, name=c.host)
                if alt not in out:
                    out.append(alt)
        v6 = [c for c in out if c.family_v6]
        v4 = [c for c in out if not c.family_v6]
        mixed: list[Contact] = []
        for i in range(max(len(v6), len(v4))):
            mixed.extend(x[i] for x in (v6, v4) if i < len(x))
        return mixed

    async def _attempt(self, contact: Contact) -> PeerId:
        """Dial one contact and wait until the connection is kept (or proves that another
        connection to the same peer is)."""
        self._refuse_address(contact.host)
        if contact.scheme == "quic":
            return await self._attempt_quic(contact)
        loop = asyncio.get_running_loop()
        protocol: TcpProtocol | None = None
        make = self._tcp_dialed(initiator=True, expected=contact.peer_id)
        try:
            _, protocol = await loop.create_connection(
                lambda: TcpProtocol(make), contact.host, contact.port
            )
        except OSError as exc:
            raise errors.ConnectError(f"{contact}: {exc.strerror or exc}") from exc
        conn = await protocol.made
        if conn is None:
            raise errors.ConnectError(f"{contact}: connection closed at once")
        return await self._keep_attempt(conn)

    def _tcp_dialed(
        self,
        *,
        initiator: bool,
        expected: PeerId | None,
        outbound: bool | None = None,
        path: str = "direct",
    ) -> Callable[[asyncio.Transport], Connection]:
        """The connection factory of a TCP socket we dialed (directly or punching)."""

        def make(transport: asyncio.Transport) -> Connection:
            return self._new_connection(
                sock_contact(transport, "peername"),
                sock_contact(transport, "sockname"),
                initiator=initiator,
                expected=expected,
                transport_name="tcp",
                outbound=outbound,
                path=path,
            )

        return make

    async def _attempt_quic(
        self, contact: Contact, *, mux: UdpMux | None = None, path: str = "direct"
    ) -> PeerId:
        """Dial a QUIC contact from a shared UDP socket; crust's session runs on its first
        bidirectional stream once the QUIC handshake (ALPN = network) is done."""
        link = QuicLink.dial(
            mux if mux is not None else self._dial_mux(contact),
            contact.address,
            self._quic(),
            pin=contact.peer_id,
            server_name=contact.name,
            datagram_size=self.config.quic_max_datagram_size,
        )
        try:
            await link.ready
        except BaseException as exc:
            link.abort()
            if isinstance(exc, errors.HandshakeError | errors.ConnectError):
                raise
            if isinstance(exc, errors.CrustError):
                raise errors.ConnectError(f"{contact}: {exc}") from exc
            raise
        conn = self._new_connection(
            link.remote,
            link.local,
            initiator=True,
            expected=link.certified_peer or contact.peer_id,  # the link checked they agree
            transport_name="quic",
            path=path,
        )
        link.attach(conn)
        return await self._keep_attempt(conn)

    async def _keep_attempt(self, conn: Connection) -> PeerId:
        fut = self._ready[conn]
        try:
            return await self._await_kept(conn, fut)
        except BaseException:
            if not conn.selected:
                conn.abort(CloseCode.NORMAL, "attempt abandoned")
            raise
        finally:
            self._ready.pop(conn, None)

    async def _await_kept(self, conn: Connection, fut: asyncio.Future[PeerId]) -> PeerId:
        try:
            return await asyncio.shield(fut)
        except _Duplicate:
            # the greater peer id kept another connection to the same peer: wait for it
            peer = conn.peer_id
            assert peer is not None
            await self._wait_peer(peer)
            return peer

    async def _wait_direct(self, peer: PeerId) -> None:
        """Until ``peer`` is connected by anything but a relay."""
        while True:
            conn = self._active.get(peer)
            if conn is not None and conn.path != "relayed":
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._peer_waiters.setdefault(peer, []).append(fut)
            try:
                await fut
            finally:
                waiters = self._peer_waiters.get(peer)
                if waiters is not None and fut in waiters:
                    waiters.remove(fut)

    def _is_direct(self, peer: PeerId) -> bool:
        conn = self._active.get(peer)
        return conn is not None and conn.path != "relayed"

    async def _wait_peer(self, peer: PeerId) -> None:
        if peer in self._active:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._peer_waiters.setdefault(peer, []).append(fut)
        try:
            await fut
        finally:
            waiters = self._peer_waiters.get(peer)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
                if not waiters:
                    del self._peer_waiters[peer]

    async def prepare_connection_info(self) -> ConnectionInfo:
        """Our half of an out-of-band rendezvous: send ``info.public.to_bytes()`` to the other
        peer by any channel, receive theirs, then both call :meth:`connect_with_info`."""
        self._check_running()
        assert self._traversal is not None
        return await self._traversal.prepare()

    async def connect_with_info(
        self, info: ConnectionInfo, their_info: PublicConnectionInfo | bytes
    ) -> PeerId:
        """Punch to the peer whose public info we received (both sides call this at about
        the same time); returns its peer id once the single connection is up."""
        self._check_running()
        assert self._traversal is not None
        theirs = (
            PublicConnectionInfo.from_bytes(their_info)
            if isinstance(their_info, bytes | bytearray | memoryview)
            else their_info
        )
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                return await self._traversal.connect_with_info(info, theirs)
        except TimeoutError as exc:
            err: BaseException = errors.ConnectTimeout(f"punch to {theirs.peer_id} timed out")
            err.__cause__ = exc
        except errors.CrustError as exc:
            err = exc
        self._counters.connect_failures += 1
        self._emit(ConnectFailed(str(theirs.peer_id), err))
        raise err

    # ================================================================= connections

    def _refuse_inbound(self, host: str) -> bool:
        """A TCP connection from ``host`` was just accepted: refuse it before anything is
        built for it? (blacklist, limits, a flooder's address)"""
        reason = self._inbound_refusal(host)
        if reason is None:
            return False
        self._counters.refused += 1
        log.debug("refused inbound from %s: %s", host, reason)
        return True

    def _make_inbound(self, transport: asyncio.Transport) -> Connection | None:
        peername = transport.get_extra_info("peername")
        if not peername:
            return None  # reset before we got to it: nobody to talk to
        host = peername[0].partition("%")[0]
        reason = self._inbound_refusal(host)
        remote = sock_contact(transport, "peername")
        if reason is not None:
            self._counters.refused += 1
            log.debug("refused inbound from %s: %s", remote, reason)
            return None
        punched = self._traversal.inbound_role(remote, "tcp") if self._traversal else None
        if punched is not None:
            # a TCP simultaneous open that met our listener: roles by peer id, as on the
            # other side's socket
            peer, initiator, asked = punched
            return self._new_connection(
                remote,
                sock_contact(transport, "sockname"),
                initiator=initiator,
                expected=peer,
                transport_name="tcp",
                outbound=asked,
                path="punched",
            )
        conn = self._new_connection(
            remote,
            sock_contact(transport, "sockname"),
            initiator=False,
            expected=None,
            transport_name="tcp",
        )
        self._mark_mapped(conn)
        return conn

    def _inbound_refusal(self, host: str) -> str | None:
        if not self._running:
            return "service closing"
        if self._address_blocked(host):
            self._counters.blacklisted += 1
            return "address blacklisted"
        if self._penalties and self._penalized(host):
            self._counters.limits_hit += 1
            return PENALIZED
        reason = self._limit_refusal(host)
        if reason is not None:
            self._counters.limits_hit += 1
            if reason == "max_connections_per_ip reached":
                # one address holding the most it may: the upper layer may want to drop it
                self.abuse(host, None, "limit")
        return reason

    def abuse(self, address: str, peer: PeerId | None, kind: str) -> None:
        """Report abuse (``AbuseDetected``: garbage, stalled handshakes, limits, floods…), at
        most once per address and kind every 10 s, so a flood of bad connections cannot
        turn into a flood of events (which would fill the event queue and pause reading)."""
        key = (address.rpartition(":")[0] if "://" in address else address, kind)
        if self._abuse_reports.take(key, asyncio.get_running_loop().time()):
            self._emit(AbuseDetected(address, peer, kind))

    def over_limit(self, conn: Connection) -> None:
        """``conn`` sent more than ``max_peer_bytes_per_second`` (plus the burst) allows:
        cut it off at once, report it, and refuse its peer id and new connections from its
        address for :data:`FLOOD_PENALTY`."""
        peer = conn.peer_id
        self._counters.limits_hit += 1
        self.abuse(conn.remote, peer, "flood")
        # the peer id, and the address it came from (a flooder with fresh identities would
        # otherwise get a new burst per handshake) — not a relay node's address
        host = self._conn_hosts.get(conn) if conn.path != "relayed" else None
        for key in (peer, host):
            if key is not None:
                self._penalize(key, FLOOD_PENALTY)
        conn.abort(CloseCode.LIMIT, "over max_peer_bytes_per_second")

    def _penalize(self, key: PeerId | str, seconds: float) -> None:
        if key not in self._penalties and len(self._penalties) >= MAX_PENALTIES:
            del self._penalties[next(iter(self._penalties))]
        self._penalties[key] = asyncio.get_running_loop().time() + seconds
        if isinstance(key, str):
            self._sync_kernel_drops()

    def _sync_kernel_drops(self) -> None:
        """Hand the penalised addresses to the TCP listeners' kernel filters (their SYNs are
        dropped before any accept: a storm from them costs the event loop nothing), and
        come back when the first penalty ends to lift it."""
        if self._drops_timer is not None:
            self._drops_timer.cancel()
            self._drops_timer = None
        if not self._running:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        hosts = {k: t for k, t in self._penalties.items() if isinstance(k, str) and t > now}
        for server in self._servers:
            server.drop_from(sorted(hosts, key=hosts.__getitem__, reverse=True))
        if hosts:
            self._drops_timer = loop.call_at(min(hosts.values()), self._sync_kernel_drops)

    def _penalized(self, key: PeerId | str) -> bool:
        until = self._penalties.get(key)
        if until is None:
            return False
        if until > asyncio.get_running_loop().time():
            return True
        del self._penalties[key]
        return False

    def _limit_refusal(self, host: str) -> str | None:
        cfg = self.config
        if len(self._conns) >= cfg.max_connections:
            return "max_connections reached"
        if len(self._handshaking) >= cfg.max_pending_handshakes:
            return "max_pending_handshakes reached"
        if self._per_host.get(host, 0) >= cfg.max_connections_per_ip:
            return "max_connections_per_ip reached"
        return None

    def _new_connection(
        self,
        remote: str,
        local: str,
        *,
        initiator: bool,
        expected: PeerId | None,
        transport_name: str,
        outbound: bool | None = None,
        path: str = "direct",
    ) -> Connection:
        loop = asyncio.get_running_loop()
        session = Session(
            self._params,
            initiator=initiator,
            now=loop.time(),
            expected_peer=expected,
            observed=remote,
        )
        conn = Connection(
            self,
            session,
            transport_name=transport_name,
            outbound=initiator if outbound is None else outbound,
            remote=remote,
            local=local,
            path=path,
        )
        cfg = self.config
        conn.rx_limit = RateLimit(
            cfg.max_peer_bytes_per_second, cfg.max_peer_burst_bytes, loop.time()
        )
        self._conns.add(conn)
        self._handshaking.add(conn)
        host = Contact.parse(remote).host
        self._conn_hosts[conn] = host
        self._per_host[host] = self._per_host.get(host, 0) + 1
        if initiator:
            self._ready[conn] = loop.create_future()
        conn.on_close.append(self._on_conn_closed)
        return conn

    def deliver(self, event: MessageReceived, conn: Connection) -> None:
        held = self._handover.get(conn)
        if held is not None:
            held.append(event)  # the replaced connection is still draining: keep order
        elif conn.selected or conn in self._draining:
            self._events.put(event)
        # else: a connection never chosen (a losing duplicate) or disconnected by us

    def _start_handover(self, old: Connection, new: Connection) -> None:
        """``new`` replaces the open connection ``old`` to the same peer (a direct path found
        while relayed): ``old`` closes cleanly — its queued messages still go out, then CLOSE —
        and messages arriving on ``new`` wait until ``old`` is closed, so the application sees
        every message once and in order across the switch."""
        self._handover[new] = []

        def release(_: Connection) -> None:
            self._draining.discard(old)
            held = self._handover.pop(new, None)
            for event in held or ():
                self._events.put(event)

        def forget(_: Connection) -> None:
            self._handover.pop(new, None)

        if old.closed:
            release(old)
            return
        self._draining.add(old)
        old.on_close.append(release)
        new.on_close.append(forget)
        self._replaced.add(old)
        peer = new.peer_id
        assert peer is not None
        if self.peer_id < peer:
            # the lesser id switches last (on SELECT): it closes the old path, and the greater
            # side answers with whatever it still had queued there — no gap on either side
            old.close(CloseCode.REPLACED, "replaced by a direct connection")
        else:
            asyncio.get_running_loop().call_later(
                HANDOVER_TIMEOUT, old.close, CloseCode.REPLACED, "handover timed out"
            )

    def session_event(self, conn: Connection, event: SessionEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            self._handshaking.discard(conn)
            self._on_handshake(conn, event)
        elif isinstance(event, Selected):
            if conn.peer_id is not None and conn.peer_id < self.peer_id:
                log.warning("%r: SELECT from the lesser peer id ignored", conn)
            else:
                self._activate(conn)
        elif isinstance(event, Accepted):
            conn.peer_accepted = True
            if conn.policy_ok and conn.peer_id is not None and self.peer_id > conn.peer_id:
                self._decide(conn)
        elif isinstance(event, PongReceived):
            pong = self._pongs.get(conn)
            if pong is not None:
                pong.set()
        elif isinstance(event, Closed):
            self._on_session_closed(conn, event)
        elif isinstance(event, ControlReceived):
            self._on_control(conn, event)
        elif isinstance(event, SignatureRejected):
            log.warning("%r: signed message %d rejected (%s)", conn, event.sequence, event.reason)
            self._emit(AbuseDetected(conn.remote, conn.peer_id, "forged-signature"))

    def _on_control(self, conn: Connection, event: ControlReceived) -> None:
        if not conn.policy_ok:
            return
        if event.payload.get("t") == "gp":  # gossip of known peers (crust.aio.discovery)
            if conn.peer_id is not None and self._active.get(conn.peer_id) is conn:
                loop = asyncio.get_running_loop()
                self._gossip.received_from(conn.peer_id, event.payload, loop.time())
            return
        if self._relay is not None and self._relay.handle_control(conn, event.payload):
            return
        if self._reachability is not None and self._reachability.handle_control(
            conn, event.payload
        ):
            return
        if self._traversal is not None:
            self._traversal.handle_control(conn, event.payload)

    def _on_handshake(self, conn: Connection, event: HandshakeCompleted) -> None:
        peer = event.peer_id
        if peer == self.peer_id:
            self._fail_ready(conn, errors.ConnectError("connected to ourselves"))
            conn.close(CloseCode.SELF, "same identity")
            return
        if not self._peer_allowed(peer, Contact.parse(conn.remote).host):
            self._counters.blacklisted += 1
            self._fail_ready(conn, errors.Blacklisted(f"peer {peer} is blacklisted"))
            conn.close(CloseCode.BLACKLISTED, "")
            return
        log.debug("%r: handshake completed with peer %s", conn, peer.short())
        self._remember(peer, event.hello.get("contacts", []))
        role = event.hello.get("role")
        if isinstance(role, str) and role in ("node", "client"):
            if peer not in self._peer_roles and len(self._peer_roles) >= MAX_KNOWN_PEERS:
                del self._peer_roles[next(iter(self._peer_roles))]
            self._peer_roles[peer] = role
        if self._traversal is not None:
            self._traversal.observe(conn, event.hello.get("observed"))
        conn.policy_ok = True
        if self.peer_id < peer:
            # the greater peer id chooses: tell it we accept, then wait for its SELECT
            # or CLOSE(DUPLICATE)
            conn.session.accept()
            conn.control_changed()
        elif conn.peer_accepted:
            self._decide(conn)
        # else: decide once the lesser peer id has accepted us (it may refuse us)

    def _decide(self, conn: Connection) -> None:
        """We have the greater peer id: keep this connection unless a live one exists."""
        peer = conn.peer_id
        assert peer is not None
        old = self._active.get(peer)
        if old is None or old.closed or _upgrade(old, conn):
            self._select(conn)
            return
        self._spawn(self._probe_then_decide(conn, old))

    async def _probe_then_decide(self, conn: Connection, old: Connection) -> None:
        """A second connection to an already connected peer: if the old one still answers,
        the new one is a duplicate; otherwise the old one is dead and the new one replaces it."""
        pong = self._pongs.setdefault(old, asyncio.Event())
        pong.clear()
        old.session.ping(asyncio.get_running_loop().time())
        old.control_changed()
        try:
            async with asyncio.timeout(self.config.duplicate_probe_timeout):
                await pong.wait()
            alive = not old.closed
        except TimeoutError:
            alive = False
        finally:
            self._pongs.pop(old, None)
        if conn.closed:
            return
        peer = conn.peer_id
        assert peer is not None
        current = self._active.get(peer)
        if alive or (current is not None and current is not old and not current.closed):
            self._counters.duplicates_closed += 1
            self._fail_ready(conn, _Duplicate("already connected through another connection"))
            conn.close(CloseCode.DUPLICATE, "already connected")
        else:
            self._select(conn)

    def _select(self, conn: Connection) -> None:
        conn.session.select()
        conn.control_changed()
        self._activate(conn)

    def _activate(self, conn: Connection) -> None:
        peer = conn.peer_id
        assert peer is not None
        if conn.closed or conn.session.state is not State.ESTABLISHED:
            return
        old = self._active.get(peer)
        if old is conn:
            return
        if old is not None and _upgrade(old, conn):
            self._start_handover(old, conn)
        elif old is not None:
            self._replaced.add(old)
            old.close(CloseCode.REPLACED, "replaced by a newer connection")
        self._active[peer] = conn
        conn.selected = True
        c = self._counters
        if conn.outbound:
            c.connects_outbound += 1
        else:
            c.connects_inbound += 1
        c.by_path[conn.path] = c.by_path.get(conn.path, 0) + 1
        self._emit(PeerConnected(peer, conn.transport_name, conn.path, conn.outbound, conn.remote))
        if conn.outbound and conn.path == "direct" and self._reachability is not None:
            self._reachability.connected(conn)
        if conn.path == "relayed" and conn.outbound and self._traversal is not None:
            self._traversal.relayed(peer)
        self._bootstrapper.connection_kept(peer, conn.remote, conn.path, conn.outbound)
        self._gossip.connected(peer)
        fut = self._ready.get(conn)
        if fut is not None and not fut.done():
            fut.set_result(peer)
        for waiter in self._peer_waiters.pop(peer, []):
            if not waiter.done():
                waiter.set_result(None)

    def _on_session_closed(self, conn: Connection, event: Closed) -> None:
        peer = conn.peer_id
        err = event.error
        c = self._counters
        if isinstance(err, errors.HandshakeError):
            c.handshake_failures += 1
        elif isinstance(err, errors.ProtocolError):
            c.protocol_errors += 1
        if isinstance(err, errors.ProtocolError) and not isinstance(
            err, errors.NetworkMismatch | errors.VersionMismatch
        ):
            self.abuse(conn.remote, peer, _abuse_kind(err))
            host = self._conn_hosts.get(conn)
            if (
                conn in self._handshaking
                and not conn.outbound
                and conn.path != "relayed"
                and host is not None
                and not self._failures.take(host, asyncio.get_running_loop().time())
            ):
                self._penalize(host, FAILURE_PENALTY)
                self.abuse(host, None, "handshake")
        if event.code == CloseCode.TIMEOUT and conn.session.peer_id is not None and err is None:
            c.heartbeat_timeouts += 1
        if peer is not None and self._active.get(peer) is conn:
            del self._active[peer]
            if (
                conn.path == "relayed"
                and event.code == CloseCode.REPLACED
                and event.by_peer
                and any(
                    c.peer_id == peer and c is not conn and not c.closed and c.policy_ok
                    for c in self._conns
                )
            ):
                # the other side moved to a direct connection whose SELECT is on its way
                self._replaced.add(conn)
            if conn not in self._replaced:
                self._emit(PeerLost(peer, closed_reason(event)))
        self._fail_ready(conn, _ready_error(event))

    def _fail_ready(self, conn: Connection, err: BaseException) -> None:
        fut = self._ready.get(conn)
        if fut is not None and not fut.done():
            fut.set_exception(err)
            fut.exception()  # retrieved: the attempt may already be cancelled

    def _on_conn_closed(self, conn: Connection) -> None:
        if self._relay is not None:
            self._relay.connection_closed(conn)
        self._conns.discard(conn)
        self._handshaking.discard(conn)
        host = self._conn_hosts.pop(conn, None)
        if host is not None:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]
        self._replaced.discard(conn)
        self._counters.absorb(conn.session, conn.transport_name)
        peer = conn.peer_id
        if peer is not None and self._active.get(peer) is conn:
            del self._active[peer]
            self._emit(PeerLost(peer, "connection lost"))
        self._fail_ready(conn, errors.ConnectionClosed("connection closed"))

    def _remember(self, peer: PeerId, contacts: Sequence[str]) -> None:
        good: list[str] = []
        for text in contacts[:MAX_CONTACTS_PER_PEER]:
            try:
                c = Contact.parse(text)
            except errors.ConfigError:
                continue
            if c.is_ip and c.port:
                good.append(str(c.with_peer(None)))
        if not good:
            return
        if peer not in self._known and len(self._known) >= MAX_KNOWN_PEERS:
            del self._known[next(iter(self._known))]
        self._known[peer] = good

    # ================================================================= LAN discovery, gossip

    async def _start_discovery(self) -> None:
        """The LAN beacon (only with ``service_discovery``) and the periodic gossip rounds."""
        self._spawn(self._gossip.run())
        if not self.config.service_discovery:
            return
        disc = LanDiscovery(
            self.identity,
            self.config.network_name,
            self.config.service_discovery_port,
            self.contacts(),
            self._on_lan_peer,
        )
        try:
            await disc.start()
        except errors.ConfigError as exc:
            log.warning("LAN discovery off: %s", exc)
            return
        self._discovery = disc
        self._bootstrapper.lan_peers = disc.peers

    def _on_lan_peer(self, peer: PeerId, contacts: tuple[str, ...]) -> None:
        self._remember(peer, contacts)
        self._emit(LanPeerDiscovered(peer, contacts))

    def _direct_peers(self) -> dict[PeerId, list[str]]:
        """What we gossip: peers we dialled directly (their reachability is proven), with
        the contact we reached and the others they announced on that same host."""
        out: dict[PeerId, list[str]] = {}
        for peer, conn in self._active.items():
            if not conn.outbound or conn.path != "direct" or conn.closed:
                continue
            remote = Contact.parse(conn.remote)
            good = [str(remote.with_peer(None))]
            for text in self._known.get(peer, []):
                if Contact.parse(text).host == remote.host and text not in good:
                    good.append(text)
            out[peer] = good[:MAX_CONTACTS_PER_PEER]
        return out

    def _send_control(self, peer: PeerId, payload: dict[str, Any]) -> None:
        conn = self._active.get(peer)
        if conn is not None and not conn.closed:
            conn.session.send_control(payload)
            conn.control_changed()

    def _learn(self, peer: PeerId, contacts: tuple[str, ...]) -> None:
        """Contacts learned by gossip never replace those of a peer we are connected to."""
        if peer not in self._active:
            self._remember(peer, contacts)

    # ================================================================= messages

    async def send(
        self,
        peer: PeerId,
        data: bytes | bytearray | memoryview,
        priority: int = 0,
        *,
        signed: bool = False,
    ) -> None:
        """Queue ``data`` for ``peer``: reliable and ordered per peer and priority.

        Priority 0 is the most urgent (0..255). When the peer's queue is full, priorities 0
        and 1 wait for room; lower priorities drop the oldest queued messages of their own or
        lower urgency (counted in :meth:`statistics`).

        ``signed=True`` attaches an Ed25519 signature of our identity over the message and
        its context; the receiver verifies it and gets a proof (``MessageReceived.proof``).
        """
        if type(priority) is not int or not 0 <= priority <= 255:
            raise errors.InvalidArgument(f"priority must be an int 0..255, not {priority!r}")
        if not isinstance(data, bytes):
            if not isinstance(data, bytearray | memoryview):
                raise errors.InvalidArgument(f"data must be bytes, not {type(data).__name__}")
            data = bytes(data)
        if len(data) > self.config.max_message_size:
            raise errors.MessageTooLarge(
                f"{len(data)} bytes > max_message_size {self.config.max_message_size}"
            )
        conn = self._active.get(peer)
        if conn is None:
            raise errors.NotConnected(f"not connected to {peer}")
        if priority <= 1:
            while conn.queue_full():
                await conn.wait_writable()
                conn = self._active.get(peer)
                if conn is None:
                    raise errors.NotConnected(f"connection to {peer} lost while sending")
        conn.send(data, priority, signed)

    async def disconnect(self, peer: PeerId) -> None:
        """Close the connection to ``peer`` cleanly (queued messages are sent first)."""
        conn = self._active.pop(peer, None)
        if conn is None:
            raise errors.NotConnected(f"not connected to {peer}")
        self._emit(PeerLost(peer, "disconnected locally"))
        closed = self._closed_future(conn)
        conn.close(CloseCode.NORMAL, "disconnected")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.handshake_timeout):
                await closed

    def is_connected(self, peer: PeerId) -> bool:
        return peer in self._active

    def peers(self) -> list[PeerId]:
        return list(self._active)

    def connection(self, peer: PeerId) -> ConnectionDetails:
        conn = self._active.get(peer)
        if conn is None:
            raise errors.NotConnected(f"not connected to {peer}")
        return ConnectionDetails(
            transport=conn.transport_name,
            path=conn.path,
            remote=conn.remote,
            local=conn.local,
            outbound=conn.outbound,
            rtt=conn.session.rtt,
        )

    def events(self) -> EventStream:
        """``async for event in svc.events()``: every event, in order, until the service closes.

        Events are buffered; when more than ``event_queue_size`` wait, crust stops reading
        from the network until the consumer catches up (no event is ever dropped).
        """
        return EventStream(self._events)

    def _emit(self, event: Event) -> None:
        if isinstance(event, PeerConnected):
            self._log_paths[event.peer] = f"{event.transport} {event.path}"
            log.info(
                "peer %s connected: %s %s, %s %s",
                event.peer.short(),
                event.transport,
                event.path,
                "outbound to" if event.outbound else "inbound from",
                event.remote,
            )
        elif isinstance(event, PeerLost):
            path = self._log_paths.pop(event.peer, "?")
            log.info("peer %s lost (%s): %s", event.peer.short(), path, event.reason)
        elif isinstance(event, AbuseDetected):
            self._counters.abuse[event.kind] = self._counters.abuse.get(event.kind, 0) + 1
            who = event.peer.short() if event.peer is not None else "?"
            log.info("abuse from %s (peer %s): %s", event.address, who, event.kind)
        self._events.put(event)

    def _pause_reading(self) -> None:
        for conn in self._conns:
            conn.pause_reading()

    def _resume_reading(self) -> None:
        for conn in self._conns:
            conn.resume_reading()

    # ================================================================= policy

    def blacklist(self, item: PeerId | str) -> None:
        """Refuse a peer id, an IP address or a CIDR from now on and drop its connections."""
        key = str(item) if isinstance(item, PeerId) else item
        self._add_acl(key, self._black_peers, self._black_nets, "blacklist")
        for conn in list(self._conns):
            host = Contact.parse(conn.remote).host
            if (conn.peer_id is not None and conn.peer_id in self._black_peers) or self._in_nets(
                host, self._black_nets
            ):
                peer = conn.peer_id
                if peer is not None and self._active.get(peer) is conn:
                    del self._active[peer]
                    self._emit(PeerLost(peer, "blacklisted"))
                conn.close(CloseCode.BLACKLISTED, "")

    @staticmethod
    def _add_acl(item: str, peers: set[PeerId], nets: list[IpNetwork], field: str) -> None:
        entry = parse_acl_entry(item, field)
        if isinstance(entry, PeerId):
            peers.add(entry)
        else:
            nets.append(entry)

    @staticmethod
    def _in_nets(host: str, nets: list[IpNetwork]) -> bool:
        if not nets:
            return False
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in nets)

    def _address_blocked(self, host: str) -> bool:
        if self._in_nets(host, self._black_nets):
            return True
        # with a whitelist of addresses only, unknown addresses never get a handshake
        return (
            bool(self._white_nets)
            and not self._white_peers
            and not self._in_nets(host, self._white_nets)
        )

    def _refuse_address(self, host: str) -> None:
        if self._address_blocked(host):
            raise errors.Blacklisted(f"address {host} is blacklisted")

    def _peer_allowed(self, peer: PeerId, host: str) -> bool:
        if peer in self._black_peers or self._in_nets(host, self._black_nets):
            return False
        if self._penalties and self._penalized(peer):
            return False
        if self._white_peers or self._white_nets:
            return peer in self._white_peers or self._in_nets(host, self._white_nets)
        return True

    def statistics(self) -> Statistics:
        c = self._counters
        live = [conn.session for conn in self._conns]
        dropped = dict(c.dropped)
        for s in live:
            for prio, n in s.dropped.items():
                dropped[prio] = dropped.get(prio, 0) + n
        by_transport = {name: list(v) for name, v in c.by_transport.items()}
        for conn in self._conns:
            t = by_transport.setdefault(conn.transport_name, [0, 0, 0, 0])
            s = conn.session
            t[0] += s.bytes_sent
            t[1] += s.bytes_received
            t[2] += s.messages_sent
            t[3] += s.messages_received
        return Statistics(
            peers=len(self._active),
            connections=len(self._conns),
            bytes_sent=c.bytes_sent + sum(s.bytes_sent for s in live),
            bytes_received=c.bytes_received + sum(s.bytes_received for s in live),
            messages_sent=c.messages_sent + sum(s.messages_sent for s in live),
            messages_received=c.messages_received + sum(s.messages_received for s in live),
            messages_dropped=sum(dropped.values()),
            dropped_by_priority=dropped,
            connects_outbound=c.connects_outbound,
            connects_inbound=c.connects_inbound,
            connect_failures=c.connect_failures,
            handshake_failures=c.handshake_failures,
            heartbeat_timeouts=c.heartbeat_timeouts,
            protocol_errors=c.protocol_errors,
            refused=c.refused,
            blacklisted=c.blacklisted,
            duplicates_closed=c.duplicates_closed,
            connects_by_path=dict(c.by_path),
            signed_messages_sent=c.signed_sent + sum(s.signed_sent for s in live),
            signed_messages_received=c.signed_received + sum(s.signed_received for s in live),
            signature_failures=c.signature_failures + sum(s.signature_failures for s in live),
            bytes_sent_by_transport={k: v[0] for k, v in by_transport.items()},
            bytes_received_by_transport={k: v[1] for k, v in by_transport.items()},
            messages_sent_by_transport={k: v[2] for k, v in by_transport.items()},
            messages_received_by_transport={k: v[3] for k, v in by_transport.items()},
            abuse_events=sum(c.abuse.values()),
            abuse_by_kind=dict(c.abuse),
            limits_hit=c.limits_hit,
            datagrams_dropped=sum(
                mux.stats[name]
                for mux in [*self._muxes, *self._client_muxes.values()]
                for name in DROPPED_STATS
            ),
            **self._traversal_counters(),
            punches_by_nat_pair={
                k: (v[0], v[1])
                for k, v in (self._traversal.by_nat_pair if self._traversal else {}).items()
            },
            discovery={
                **(self._discovery.counters() if self._discovery is not None else {}),
                **self._gossip.counters(),
            },
        )

    def _traversal_counters(self) -> dict[str, int]:
        if self._traversal is None:
            return {}
        t = self._traversal.counters
        names = (
            "punch_attempts",
            "punch_successes",
            "punch_failures",
            "introductions_forwarded",
            "introductions_refused",
            "port_predictions",
            "punch_datagrams_dropped",
        )
        out = {name: t[name] for name in names}
        if self._relay is not None:
            out.update(self._relay.counters)
        return out


# --------------------------------------------------------------------------- helpers


class _Duplicate(errors.Refused):
    """The greater peer id closed this connection because it keeps another one."""


def _abuse_kind(err: errors.ProtocolError) -> str:
    """The ``AbuseDetected.kind`` of a connection that failed with ``err``."""
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, errors.OversizedInput):
        return "oversized"
    if isinstance(err, errors.PeerAuthenticationError):
        return "impersonation"
    return "garbage"


def _ready_error(event: Closed) -> BaseException:
    if event.error is not None:
        return event.error
    code = event.code
    if code == CloseCode.DUPLICATE:
        return _Duplicate("the peer kept another connection (duplicate)")
    if code == CloseCode.BLACKLISTED:
        return errors.Blacklisted("refused: blacklisted")
    if code == CloseCode.SELF:
        return errors.ConnectError("connected to ourselves")
    return errors.ConnectionClosed(f"closed before it was established ({closed_reason(event)})")


async def _first_success(
    pending: set[asyncio.Task[PeerId]], timeout: float | None, errs: list[BaseException]
) -> tuple[PeerId | None, set[asyncio.Task[PeerId]], set[asyncio.Task[PeerId]]]:
    """Wait for the first attempt to finish: (its peer id if it succeeded, the finished
    attempts, the pending ones); failures are appended to ``errs``."""
    done, pending = await asyncio.wait(
        pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    for task in done:
        exc = task.exception()
        if exc is None:
            return task.result(), done, pending
        errs.append(exc)
    return None, done, pending


async def _cancel_all(pending: set[asyncio.Task[PeerId]]) -> None:
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def _upgrade(old: Connection, new: Connection) -> bool:
    """A direct (or punched, or mapped) connection replaces a relayed one."""
    return old.path == "relayed" and new.path != "relayed"


def _target_text(target: object) -> str:
    if isinstance(target, str | PeerId):
        return str(target)
    if isinstance(target, Sequence):
        return ",".join(str(t) for t in target)
    return repr(target)
