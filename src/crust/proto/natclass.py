"""Sans-IO NAT behaviour classification (RFC 4787 terms, RFC 5780 tests) from observations.

The input is what a prober saw from **one local UDP socket**: the mapped (server-reflexive)
address each observer reported, in the order the requests were sent; which *filtering probes*
arrived (packets sent to our mapping from an address or port we never sent to); whether a
packet sent to our own mapped address came back (hairpinning).  :func:`classify` turns that
into a :class:`NatClassification`; nothing here does I/O.

Mapping (RFC 4787 section 4.1), from pairs of observers:

* two observers on different IPs report the same mapping -> endpoint-independent;
* the mapping changes between IPs but two observers on one IP (different ports) agree ->
  address-dependent; they disagree -> address-and-port-dependent.

Filtering (RFC 4787 section 5), from probes after the socket has sent to *one* observer only:

* a packet from another IP arrived -> endpoint-independent;
* none from another IP, but one from the same IP and another port -> address-dependent;
* not even that -> address-and-port-dependent.

Port allocation: the ports of consecutive *new* mappings (address-dependent NATs create one
per destination).  A fixed step between them (or small steps in one direction) means the
next port can be predicted -- the basis of port prediction for symmetric NATs.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Address = tuple[str, int]

MAX_SEQUENTIAL_STEP = 32
"""Largest step between consecutive new mappings still called sequential when the steps are
not all equal (other hosts behind the NAT take ports in between)."""


class MappingBehavior(StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class FilteringBehavior(StrEnum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    UNKNOWN = "unknown"


class PortAllocation(StrEnum):
    STABLE = "stable"
    """One mapping is reused for every destination (endpoint-independent mapping)."""
    PRESERVING = "preserving"
    """Every new mapping keeps the local port."""
    SEQUENTIAL = "sequential"
    """New mappings step through ports predictably (see ``port_delta``)."""
    RANDOM = "random"
    UNKNOWN = "unknown"


ProbeSource = Literal["other-address", "other-port"]


@dataclass(frozen=True)
class MappingObservation:
    """An observer (``server``) reported ``mapped`` for our socket; ``rtt`` in seconds."""

    server: Address
    mapped: Address
    rtt: float | None = None


@dataclass(frozen=True)
class FilteringProbe:
    """A packet sent to our mapping from an endpoint we never sent to, and whether it arrived.

    ``"other-address"``: from another IP (e.g. RFC 5780 CHANGE-REQUEST change-IP-and-port, or
    a second observer asked to send to us); ``"other-port"``: from the IP we sent to, another
    port (CHANGE-REQUEST change-port).
    """

    source: ProbeSource
    arrived: bool


@dataclass(frozen=True)
class NatObservations:
    """Everything a prober learnt from one local socket."""

    local: Address | None
    """The socket's local address (its IP may be the wildcard when unknown)."""
    mappings: Sequence[MappingObservation] = ()
    """In the order the requests were sent."""
    filtering: Sequence[FilteringProbe] = ()
    hairpin: bool | None = None
    local_addresses: Sequence[str] = ()
    """Other addresses of this host (to recognise a public host when ``local`` is a wildcard)."""


