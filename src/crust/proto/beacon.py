"""LAN discovery beacon, sans-IO: a signed datagram codec and the announce/answer machine.

A beacon datagram (UDP, broadcast on the LAN to ``service_discovery_port``) is clear so a
dissector can recognise it, and signed by the peer it announces::

    MAGIC "\\x2bcb" | version u8 | kind u8 | network tag (8) | peer id (32)
    | timestamp ms u64 | nonce (8) | contact count u8 | (length u8 | contact utf-8)*
    | Ed25519 signature (64) by the peer id over b"crust beacon\\x00" + everything before it

``kind`` is ANNOUNCE (1) or QUERY (2, "announce, and please answer"). The first byte 0x2b has
QUIC's fixed bit (0x40) clear, is not a STUN message type (bytes 4..8 never hold STUN's magic
cookie, byte 4 is the version) and differs from the punch datagrams' ``0x2a "cp1"``.

:class:`Beacon` is the state machine (aioquic's surface: ``receive_datagram(data, addr, now)``,
``datagrams_to_send(now)``, ``get_timer()``, ``handle_timer(now)``, ``next_event()``). ``now``
is wall-clock seconds (timestamps are compared between hosts); randomness comes in as a
``rand(n) -> bytes`` callable.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum

from crust.contact import Contact
from crust.errors import ConfigError, ProtocolError
from crust.identity import Identity, PeerId
from crust.proto.session import network_tag

MAGIC = b"\x2bcb"
VERSION = 1
SIG_CONTEXT = b"crust beacon\x00"
MAX_CONTACTS = 16
MAX_CONTACT_LEN = 120
MAX_DATAGRAM = 1400
NONCE_LEN = 8
SIG_LEN = 64
_HEAD = struct.Struct("!3sBB8s32sQ8sB")
MIN_LEN = _HEAD.size + SIG_LEN

REPLAY_WINDOW = 60.0
"""A beacon whose timestamp is further than this from our clock is stale (or from the future)."""
ANNOUNCE_INTERVAL = 60.0
ANSWER_DELAY_MAX = 0.2
"""Answers to a query wait a random 0..this, so a LAN of nodes does not answer in one burst."""
ANSWER_MIN_GAP = 1.0
"""At most one answer per this many seconds; queries in between share the next answer."""
MAX_INPUT_RATE = 200
"""Datagrams verified per second at most; the rest are dropped unverified (counted)."""
MAX_PEERS = 256


class Kind(IntEnum):
    ANNOUNCE = 1
    QUERY = 2


@dataclass(frozen=True, slots=True)
class BeaconDatagram:
    kind: Kind
    network: bytes
    peer: PeerId
    timestamp_ms: int
    nonce: bytes
    contacts: tuple[str, ...]
    signed: bytes
    """The signed part (everything before the signature)."""
    signature: bytes

    def verify(self) -> bool:
        return self.peer.verify(self.signature, SIG_CONTEXT + self.signed)


def is_beacon(data: bytes | memoryview) -> bool:
    return len(data) >= len(MAGIC) and bytes(data[: len(MAGIC)]) == MAGIC


def _check_contact(text: str) -> str:
    try:
        c = Contact.parse(text)
    except ConfigError as exc:
        raise ProtocolError(f"beacon contact: {exc}") from exc
    if not c.is_ip or not c.port or c.peer_id is not None:
        raise ProtocolError("beacon contact must be an IP address and port without peer id")
    return str(c)


def encode(
    identity: Identity,
    kind: Kind,
    network_name: str,
    timestamp_ms: int,
    nonce: bytes,
    contacts: Sequence[str],
) -> bytes:
    """Build and sign one beacon; contacts beyond the bounds are left out."""
    if len(nonce) != NONCE_LEN:
        raise ValueError("nonce must be 8 bytes")
    body = b""
    count = 0
    budget = MAX_DATAGRAM - MIN_LEN
    for text in contacts:
        raw = text.encode("utf-8")
        if count >= MAX_CONTACTS or len(raw) > MAX_CONTACT_LEN or len(raw) + 1 > budget:
            continue
        body += bytes([len(raw)]) + raw
        budget -= len(raw) + 1
        count += 1
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        kind,
        network_tag(network_name),
        bytes(identity.peer_id),
        timestamp_ms,
        nonce,
        count,
    )
    signed = head + body
    return signed + identity.sign(SIG_CONTEXT + signed)


def parse(data: bytes | memoryview) -> BeaconDatagram:
    """Decode one beacon (the signature is not checked here); else :class:`ProtocolError`."""
    raw = bytes(data)
    if len(raw) > MAX_DATAGRAM:
        raise ProtocolError("beacon too large")
    if len(raw) < MIN_LEN:
        raise ProtocolError("beacon too short")
    magic, version, kind, tag, peer, ts, nonce, count = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError("not a beacon")
    if version != VERSION:
        raise ProtocolError(f"unknown beacon version {version}")
    try:
        k = Kind(kind)
    except ValueError:
        raise ProtocolError(f"unknown beacon kind {kind}") from None
    if count > MAX_CONTACTS:
        raise ProtocolError("too many contacts in beacon")
    end = len(raw) - SIG_LEN
    pos = _HEAD.size
    contacts: list[str] = []
    for _ in range(count):
        if pos >= end:
            raise ProtocolError("truncated beacon contact")
        n = raw[pos]
        pos += 1
        if n == 0 or n > MAX_CONTACT_LEN or pos + n > end:
            raise ProtocolError("bad beacon contact length")
        try:
            text = raw[pos : pos + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("beacon contact is not UTF-8") from None
        contacts.append(_check_contact(text))
        pos += n
    if pos != end:
        raise ProtocolError("trailing bytes in beacon")
    return BeaconDatagram(k, tag, PeerId(peer), ts, nonce, tuple(contacts), raw[:end], raw[end:])


# ===================================================================== state machine


@dataclass(frozen=True, slots=True)
class PeerAnnounced:
    """A peer seen for the first time, or whose contacts changed."""

    peer: PeerId
    contacts: tuple[str, ...]
    address: tuple[str, int]


@dataclass(slots=True)
class _Entry:
    contacts: tuple[str, ...]
    last_ts: int
    seen: float


@dataclass(slots=True)
class BeaconCounters:
    received: int = 0
    accepted: int = 0
    malformed: int = 0
    forged: int = 0
    other_network: int = 0
    stale: int = 0
    replayed: int = 0
    rate_limited: int = 0
    sent: int = 0
    answers: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"beacon_{f.name}": getattr(self, f.name) for f in fields(self)}


@dataclass
class Beacon:
    """Announce ourselves on start (as a QUERY), re-announce every ``interval`` with jitter,
    answer others' queries (randomly delayed, coalesced, rate-limited), and report peers."""

    identity: Identity
    network_name: str
    contacts: Sequence[str]
    rand: Callable[[int], bytes]
    interval: float = ANNOUNCE_INTERVAL
    replay_window: float = REPLAY_WINDOW
    max_peers: int = MAX_PEERS
    counters: BeaconCounters = field(default_factory=BeaconCounters)

    def __post_init__(self) -> None:
        self._tag = network_tag(self.network_name)
        self._peers: OrderedDict[PeerId, _Entry] = OrderedDict()
        self._out: list[bytes] = []
        self._events: deque[PeerAnnounced] = deque()
        self._next_announce: float | None = None
        self._answer_at: float | None = None
        self._last_answer = float("-inf")
        self._last_ts = 0
        self._window_start = float("-inf")
        self._window_count = 0

    # ------------------------------------------------------------------ helpers

    def _uniform(self) -> float:
        return int.from_bytes(self.rand(4), "big") / 2**32

    def _emit(self, kind: Kind, now: float) -> None:
        ts = max(int(now * 1000), self._last_ts + 1)
        self._last_ts = ts
        self._out.append(
            encode(self.identity, kind, self.network_name, ts, self.rand(NONCE_LEN), self.contacts)
        )
        self.counters.sent += 1

    def _schedule_announce(self, now: float) -> None:
        self._next_announce = now + self.interval * (0.75 + 0.5 * self._uniform())

    # ------------------------------------------------------------------ surface

    def start(self, now: float) -> None:
        """Ask the LAN who is there (our QUERY also announces us)."""
        self._emit(Kind.QUERY, now)
        self._schedule_announce(now)

    def set_contacts(self, contacts: Sequence[str], now: float) -> None:
        """Our contacts changed: announce the new ones at once."""
        if tuple(contacts) != tuple(self.contacts):
            self.contacts = tuple(contacts)
            self._emit(Kind.ANNOUNCE, now)
            self._schedule_announce(now)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        timers = [t for t in (self._next_announce, self._answer_at) if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        if self._answer_at is not None and now >= self._answer_at:
            self._answer_at = None
            self._last_answer = now
            self.counters.answers += 1
            self._emit(Kind.ANNOUNCE, now)
            self._schedule_announce(now)
        if self._next_announce is not None and now >= self._next_announce:
            self._emit(Kind.ANNOUNCE, now)
            self._schedule_announce(now)
        self._expire(now)

    def next_event(self) -> PeerAnnounced | None:
        return self._events.popleft() if self._events else None

    def peers(self) -> dict[PeerId, tuple[str, ...]]:
        return {p: e.contacts for p, e in self._peers.items()}

    def receive_datagram(self, data: bytes, addr: tuple[str, int], now: float) -> None:
        """One datagram from the beacon socket; bad ones are dropped and counted."""
        c = self.counters
        c.received += 1
        if now - self._window_start >= 1.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        if self._window_count > MAX_INPUT_RATE:
            c.rate_limited += 1
            return
        try:
            msg = parse(data)
        except ProtocolError:
            c.malformed += 1
            return
        if msg.network != self._tag:
            c.other_network += 1
            return
        if msg.peer == self.identity.peer_id:
            return  # our own broadcast looped back
        if abs(msg.timestamp_ms / 1000 - now) > self.replay_window:
            c.stale += 1
            return
        if not msg.verify():
            c.forged += 1
            return
        entry = self._peers.get(msg.peer)
        if entry is not None and msg.timestamp_ms <= entry.last_ts:
            c.replayed += 1
            return
        c.accepted += 1
        if msg.kind is Kind.QUERY:
            self._answer_query(now)
        contacts = _source_first(msg.contacts, addr[0])
        if entry is None:
            if len(self._peers) >= self.max_peers:
                self._peers.popitem(last=False)
            self._peers[msg.peer] = _Entry(contacts, msg.timestamp_ms, now)
            self._events.append(PeerAnnounced(msg.peer, contacts, addr))
            return
        self._peers.move_to_end(msg.peer)
        entry.last_ts, entry.seen = msg.timestamp_ms, now
        if set(entry.contacts) != set(contacts):
            entry.contacts = contacts
            self._events.append(PeerAnnounced(msg.peer, contacts, addr))

    def _answer_query(self, now: float) -> None:
        if self._answer_at is not None:
            return  # the pending answer serves this query too
        self._answer_at = max(
            now + ANSWER_DELAY_MAX * self._uniform(), self._last_answer + ANSWER_MIN_GAP
        )

    def _expire(self, now: float) -> None:
        limit = 3 * self.interval
        for peer in [p for p, e in self._peers.items() if now - e.seen > limit]:
            del self._peers[peer]


def _source_first(contacts: tuple[str, ...], host: str) -> tuple[str, ...]:
    """The contacts on the address the beacon came from first (the LAN path)."""
    same = [c for c in contacts if Contact.parse(c).host == host]
    return tuple(same + [c for c in contacts if c not in same])
