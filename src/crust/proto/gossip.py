"""Gossip of known peers, sans-IO: the CONTROL payload codec and its per-peer rate limit.

A connected peer tells us which peers *it* is connected to directly, with their contacts::

    {"t": "gp", "p": [[peer id (32 bytes), [contact, ...]], ...]}

Entries only ever describe the sender's own direct connections, and what we learn from gossip
is never gossiped on (we gossip only our own direct connections), so knowledge travels at most
two hops. Everything is bounded: entries per message, contacts per entry, contact length, and
how often one peer may send.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from crust.contact import Contact
from crust.errors import ConfigError, ProtocolError
from crust.identity import PeerId

KIND = "gp"
MAX_ENTRIES = 32
MAX_CONTACTS = 8
MAX_CONTACT_LEN = 120
MIN_GAP = 5.0
"""A peer's gossip arriving sooner than this after its previous one is dropped (counted)."""


def encode(entries: Mapping[PeerId, Sequence[str]]) -> dict[str, Any]:
    """The payload for up to :data:`MAX_ENTRIES` peers (contacts bounded, peer ids stripped)."""
    out: list[list[Any]] = []
    for peer, contacts in entries.items():
        if len(out) >= MAX_ENTRIES:
            break
        good = [c for c in contacts if len(c) <= MAX_CONTACT_LEN][:MAX_CONTACTS]
        if good:
            out.append([bytes(peer), good])
    return {"t": KIND, "p": out}


def parse(payload: Mapping[str, Any]) -> dict[PeerId, tuple[str, ...]]:
    """Decode a ``gp`` payload; anything malformed raises :class:`ProtocolError`."""
    entries = payload.get("p")
    if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
        raise ProtocolError("gossip: bad entry list")
    out: dict[PeerId, tuple[str, ...]] = {}
    for item in entries:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError("gossip: bad entry")
        raw, contacts = item
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise ProtocolError("gossip: bad peer id")
        if not isinstance(contacts, list) or not 0 < len(contacts) <= MAX_CONTACTS:
            raise ProtocolError("gossip: bad contact list")
        good: list[str] = []
        for text in contacts:
            if not isinstance(text, str) or len(text) > MAX_CONTACT_LEN:
                raise ProtocolError("gossip: bad contact")
            try:
                c = Contact.parse(text)
            except ConfigError as exc:
                raise ProtocolError(f"gossip: {exc}") from exc
            if not c.is_ip or not c.port:
                raise ProtocolError("gossip: contact must be an IP address and port")
            good.append(str(c.with_peer(None)))
        out[PeerId(raw)] = tuple(good)
    return out


class GossipLimiter:
    """Per-peer minimum gap between accepted gossip messages (bounded table)."""

    def __init__(self, min_gap: float = MIN_GAP, max_peers: int = 4096) -> None:
        self.min_gap = min_gap
        self.max_peers = max_peers
        self._last: dict[PeerId, float] = {}

    def allow(self, peer: PeerId, now: float) -> bool:
        last = self._last.get(peer)
        if last is not None and now - last < self.min_gap:
            return False
        if last is None and len(self._last) >= self.max_peers:
            del self._last[next(iter(self._last))]
        self._last.pop(peer, None)
        self._last[peer] = now
        return True

    def forget(self, peer: PeerId) -> None:
        self._last.pop(peer, None)
