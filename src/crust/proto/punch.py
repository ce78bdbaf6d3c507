"""Hole punching, sans-IO: connection info, clear UDP punch datagrams, the punch schedule.

Two peers behind NATs learn each other's *candidates* (local addresses, the external
addresses others observed) either through a connected node (an introduction forwarded over
both authenticated connections) or out of band (:class:`PublicConnectionInfo`, the Crust
rendezvous).  Both then run a :class:`PunchPlan` with the same inputs at (nearly) the same
moment: UDP probes from the QUIC socket to every QUIC candidate, TCP simultaneous opens from
the listening port to every TCP candidate.  The first path that answers carries an ordinary
crust handshake, which authenticates the peer id; the punch itself proves nothing.

Punch datagrams are clear but carry no identity: ``MAGIC | kind u8 | token (16 bytes)`` plus,
for an address echo, the address seen.  The first byte ``0x2a`` has QUIC's fixed bit (0x40)
clear and the bytes after it are not STUN's magic cookie, so one UDP socket carries QUIC,
STUN and punching.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from crust.contact import Contact
from crust.errors import ConfigError, ProtocolError
from crust.identity import PeerId
from crust.proto.predict import MAX_PREDICTED

MAGIC = b"\x2acp1"
Address = tuple[str, int]
TOKEN_LEN = 16
MAX_CANDIDATES = 16
MAX_INFO_BYTES = 4096
INFO_VERSION = 1
ECHO_PADDING = 24
"""An echo request is padded so that it is never smaller than its reply (no amplification)."""


class Kind(IntEnum):
    PROBE = 1
    """"Are you there?" sent to every candidate of the other side."""
    ACK = 2
    """Answer to a PROBE: the path works in both directions."""
    ECHO_REQUEST = 3
    """"Which address do you see me from?" (to a node's UDP port)."""
    ECHO_REPLY = 4
    """The answer, carrying the address seen."""


@dataclass(frozen=True, slots=True)
class PunchDatagram:
    kind: Kind
    token: bytes
    address: tuple[str, int] | None = None


def is_punch(data: bytes | memoryview) -> bool:
    return len(data) >= len(MAGIC) and bytes(data[: len(MAGIC)]) == MAGIC


def encode(kind: Kind, token: bytes, address: tuple[str, int] | None = None) -> bytes:
    if len(token) != TOKEN_LEN:
        raise ValueError("punch token must be 16 bytes")
    out = MAGIC + bytes([kind]) + token
    if kind is Kind.ECHO_REQUEST:
        out += bytes(ECHO_PADDING)
    if kind is Kind.ECHO_REPLY:
        if address is None:
            raise ValueError("an echo reply carries an address")
        ip = ipaddress.ip_address(address[0])
        out += bytes([ip.version]) + address[1].to_bytes(2, "big") + ip.packed
    return out


def parse(data: bytes | memoryview) -> PunchDatagram:
    """Decode one punch datagram; any other bytes raise :class:`ProtocolError`."""
    raw = bytes(data)
    head = len(MAGIC) + 1 + TOKEN_LEN
    if len(raw) < head or not is_punch(raw):
        raise ProtocolError("not a punch datagram")
    try:
        kind = Kind(raw[len(MAGIC)])
    except ValueError as exc:
        raise ProtocolError(f"unknown punch datagram kind {raw[len(MAGIC)]}") from exc
    token = raw[len(MAGIC) + 1 : head]
    rest = raw[head:]
    if kind is Kind.ECHO_REQUEST:
        if rest != bytes(ECHO_PADDING):
            raise ProtocolError("an echo request is padded with 24 zero bytes")
        return PunchDatagram(kind, token)
    if kind is not Kind.ECHO_REPLY:
        if rest:
            raise ProtocolError("trailing bytes in a punch datagram")
        return PunchDatagram(kind, token)
    if (
        len(rest) not in (7, 19)
        or rest[0] not in (4, 6)
        or len(rest) != (7 if rest[0] == 4 else 19)
    ):
        raise ProtocolError("bad address in an echo reply")
    port = int.from_bytes(rest[1:3], "big")
    host = str(ipaddress.ip_address(rest[3:]))
    if port == 0:
        raise ProtocolError("port 0 in an echo reply")
    return PunchDatagram(kind, token, (host, port))


_LAN_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def is_lan(host: str) -> bool:
    """A private (RFC 1918 / RFC 6598 shared / ULA) or loopback address: never behind a NAT's
    public side.  (Not ``ipaddress.is_private``, which also counts documentation and
    benchmarking ranges.)"""
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or ip.is_link_local or any(ip in net for net in _LAN_NETS)


def shared_token(a: bytes, b: bytes) -> bytes:
    """The token both sides put in their probes: derived from both sides' nonces, so each
    side knows the other's probes belong to this very punch."""
    lo, hi = sorted((a, b))
    return hashlib.sha256(b"crust punch token v1\0" + lo + hi).digest()[:TOKEN_LEN]


# --------------------------------------------------------------------------- candidates


def clean_candidates(items: Iterable[Any], *, limit: int = MAX_CANDIDATES) -> tuple[str, ...]:
    """Keep well-formed ``tcp://IP:PORT`` / ``quic://IP:PORT`` strings (no names, no port 0,
    no wildcard, no multicast), without duplicates, at most ``limit``."""
    out: list[str] = []
    for item in items:
        if len(out) >= limit:
            break
        if not isinstance(item, str):
            continue
        try:
            c = Contact.parse(item)
        except ConfigError:
            continue
        if not c.is_ip or c.port == 0:
            continue
        ip = ipaddress.ip_address(c.host)
        if ip.is_unspecified or ip.is_multicast or ip.is_link_local:
            continue
        text = str(c.with_peer(None))
        if text not in out:
            out.append(text)
    return tuple(out)


def split_predicted(
    items: Iterable[Any], hosts: Iterable[str]
) -> tuple[list[Address], list[Address]]:
    """(TCP, QUIC) addresses the other side predicts its next NAT mappings at: well-formed
    contacts on one of ``hosts`` (the public IPs it is otherwise known by, so a prediction can
    never aim our probes at a third party), never a LAN address, at most
    :data:`~crust.proto.predict.MAX_PREDICTED` per protocol, in the order given."""
    allowed = {h for h in hosts if not is_lan(h)}
    tcp: list[Address] = []
    quic: list[Address] = []
    for text in clean_candidates(items, limit=2 * MAX_PREDICTED):
        c = Contact.parse(text)
        if c.host not in allowed:
            continue
        out = tcp if c.scheme == "tcp" else quic
        if len(out) < MAX_PREDICTED:
            out.append((c.host, c.port))
    return tcp, quic


def split_candidates(candidates: Sequence[str]) -> tuple[list[Address], list[Address]]:
    """(TCP addresses, QUIC addresses) of well-formed candidates."""
    tcp: list[tuple[str, int]] = []
    quic: list[tuple[str, int]] = []
    for text in clean_candidates(candidates, limit=4 * MAX_CANDIDATES):
        c = Contact.parse(text)
        (tcp if c.scheme == "tcp" else quic).append((c.host, c.port))
    return tcp, quic


@dataclass(frozen=True, slots=True)
class PublicConnectionInfo:
    """What one side hands the other (through any channel) to be punched to:
    its peer id, its candidates and a fresh nonce; behind a NAT with sequential port
    allocation also ``predicted``, the addresses its next mappings will likely get (see
    :mod:`crust.proto.predict`).  ``to_bytes``/``from_bytes`` are the wire form (msgpack, at
    most 4 KiB)."""

    peer_id: PeerId
    candidates: tuple[str, ...]
    nonce: bytes
    predicted: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "v": INFO_VERSION,
            "id": bytes(self.peer_id),
            "c": list(self.candidates),
            "n": self.nonce,
        }
        if self.predicted:
            body["p"] = list(self.predicted)
        packed: bytes = msgpack.packb(body)
        return packed

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicConnectionInfo:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("connection info must be bytes")
        if len(data) > MAX_INFO_BYTES:
            raise ProtocolError("connection info too large")
        try:
            obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as exc:
            raise ProtocolError(f"malformed connection info: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("v") != INFO_VERSION:
            raise ProtocolError("unknown connection info version")
        pid, cands, nonce = obj.get("id"), obj.get("c"), obj.get("n")
        if not isinstance(pid, bytes) or len(pid) != 32:
            raise ProtocolError("connection info: bad peer id")
        if not isinstance(cands, list) or not isinstance(nonce, bytes) or len(nonce) != TOKEN_LEN:
            raise ProtocolError("connection info: bad candidates or nonce")
        predicted = obj.get("p", [])
        if not isinstance(predicted, list):
            raise ProtocolError("connection info: bad predicted addresses")
        return cls(
            PeerId(pid),
            clean_candidates(cands),
            nonce,
            clean_candidates(predicted, limit=2 * MAX_PREDICTED),
        )


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Our side of an out-of-band rendezvous (:meth:`Service.prepare_connection_info`):
    ``public`` goes to the other side; the rest stays here."""

    public: PublicConnectionInfo
    created: float


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class PunchParams:
    probe_interval: float = 0.05
    """Seconds between two UDP probe rounds."""
    round_duration: float = 2.0
    """Length of one strategy round."""
    rounds: int = 3
    """Strategy rounds before giving up (see :class:`PunchPlan`)."""
    tcp_retry: float = 2.0
    """A TCP simultaneous-open attempt that has not connected is restarted this often (once
    per round: the kernel retransmits the SYN within an attempt; restarting sooner would let
    a late SYN-ACK for the old socket meet the new one and be answered with a reset)."""
    max_probes: int = 600
    """Probe datagrams one punch sends at most, whatever the candidates."""
    prediction_span: int = 4
    """Round 3 also probes this many ports either side of each external candidate."""
    max_prediction_probes: int = 400
    """Probes to the other side's predicted ports (sequential allocation), beyond
    ``max_probes``: they go first in every probe round until this budget is spent."""


@dataclass(frozen=True, slots=True)
class SendProbe:
    address: tuple[str, int]
    datagram: bytes


@dataclass(frozen=True, slots=True)
class DialQuic:
    """The UDP path to ``address`` works: dial QUIC over it (from the same socket)."""

    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class DialTcp:
    """Start (or restart) a TCP simultaneous open from the listening port to ``address``."""

    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class PunchExpired:
    """Every round ran out without a path."""


PunchAction = SendProbe | DialQuic | DialTcp | PunchExpired


@dataclass
class PunchPlan:
    """One punch towards one peer.  Both sides run it; ``dialer`` tells which side dials QUIC
    over a working UDP path (the other accepts it).  Strategy by round:

    1. probes to every QUIC candidate, TCP simultaneous open to every TCP candidate;
    2. the same, and now both sides dial QUIC on any answering path (the chosen dialer's
       packets may be the ones filtered);
    3. probes also to ports near each external candidate (sequential port allocation).

    ``predicted`` / ``predicted_tcp``: where the other side's next NAT mappings will be
    (it measured a sequential allocation).  They are probed / dialled first, in their order,
    from round 1: when both sides are behind such NATs, each side's i-th new flow must go to
    the other's i-th predicted port for the two mappings to match.
    """

    token: bytes
    tcp: Sequence[tuple[str, int]]
    quic: Sequence[tuple[str, int]]
    start: float
    dialer: bool
    params: PunchParams = field(default_factory=PunchParams)
    predicted: Sequence[tuple[str, int]] = ()
    predicted_tcp: Sequence[tuple[str, int]] = ()
    probes_sent: int = 0
    prediction_probes_sent: int = 0
    working: list[tuple[str, int]] = field(default_factory=list)
    done: bool = False
    _next_probe: float = 0.0
    _next_tcp: float = 0.0
    _dialed: set[tuple[str, int]] = field(default_factory=set)
    _actions: list[PunchAction] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._next_probe = self.start
        self._next_tcp = self.start

    @property
    def deadline(self) -> float:
        p = self.params
        return self.start + p.rounds * p.round_duration

    def round(self, now: float) -> int:
        return 1 + max(0, int((now - self.start) // self.params.round_duration))

    def get_timer(self) -> float | None:
        if self.done:
            return None
        times = [self.deadline, self._next_probe]
        if self.tcp or self.predicted_tcp:
            times.append(self._next_tcp)
        return min(times)

    def _targets(self, now: float) -> list[tuple[str, int]]:
        targets = [a for a in dict.fromkeys(self.quic) if a not in self.predicted]
        if self.round(now) >= 3:
            span = self.params.prediction_span
            for host, port in self.quic:
                if is_lan(host):
                    continue
                for delta in range(1, span + 1):
                    for p in (port + delta, port - delta):
                        addr = (host, p)
                        if 0 < p < 65536 and addr not in targets and addr not in self.predicted:
                            targets.append(addr)
        return targets

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        if now >= self.deadline:
            self.done = True
            self._actions.append(PunchExpired())
            return
        if now >= self._next_probe:
            self._next_probe = now + self.params.probe_interval
            datagram = encode(Kind.PROBE, self.token)
            for addr in self.predicted:
                if self.prediction_probes_sent >= self.params.max_prediction_probes:
                    break
                self.prediction_probes_sent += 1
                self._actions.append(SendProbe(addr, datagram))
            for addr in self._targets(now):
                if self.probes_sent >= self.params.max_probes:
                    break
                self.probes_sent += 1
                self._actions.append(SendProbe(addr, datagram))
        if not self.dialer and self.round(now) >= 2:
            for addr in self.working:
                if addr not in self._dialed:
                    self._dialed.add(addr)
                    self._actions.append(DialQuic(addr))
        if (self.tcp or self.predicted_tcp) and now >= self._next_tcp:
            self._next_tcp = now + self.params.tcp_retry
            targets = dict.fromkeys([*self.predicted_tcp, *self.tcp])
            self._actions.extend(DialTcp(addr) for addr in targets)

    def datagram_received(self, dgram: PunchDatagram, addr: tuple[str, int], now: float) -> None:
        """A punch datagram with our token arrived from ``addr``."""
        if self.done or dgram.token != self.token:
            return
        if dgram.kind is Kind.PROBE:
            self._actions.append(SendProbe(addr, encode(Kind.ACK, self.token)))
        if dgram.kind in (Kind.PROBE, Kind.ACK):
            if addr not in self.working:
                self.working.append(addr)
            if (self.dialer or self.round(now) >= 2) and addr not in self._dialed:
                self._dialed.add(addr)
                self._actions.append(DialQuic(addr))

    def finish(self) -> None:
        """A connection is up (or the punch was cancelled): stop sending."""
        self.done = True

    def actions(self) -> list[PunchAction]:
        out, self._actions = self._actions, []
        return out


# --------------------------------------------------------------------------- symmetric NATs


@dataclass(frozen=True, slots=True)
class BirthdayParams:
    sockets: int = 256
    """Extra UDP sockets the symmetric side opens (one NAT mapping each)."""
    probes: int = 2500
    """Probes the other side sends to random ports of the symmetric side's address."""
    rate: float = 1000.0
    """Probes per second (paced)."""
    prime_interval: float = 0.25
    """The symmetric side re-sends from every socket this often (keeps its mappings open)."""


@dataclass
class BirthdaySpray:
    """The cone side of birthday probing: probes to ``ports`` (random, chosen by the caller)
    of the symmetric side's public address, paced at ``rate``.  With n mappings open on the
    other side among m possible ports, k probes hit one with probability 1 - (1 - n/m)^k:
    256 sockets and 2500 probes over 64 512 ports give more than 99.99 %."""

    token: bytes
    host: str
    ports: Sequence[int]
    start: float
    rate: float = 1000.0
    sent: int = 0
    done: bool = False

    def get_timer(self) -> float | None:
        if self.done or self.sent >= len(self.ports):
            return None
        return self.start + self.sent / self.rate

    def handle_timer(self, now: float) -> list[SendProbe]:
        """The probes due by ``now`` (at most 50 per call, so a late timer cannot burst)."""
        out: list[SendProbe] = []
        datagram = encode(Kind.PROBE, self.token)
        while (
            not self.done
            and self.sent < len(self.ports)
            and self.start + self.sent / self.rate <= now
            and len(out) < 50
        ):
            out.append(SendProbe((self.host, self.ports[self.sent]), datagram))
            self.sent += 1
        return out


def birthday_roles(me_symmetric: bool, peer_symmetric: bool) -> str | None:
    """``"prime"`` (we open many sockets), ``"spray"`` (we probe random ports) or None."""
    if me_symmetric and not peer_symmetric:
        return "prime"
    if peer_symmetric and not me_symmetric:
        return "spray"
    return None
