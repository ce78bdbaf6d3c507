"""The bootstrap cache as a sans-IO model: entries, updates, JSON bytes in and out.

The cache remembers nodes this peer once reached by dialling them directly, so that the next
start can find the network without hard-coded contacts. One file may be shared by several
services (and processes) of different networks, so the model holds one list per
``network_name``; everything else is per network:

- an entry is (peer id, contacts, last_seen, failures), one per peer id;
- only the caller decides what proved direct reachability: it reports :class:`Reached`
  (a direct outbound connection succeeded) and :class:`Failed` (an attempt failed);
- newest first (``last_seen``), at most ``max_entries``; an entry that failed
  ``max_failures`` times in a row is dropped;
- the file is JSON with a ``version`` field, bounded to :data:`MAX_FILE_BYTES`.

Writers do not merge whole states (that would resurrect entries another process pruned):
each process keeps the *updates* it made since its last write and applies them to the file's
current content under a lock (see ``crust.aio.cachefile``). :meth:`BootstrapCache.apply` is
therefore written to give sensible results when updates from several writers interleave.

Time (``at``, unix seconds) comes from the caller; nothing here does I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from crust.contact import Contact
from crust.errors import ConfigError, ProtocolError
from crust.identity import PeerId

FORMAT_VERSION = 1
MAX_FILE_BYTES = 4 * 1024 * 1024
"""A cache file larger than this is rejected unread; :meth:`BootstrapCache.to_bytes` never
produces one (it drops the oldest entries first)."""
MAX_CONTACTS_PER_ENTRY = 8
MAX_NETWORKS = 16
MAX_NETWORK_NAME_BYTES = 64
DEFAULT_MAX_ENTRIES = 200
DEFAULT_MAX_FAILURES = 3
MAX_TIMESTAMP = 1e11
"""Unix seconds (about the year 5138): later ``last_seen`` values are malformed."""
MAX_FAILURE_COUNT = 1_000_000


class CacheFormatError(ProtocolError):
    """A bootstrap cache file is malformed (not JSON, wrong version, bad entry, too large)."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """A node that was reached directly."""

    peer: PeerId
    contacts: tuple[str, ...]
    """Contact strings without ``#peer id``, the most recently successful first."""
    last_seen: float
    """Unix time of the latest successful direct connection."""
    failures: int = 0
    """Failed attempts since the latest success."""

    def pinned_contacts(self) -> list[str]:
        """The contacts with ``#peer id`` appended: dialling them proves the identity."""
        return [str(Contact.parse(c).with_peer(self.peer)) for c in self.contacts]


@dataclass(frozen=True, slots=True)
class Reached:
    """A direct outbound connection to ``peer`` through ``contact`` succeeded at ``at``."""

    network: str
    peer: PeerId
    contact: str
    at: float


@dataclass(frozen=True, slots=True)
class Failed:
    """An attempt to reach the cached ``peer`` failed at ``at``."""

    network: str
    peer: PeerId
    at: float


CacheUpdate = Reached | Failed


