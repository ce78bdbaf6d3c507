"""Plain value types returned by :class:`crust.Service`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class EndpointPair:
    """A listener: its ``protocol`` (``"tcp"``/``"quic"``), the ``local`` contact it is bound
    to, and the ``external`` contact others see it as, when known."""

    protocol: str
    local: str
    external: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionDetails:
    transport: str
    """``"tcp"`` or ``"quic"``."""
    path: str
    """``"direct"``, ``"punched"``, ``"mapped"`` or ``"relayed"``."""
    remote: str
    """The remote address as a contact string."""
    local: str
    outbound: bool
    rtt: float | None
    """The last measured round-trip time in seconds (None until the first heartbeat)."""


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of the service's counters."""

    peers: int = 0
    connections: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    messages_dropped: int = 0
    dropped_by_priority: dict[int, int] = field(default_factory=dict)
    connects_outbound: int = 0
    connects_inbound: int = 0
    connect_failures: int = 0
    handshake_failures: int = 0
    heartbeat_timeouts: int = 0
    protocol_errors: int = 0
    refused: int = 0
    """Connections refused before the handshake (blacklist, limits)."""
    blacklisted: int = 0
    duplicates_closed: int = 0
    connects_by_path: dict[str, int] = field(default_factory=dict)
    punch_attempts: int = 0
    punch_successes: int = 0
    punch_failures: int = 0
    introductions_forwarded: int = 0
    introductions_refused: int = 0
    """Introductions we refused to forward (not connected, rate limited) or to take part in."""
    port_predictions: int = 0
    """Punch offers (introductions, answers, connection infos) in which we advertised the
    predicted ports of our next NAT mappings (a symmetric NAT with sequential allocation)."""
    relay_circuits: int = 0
    """Circuits we relayed for others (accepted by both ends)."""
    relay_bytes: int = 0
    relay_refused: int = 0
    """Circuits refused or cut (limits, unknown peers, malformed traffic)."""
    signed_messages_sent: int = 0
    signed_messages_received: int = 0
    """Signed messages verified and delivered."""
    signature_failures: int = 0
    """Signed messages rejected: forged, mismatched or replayed (not delivered)."""
    bytes_sent_by_transport: dict[str, int] = field(default_factory=dict)
    """``bytes_sent`` split by transport (``"tcp"``, ``"quic"``)."""
    bytes_received_by_transport: dict[str, int] = field(default_factory=dict)
    messages_sent_by_transport: dict[str, int] = field(default_factory=dict)
    messages_received_by_transport: dict[str, int] = field(default_factory=dict)
    abuse_events: int = 0
    """AbuseDetected events reported."""
    abuse_by_kind: dict[str, int] = field(default_factory=dict)
    limits_hit: int = 0
    """Connections refused, cut or not dialled because a configured limit was reached
    (max_connections, max_pending_handshakes, max_connections_per_ip,
    max_peer_bytes_per_second)."""
    datagrams_dropped: int = 0
    """UDP datagrams on our QUIC sockets dropped unread: garbage, unknown connection ids,
    forged Retry tokens, a paused reader, and unrouted datagrams from an address over its
    junk budget."""
    punch_datagrams_dropped: int = 0
    """Punch and address-echo datagrams refused: malformed, an unknown token, an echo
    answer from an address we did not ask, our own probes."""
    punches_by_nat_pair: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(attempts, successes) by ``"ours/theirs"`` UDP mapping: ``cone``, ``symmetric`` or
    ``unknown``."""
    discovery: dict[str, int] = field(default_factory=dict)
    """LAN beacon and gossip counters (``beacon_forged``, ``gossip_learned``…)."""