@dataclass(frozen=True)
class NatClassification:
    mapped: Address | None
    """The first mapped address seen (the public endpoint of this socket)."""
    local: Address | None
    behind_nat: bool | None
    """False when the mapped address is our own: no NAT (maybe a firewall)."""
    mapping: MappingBehavior
    filtering: FilteringBehavior
    port_preservation: bool | None
    """Did the first mapping keep the local port?"""
    hairpinning: bool | None
    port_allocation: PortAllocation
    port_delta: int | None
    """The step between consecutive new mappings when ``port_allocation`` is sequential."""
    port_samples: tuple[int, ...] = ()
    """Ports of the consecutive new mappings, in order."""
    observations: tuple[MappingObservation, ...] = ()
    filtering_probes: tuple[FilteringProbe, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def nat_type(self) -> str:
        """The classic (RFC 3489) name: ``none``, ``firewall``, ``full-cone``, ``restricted``,
        ``port-restricted``, ``cone`` (filtering unknown), ``symmetric`` or ``unknown``."""
        if self.behind_nat is False:
            strict = self.filtering in (
                FilteringBehavior.ADDRESS_DEPENDENT,
                FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT,
            )
            return "firewall" if strict else "none"
        if self.mapping in (
            MappingBehavior.ADDRESS_DEPENDENT,
            MappingBehavior.ADDRESS_AND_PORT_DEPENDENT,
        ):
            return "symmetric"
        if self.mapping == MappingBehavior.ENDPOINT_INDEPENDENT:
            return {
                FilteringBehavior.ENDPOINT_INDEPENDENT: "full-cone",
                FilteringBehavior.ADDRESS_DEPENDENT: "restricted",
                FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT: "port-restricted",
            }.get(self.filtering, "cone")
        return "unknown"

    def predict_ports(self, count: int) -> list[int]:
        """The next ``count`` ports a new mapping is likely to get (sequential allocation)."""
        if (
            self.port_allocation == PortAllocation.SEQUENTIAL
            and self.port_delta
            and self.port_samples
        ):
            last = self.port_samples[-1]
            return [_wrap_port(last + self.port_delta * k) for k in range(1, count + 1)]
        if self.port_allocation == PortAllocation.STABLE and self.mapped is not None:
            return [self.mapped[1]] * min(count, 1)
        return []

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; addresses as ``"ip:port"`` (IPv6 in brackets)."""
        return {
            "nat_type": self.nat_type,
            "mapped": format_address(self.mapped),
            "local": format_address(self.local),
            "behind_nat": self.behind_nat,
            "mapping": str(self.mapping),
            "filtering": str(self.filtering),
            "port_preservation": self.port_preservation,
            "hairpinning": self.hairpinning,
            "port_allocation": str(self.port_allocation),
            "port_delta": self.port_delta,
            "port_samples": list(self.port_samples),
            "observations": [
                {
                    "server": format_address(o.server),
                    "mapped": format_address(o.mapped),
                    "rtt": o.rtt,
                }
                for o in self.observations
            ],
            "filtering_probes": [
                {"source": p.source, "arrived": p.arrived} for p in self.filtering_probes
            ],
            "notes": list(self.notes),
        }


def format_address(addr: Address | None) -> str | None:
    if addr is None:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wrap_port(port: int) -> int:
    """Ports wrap within 1024..65535 (NATs do not allocate the well-known range)."""
    span = 65536 - 1024
    return 1024 + (port - 1024) % span


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return True


# --------------------------------------------------------------------------------------------
# The classifier
# --------------------------------------------------------------------------------------------


def classify(obs: NatObservations) -> NatClassification:
    """Classify NAT behaviour from ``obs`` (see the module docstring for the rules)."""
    notes: list[str] = []
    mappings = list(obs.mappings)
    first = mappings[0].mapped if mappings else None

    behind = _behind_nat(obs, first, notes)
    mapping = _mapping(mappings, notes)
    if behind is False and mapping == MappingBehavior.UNKNOWN:
        mapping = MappingBehavior.ENDPOINT_INDEPENDENT  # no translation at all
    filtering = _filtering(list(obs.filtering), notes)

    preservation: bool | None = None
    if first is not None and obs.local is not None:
        preservation = first[1] == obs.local[1]

    samples = _new_mapping_ports(mappings)
    allocation, delta = _allocation(mapping, samples, obs.local, notes)
    return NatClassification(
        mapped=first,
        local=obs.local,
        behind_nat=behind,
        mapping=mapping,
        filtering=filtering,
        port_preservation=preservation,
        hairpinning=obs.hairpin,
        port_allocation=allocation,
        port_delta=delta,
        port_samples=tuple(samples),
        observations=tuple(mappings),
        filtering_probes=tuple(obs.filtering),
        notes=tuple(notes),
    )


def _behind_nat(obs: NatObservations, first: Address | None, notes: list[str]) -> bool | None:
    if first is None:
        notes.append("no observer answered")
        return None
    own: list[str] = list(obs.local_addresses)
    if obs.local is not None and not _unspecified(obs.local[0]):
        own.append(obs.local[0])
    if not own:
        return None
    if any(_same_ip(first[0], ip) for ip in own):
        if obs.local is not None and first[1] != obs.local[1]:
            notes.append("mapped address is ours but the port changed (port-translating firewall)")
            return True
        return False
    return True


def _mapping(mappings: list[MappingObservation], notes: list[str]) -> MappingBehavior:
    by_server: dict[Address, Address] = {}
    for o in mappings:
        seen = by_server.setdefault(o.server, o.mapped)
        if seen != o.mapped:
            notes.append(
                f"observer {format_address(o.server)} reported two mappings: the NAT does not "
                "keep a mapping stable"
            )
    servers = list(by_server)
    if len(servers) < 2:
        notes.append("mapping needs at least two observers")
        return MappingBehavior.UNKNOWN
    differs = False
    other_ip_pair = False
    same_ip_pairs: list[bool] = []  # True = mapping equal
    for i, a in enumerate(servers):
        for b in servers[i + 1 :]:
            equal = by_server[a] == by_server[b]
            differs |= not equal
            if _same_ip(a[0], b[0]):
                same_ip_pairs.append(equal)
            else:
                other_ip_pair = True
    if not differs:
        if other_ip_pair:
            return MappingBehavior.ENDPOINT_INDEPENDENT
        notes.append("only one observer address: endpoint-independent or address-dependent")
        return MappingBehavior.UNKNOWN
    if any(not equal for equal in same_ip_pairs):
        return MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    if same_ip_pairs:
        return MappingBehavior.ADDRESS_DEPENDENT
    notes.append(
        "the mapping depends on the destination; two observer ports on one address are needed "
        "to tell address-dependent from address-and-port-dependent"
    )
    return MappingBehavior.UNKNOWN


def _filtering(probes: list[FilteringProbe], notes: list[str]) -> FilteringBehavior:
    other_addr = [p.arrived for p in probes if p.source == "other-address"]
    other_port = [p.arrived for p in probes if p.source == "other-port"]
    if any(other_addr):
        if other_port and not any(other_port):
            notes.append("a packet from another address arrived but one from another port did not")
        return FilteringBehavior.ENDPOINT_INDEPENDENT
    if other_port and any(other_port):
        if other_addr:
            return FilteringBehavior.ADDRESS_DEPENDENT
        notes.append(
            "filtering: no probe from another address (endpoint-independent or address-dependent)"
        )
        return FilteringBehavior.UNKNOWN
    if other_port:
        return FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT
    if other_addr:
        notes.append(
            "filtering: no probe from another port (address- or address-and-port-dependent)"
        )
    else:
        notes.append("filtering was not tested")
    return FilteringBehavior.UNKNOWN


def _new_mapping_ports(mappings: Iterable[MappingObservation]) -> list[int]:
    seen: set[Address] = set()
    ports: list[int] = []
    for o in mappings:
        if o.mapped not in seen:
            seen.add(o.mapped)
            ports.append(o.mapped[1])
    return ports


def _signed_step(a: int, b: int) -> int:
    d = (b - a) % 65536
    return d - 65536 if d > 32768 else d


def _allocation(
    mapping: MappingBehavior,
    ports: list[int],
    local: Address | None,
    notes: list[str],
) -> tuple[PortAllocation, int | None]:
    if mapping == MappingBehavior.ENDPOINT_INDEPENDENT:
        return PortAllocation.STABLE, None
    if len(ports) < 3:
        if mapping != MappingBehavior.UNKNOWN:
            notes.append("port allocation needs at least three new mappings")
        return PortAllocation.UNKNOWN, None
    if local is not None and all(p == local[1] for p in ports):
        return PortAllocation.PRESERVING, None
    steps = [_signed_step(a, b) for a, b in itertools.pairwise(ports)]
    if steps[0] != 0 and all(s == steps[0] for s in steps):
        return PortAllocation.SEQUENTIAL, steps[0]
    same_direction = all(s > 0 for s in steps) or all(s < 0 for s in steps)
    if same_direction and all(abs(s) <= MAX_SEQUENTIAL_STEP for s in steps):
        counts = Counter(steps)
        best = max(counts.values())
        delta = min((s for s, c in counts.items() if c == best), key=abs)
        notes.append("sequential allocation with gaps (other traffic takes ports in between)")
        return PortAllocation.SEQUENTIAL, delta
    return PortAllocation.RANDOM, None
