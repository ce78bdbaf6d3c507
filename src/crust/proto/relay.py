"""Relay circuits at a node, sans-IO: admission, routing, limits and flow-control accounting.

A relayed connection is an ordinary crust session (Noise XX end to end, so the node sees only
ciphertext) whose bytes travel as CONTROL messages over the two peers' connections to a node:

* ``{"t": "ro", "to": B, "c": n}``  A asks the node for a circuit to B (A's circuit number n)
* ``{"t": "ri", "from": A, "c": m}`` the node offers it to B (the node's number m for B)
* ``{"t": "ra", "c": m}`` B accepts; the node tells A ``{"t": "ra", "c": n}``
* ``{"t": "rx", "c": n, "e": reason}`` refused or closed, in either direction
* ``{"t": "rd", "c": n, "d": bytes}`` data; ``{"t": "rk", "c": n, "k": bytes}`` consumed (credit)

Each end may have at most ``window`` bytes unacknowledged; the node checks that too (so its
queues stay bounded whatever the ends do) and enforces per-circuit bytes, lifetime and rate,
and per-node and per-peer circuit counts.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from crust.errors import LimitExceeded, OversizedInput, ProtocolError

MAX_CHUNK = 32 * 1024
"""Bytes of one ``rd`` message."""


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_circuits: int = 64
    max_circuits_per_peer: int = 8
    max_bytes: int = 256 * 1024 * 1024
    """Bytes one circuit may carry (both directions together)."""
    max_seconds: float = 3600.0
    rate: float = 4 * 1024 * 1024
    """Bytes per second per circuit (token bucket, bursts of one window), enforced by
    holding back credit."""
    window: int = 256 * 1024
    """Unacknowledged bytes per direction."""


@dataclass
class _Side:
    key: Hashable
    cid: int
    inflight: int = 0
    """Bytes this side sent that the other side has not acknowledged yet."""


@dataclass
class Circuit:
    a: _Side
    b: _Side
    opened: float
    accepted: bool = False
    carried: int = 0
    tokens: float = 0.0
    stamp: float = 0.0

    def other(self, key: Hashable) -> _Side:
        return self.b if key == self.a.key else self.a

    def side(self, key: Hashable) -> _Side:
        return self.a if key == self.a.key else self.b


@dataclass
class RelayTable:
    """The node's circuits. Keys identify the node's connections to the two ends."""

    limits: RelayLimits = field(default_factory=RelayLimits)
    _by_end: dict[tuple[Hashable, int], Circuit] = field(default_factory=dict)
    _next: int = 1

    @property
    def circuits(self) -> int:
        return len(self._by_end) // 2

    def _count(self, key: Hashable) -> int:
        return sum(1 for k, _ in self._by_end if k == key)

    def open(self, a_key: Hashable, a_cid: int, b_key: Hashable, now: float) -> int:
        """A asks for a circuit to B: returns the circuit number to give B."""
        if not isinstance(a_cid, int) or isinstance(a_cid, bool) or not 0 < a_cid < 2**31:
            raise ProtocolError("bad circuit number")
        if (a_key, a_cid) in self._by_end:
            raise ProtocolError("circuit number in use")
        lim = self.limits
        if self.circuits >= lim.max_circuits:
            raise LimitExceeded("relay: too many circuits")
        if self._count(a_key) >= lim.max_circuits_per_peer:
            raise LimitExceeded("relay: too many circuits for this peer")
        if self._count(b_key) >= lim.max_circuits_per_peer:
            raise LimitExceeded("relay: too many circuits for the target peer")
        b_cid = self._next
        self._next = self._next % (2**31 - 1) + 1
        circuit = Circuit(
            _Side(a_key, a_cid), _Side(b_key, b_cid), now, tokens=lim.window, stamp=now
        )
        self._by_end[(a_key, a_cid)] = circuit
        self._by_end[(b_key, b_cid)] = circuit
        return b_cid

    def accept(self, b_key: Hashable, b_cid: int) -> tuple[Hashable, int]:
        """B accepted: returns (A's key, A's circuit number) to tell A."""
        circuit = self._by_end.get((b_key, b_cid))
        if circuit is None or circuit.b.key != b_key or circuit.accepted:
            raise ProtocolError("accept for an unknown circuit")
        circuit.accepted = True
        return circuit.a.key, circuit.a.cid

    def route_data(self, key: Hashable, cid: int, size: int, now: float) -> tuple[Hashable, int]:
        """Data from one end: where it goes; raises when the circuit breaks a limit."""
        circuit = self._by_end.get((key, cid))
        if circuit is None or not circuit.accepted:
            raise ProtocolError("data for an unknown circuit")
        lim = self.limits
        if size > MAX_CHUNK:
            raise OversizedInput("relay chunk too large")
        side = circuit.side(key)
        if side.inflight + size > lim.window:
            raise OversizedInput("relay window exceeded")
        if circuit.carried + size > lim.max_bytes:
            raise LimitExceeded("relay: circuit byte limit reached")
        if now - circuit.opened > lim.max_seconds:
            raise LimitExceeded("relay: circuit lifetime reached")
        side.inflight += size
        circuit.carried += size
        other = circuit.other(key)
        return other.key, other.cid

    def route_credit(
        self, key: Hashable, cid: int, size: int, now: float
    ) -> tuple[Hashable, int, float]:
        """``size`` bytes consumed by this end: credit for the other end, and how long to
        hold it back first.  The bandwidth limit works by delaying credit: an end can never
        have more than a window in flight, so holding credit paces it (nothing is dropped)."""
        circuit = self._by_end.get((key, cid))
        if circuit is None or not circuit.accepted:
            raise ProtocolError("credit for an unknown circuit")
        other = circuit.other(key)
        if not isinstance(size, int) or size < 0 or size > other.inflight:
            raise ProtocolError("bad relay credit")
        other.inflight -= size
        lim = self.limits
        circuit.tokens = min(lim.window, circuit.tokens + (now - circuit.stamp) * lim.rate)
        circuit.stamp = now
        circuit.tokens -= size
        delay = -circuit.tokens / lim.rate if circuit.tokens < 0 else 0.0
        return other.key, other.cid, delay

    def close(self, key: Hashable, cid: int) -> tuple[Hashable, int] | None:
        """One end closed (or refused) the circuit: the other end to tell, if any."""
        circuit = self._by_end.get((key, cid))
        if circuit is None:
            return None
        self._remove(circuit)
        other = circuit.other(key)
        return other.key, other.cid

    def drop(self, key: Hashable) -> list[tuple[Hashable, int]]:
        """The node lost its connection ``key``: close its circuits; the ends to tell."""
        out: list[tuple[Hashable, int]] = []
        for (k, cid), circuit in list(self._by_end.items()):
            if k == key and (k, cid) in self._by_end:
                self._remove(circuit)
                other = circuit.other(key)
                out.append((other.key, other.cid))
        return out

    def expired(self, now: float) -> list[tuple[Hashable, int]]:
        """Circuits past their lifetime: both ends to tell."""
        out: list[tuple[Hashable, int]] = []
        for circuit in {id(c): c for c in self._by_end.values()}.values():
            if now - circuit.opened > self.limits.max_seconds:
                self._remove(circuit)
                out += [(circuit.a.key, circuit.a.cid), (circuit.b.key, circuit.b.cid)]
        return out

    def _remove(self, circuit: Circuit) -> None:
        self._by_end.pop((circuit.a.key, circuit.a.cid), None)
        self._by_end.pop((circuit.b.key, circuit.b.cid), None)