class BootstrapCache:
    """Every network's entries; see the module documentation for the rules."""

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self.max_entries = max_entries
        self.max_failures = max_failures
        self._networks: dict[str, dict[PeerId, CacheEntry]] = {}

    # ------------------------------------------------------------------ reading

    def entries(self, network: str) -> list[CacheEntry]:
        """The network's entries, newest first."""
        return _newest_first(self._networks.get(network, {}).values())

    def get(self, network: str, peer: PeerId) -> CacheEntry | None:
        return self._networks.get(network, {}).get(peer)

    def networks(self) -> list[str]:
        return list(self._networks)

    def __len__(self) -> int:
        return sum(len(n) for n in self._networks.values())

    def copy(self) -> BootstrapCache:
        out = BootstrapCache(max_entries=self.max_entries, max_failures=self.max_failures)
        out._networks = {name: dict(entries) for name, entries in self._networks.items()}
        return out

    # ------------------------------------------------------------------ updating

    def apply(self, update: CacheUpdate) -> None:
        """Apply one update (from this process or replayed onto another writer's state)."""
        if isinstance(update, Reached):
            self._reached(update)
        else:
            self._failed(update)

    def apply_all(self, updates: Iterable[CacheUpdate]) -> None:
        for update in updates:
            self.apply(update)

    def _reached(self, u: Reached) -> None:
        _check_network(u.network)
        contact = _canonical_contact(u.contact, u.peer)
        at = _check_time(u.at)
        if self.max_entries == 0:
            return
        entries = self._networks.get(u.network)
        if entries is None:
            entries = self._networks[u.network] = {}
            self._limit_networks(keep=u.network)
        old = entries.get(u.peer)
        if old is None:
            entries[u.peer] = CacheEntry(u.peer, (contact,), at, 0)
            self._trim(entries)
            return
        contacts = (contact, *(c for c in old.contacts if c != contact))
        contacts = contacts[:MAX_CONTACTS_PER_ENTRY]
        if at >= old.last_seen:
            # a success newer than everything known: the failure streak is over
            entries[u.peer] = CacheEntry(u.peer, contacts, at, 0)
        else:
            # an older success replayed late by another writer: keep its contact only
            contacts = (*old.contacts, contact) if contact not in old.contacts else old.contacts
            entries[u.peer] = replace(old, contacts=contacts[:MAX_CONTACTS_PER_ENTRY])

    def _failed(self, u: Failed) -> None:
        entries = self._networks.get(u.network)
        if entries is None:
            return
        old = entries.get(u.peer)
        if old is None or _check_time(u.at) < old.last_seen:
            # not cached, or the failure predates a success someone else recorded
            return
        if old.failures + 1 >= self.max_failures:
            del entries[u.peer]
            if not entries:
                del self._networks[u.network]
        else:
            entries[u.peer] = replace(old, failures=old.failures + 1)

    def _trim(self, entries: dict[PeerId, CacheEntry]) -> None:
        while len(entries) > self.max_entries:
            oldest = min(entries.values(), key=_age_key)
            del entries[oldest.peer]

    def _limit_networks(self, keep: str) -> None:
        while len(self._networks) > MAX_NETWORKS:
            others = [n for n in self._networks if n != keep]
            stalest = min(others, key=self._newest_seen)
            del self._networks[stalest]

    def _newest_seen(self, network: str) -> float:
        return max((e.last_seen for e in self._networks[network].values()), default=0.0)

    # ------------------------------------------------------------------ bytes

    def to_bytes(self) -> bytes:
        """The JSON file content (ASCII, at most :data:`MAX_FILE_BYTES`; the oldest entries
        are left out if everything would not fit), one entry per line."""
        encoded: list[tuple[tuple[float, bytes], str, str]] = []
        for name, entries in self._networks.items():
            for entry in entries.values():
                encoded.append((_age_key(entry), name, json.dumps(_entry_obj(entry))))
        encoded.sort(reverse=True)
        # an upper bound of the layout's overhead: per network and per entry (see _layout)
        budget = MAX_FILE_BYTES - 64 - sum(len(json.dumps(n)) + 16 for n in self._networks)
        kept: dict[str, list[str]] = {name: [] for name in self._networks}
        for _, name, text in encoded:
            budget -= len(text) + 6
            if budget < 0:
                break
            kept[name].append(text)
        data = _layout(kept)
        while len(data) > MAX_FILE_BYTES:  # pragma: no cover - the budget is an upper bound
            longest = max(kept.values(), key=len)
            longest.pop()
            data = _layout(kept)
        return data

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_failures: int = DEFAULT_MAX_FAILURES,
    ) -> BootstrapCache:
        """Parse a cache file; :class:`CacheFormatError` (a ``ProtocolError``) for anything
        malformed. Entries beyond ``max_entries`` per network (the oldest) and entries with
        ``max_failures`` or more failures are dropped."""
        if len(data) > MAX_FILE_BYTES:
            raise CacheFormatError(f"cache file larger than {MAX_FILE_BYTES} bytes")
        try:
            text = bytes(data).decode("utf-8")
            obj = json.loads(text, parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise CacheFormatError(f"cache file is not UTF-8: {exc.reason}") from exc
        except RecursionError as exc:
            raise CacheFormatError("cache file is nested too deeply") from exc
        except ValueError as exc:  # JSONDecodeError, huge integers, NaN/Infinity
            raise CacheFormatError(f"cache file is not valid JSON: {exc}") from exc
        cache = cls(max_entries=max_entries, max_failures=max_failures)
        top = _mapping(obj, "cache file")
        version = top.get("version")
        if type(version) is not int:
            raise CacheFormatError("cache file: missing integer 'version'")
        if version != FORMAT_VERSION:
            raise CacheFormatError(f"cache file version {version} is not supported")
        networks = _mapping(top.get("networks"), "networks")
        if len(networks) > MAX_NETWORKS:
            raise CacheFormatError(f"networks: more than {MAX_NETWORKS}")
        for name, items in networks.items():
            where = f"networks[{name!r:.80}]"
            try:
                _check_network(name)
            except ValueError as exc:
                raise CacheFormatError(f"{where}: {exc}") from exc
            if not isinstance(items, list):
                raise CacheFormatError(f"{where}: not a list")
            entries: dict[PeerId, CacheEntry] = {}
            for i, item in enumerate(items):
                entry = _parse_entry(item, f"{where}[{i}]")
                if entry.failures >= max_failures:
                    continue
                old = entries.get(entry.peer)
                if old is None or _age_key(entry) > _age_key(old):
                    entries[entry.peer] = entry
            cache._trim(entries)
            if entries:
                cache._networks[name] = entries
        return cache


# --------------------------------------------------------------------------- helpers


def _age_key(entry: CacheEntry) -> tuple[float, bytes]:
    """Newer sorts greater; ties broken by peer id so every writer orders alike."""
    return (entry.last_seen, bytes(entry.peer))


def _newest_first(entries: Iterable[CacheEntry]) -> list[CacheEntry]:
    return sorted(entries, key=_age_key, reverse=True)


def _entry_obj(entry: CacheEntry) -> dict[str, Any]:
    return {
        "peer": str(entry.peer),
        "contacts": list(entry.contacts),
        "last_seen": entry.last_seen,
        "failures": entry.failures,
    }


def _layout(kept: Mapping[str, list[str]]) -> bytes:
    """The file text: one network per member of "networks", one entry per line."""
    body = ",\n".join(
        f"  {json.dumps(name)}: [\n    " + ",\n    ".join(texts) + "\n  ]"
        for name, texts in kept.items()
        if texts
    )
    return f'{{"version": {FORMAT_VERSION}, "networks": {{\n{body}\n}}}}\n'.encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _mapping(obj: object, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise CacheFormatError(f"{where}: not a JSON object")
    return obj


def _check_network(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a network name is a non-empty string")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NETWORK_NAME_BYTES:
        raise ValueError(f"network name longer than {MAX_NETWORK_NAME_BYTES} bytes")
    if not name.isprintable():
        raise ValueError("network name is not printable")


def _check_time(at: object) -> float:
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise ValueError(f"not a time: {at!r}")
    if not 0 <= at <= MAX_TIMESTAMP:
        raise ValueError(f"time out of range: {at!r}")
    return float(at)


def _canonical_contact(text: str, peer: PeerId) -> str:
    """``text`` as ``SCHEME://IP:PORT`` (no peer id); ValueError unless it is a dialable IP
    contact of ``peer``."""
    try:
        contact = Contact.parse(text)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    if not contact.is_ip:
        raise ValueError(f"{text!r:.80}: not an IP address")
    if contact.port == 0:
        raise ValueError(f"{text!r:.80}: port 0")
    if contact.peer_id is not None and contact.peer_id != peer:
        raise ValueError(f"{text!r:.80}: pinned to another peer id")
    return str(contact.with_peer(None))


def _parse_entry(item: object, where: str) -> CacheEntry:
    obj = _mapping(item, where)
    peer_text = obj.get("peer")
    if not isinstance(peer_text, str):
        raise CacheFormatError(f"{where}.peer: missing peer id")
    try:
        peer = PeerId.parse(peer_text)
    except (ConfigError, ValueError) as exc:
        raise CacheFormatError(f"{where}.peer: not a peer id") from exc
    contacts_obj = obj.get("contacts")
    if not isinstance(contacts_obj, list) or not contacts_obj:
        raise CacheFormatError(f"{where}.contacts: not a non-empty list")
    if len(contacts_obj) > MAX_CONTACTS_PER_ENTRY:
        raise CacheFormatError(f"{where}.contacts: more than {MAX_CONTACTS_PER_ENTRY}")
    contacts: list[str] = []
    for j, c in enumerate(contacts_obj):
        if not isinstance(c, str):
            raise CacheFormatError(f"{where}.contacts[{j}]: not a string")
        try:
            canonical = _canonical_contact(c, peer)
        except ValueError as exc:
            raise CacheFormatError(f"{where}.contacts[{j}]: {exc}") from exc
        if canonical not in contacts:
            contacts.append(canonical)
    last_seen = obj.get("last_seen")
    try:
        seen = _check_time(last_seen)
    except ValueError as exc:
        raise CacheFormatError(f"{where}.last_seen: {exc}") from exc
    failures = obj.get("failures", 0)
    if type(failures) is not int or not 0 <= failures <= MAX_FAILURE_COUNT:
        raise CacheFormatError(f"{where}.failures: not a small non-negative integer")
    return CacheEntry(peer, tuple(contacts), seen, failures)
