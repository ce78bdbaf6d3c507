"""NAT classification from synthetic observations: every mapping, filtering and allocation class."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crust.proto.natclass import (
    Address,
    FilteringBehavior,
    FilteringProbe,
    MappingBehavior,
    MappingObservation,
    NatObservations,
    PortAllocation,
    classify,
)

LOCAL: Address = ("10.0.0.2", 40000)
WAN = "198.51.100.10"
# RFC 5780 test destinations: primary IP/port, alternate IP, alternate port
A1P1: Address = ("192.0.2.1", 3478)
A2P1: Address = ("192.0.2.2", 3478)
A2P2: Address = ("192.0.2.2", 3479)
A1P2: Address = ("192.0.2.1", 3479)
RFC5780_ORDER = [A1P1, A2P1, A2P2, A1P2]

EIF = [FilteringProbe("other-address", True)]
ADF = [FilteringProbe("other-address", False), FilteringProbe("other-port", True)]
APDF = [FilteringProbe("other-address", False), FilteringProbe("other-port", False)]


def obs(
    ports: list[int], filtering: list[FilteringProbe] | None = None, **kw: object
) -> NatObservations:
    return NatObservations(
        local=kw.pop("local", LOCAL),  # type: ignore[arg-type]
        mappings=[
            MappingObservation(s, (WAN, p), 0.01)
            for s, p in zip(RFC5780_ORDER, ports, strict=False)
        ],
        filtering=filtering or [],
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("filtering", "behavior", "name"),
    [
        (EIF, FilteringBehavior.ENDPOINT_INDEPENDENT, "full-cone"),
        (ADF, FilteringBehavior.ADDRESS_DEPENDENT, "restricted"),
        (APDF, FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT, "port-restricted"),
    ],
)
def test_cone_nats(filtering: list[FilteringProbe], behavior: FilteringBehavior, name: str) -> None:
    c = classify(obs([40000] * 4, filtering, hairpin=True))
    assert c.behind_nat is True
    assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT
    assert c.filtering == behavior
    assert c.nat_type == name
    assert c.mapped == (WAN, 40000)
    assert c.port_preservation is True
    assert c.hairpinning is True
    assert c.port_allocation == PortAllocation.STABLE
    assert c.predict_ports(3) == [40000]
    assert c.notes == ()


def test_cone_without_port_preservation() -> None:
    c = classify(obs([1025] * 4, APDF))
    assert c.port_preservation is False
    assert c.nat_type == "port-restricted"


def test_address_dependent_mapping() -> None:
    # A1:P1 and A1:P2 share one mapping, A2:* another.
    c = classify(obs([50000, 50001, 50001, 50000], APDF))
    assert c.mapping == MappingBehavior.ADDRESS_DEPENDENT
    assert c.nat_type == "symmetric"
    assert c.port_samples == (50000, 50001)
    assert c.port_allocation == PortAllocation.UNKNOWN  # two new mappings are not enough


def test_address_and_port_dependent_random() -> None:
    c = classify(obs([40000, 61234, 2345, 33333], APDF, hairpin=False))
    assert c.mapping == MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    assert c.filtering == FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT
    assert c.nat_type == "symmetric"
    assert c.port_allocation == PortAllocation.RANDOM
    assert c.port_delta is None
    assert c.predict_ports(2) == []
    assert c.hairpinning is False


@pytest.mark.parametrize("delta", [1, 2, -1, 7, 1000])
def test_sequential_allocation(delta: int) -> None:
    ports = [30000 + delta * k for k in range(4)]
    c = classify(obs(ports, APDF))
    assert c.mapping == MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    assert c.port_allocation == PortAllocation.SEQUENTIAL
    assert c.port_delta == delta
    assert c.predict_ports(2) == [ports[-1] + delta, ports[-1] + 2 * delta]
    assert c.port_preservation is False


def test_sequential_allocation_with_gaps_from_other_traffic() -> None:
    c = classify(obs([30000, 30001, 30004, 30005], APDF))
    assert c.port_allocation == PortAllocation.SEQUENTIAL
    assert c.port_delta == 1
    assert any("gaps" in n for n in c.notes)


def test_sequential_wraps_around_the_port_space() -> None:
    c = classify(obs([65534, 65535, 1024, 1025], APDF))
    # 65535 -> 1024 is a wrap, not a step of -64511 (the steps are +1, -64511, +1 mod 2^16)
    assert c.mapping == MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    assert c.port_allocation in (PortAllocation.SEQUENTIAL, PortAllocation.RANDOM)
    c = classify(obs([65533, 65534, 65535], APDF))
    assert c.port_allocation == PortAllocation.SEQUENTIAL
    assert c.predict_ports(2) == [1024, 1025]


def test_port_preserving_symmetric_nat() -> None:
    """A NAT with several public IPs: a new mapping per destination, always the local port."""
    mappings = [
        MappingObservation(s, (f"198.51.100.{10 + i}", LOCAL[1]))
        for i, s in enumerate(RFC5780_ORDER)
    ]
    c = classify(NatObservations(local=LOCAL, mappings=mappings, filtering=APDF))
    assert c.mapping == MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    assert c.port_allocation == PortAllocation.PRESERVING
    assert c.port_preservation is True


def test_no_nat_and_firewall() -> None:
    public: Address = ("203.0.113.5", 5000)
    mappings = [MappingObservation(s, public) for s in RFC5780_ORDER]
    c = classify(NatObservations(local=public, mappings=mappings, filtering=EIF, hairpin=True))
    assert c.behind_nat is False
    assert c.nat_type == "none"
    c = classify(NatObservations(local=public, mappings=mappings, filtering=APDF))
    assert c.nat_type == "firewall"
    # wildcard socket address: recognised through local_addresses
    c = classify(
        NatObservations(
            local=("0.0.0.0", 5000),
            mappings=mappings[:1],
            local_addresses=["127.0.0.1", "203.0.113.5"],
        )
    )
    assert c.behind_nat is False
    assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT  # nothing is translated
    assert c.nat_type == "none"
    # own IP but another port: a port-translating device
    c = classify(NatObservations(local=("203.0.113.5", 6000), mappings=mappings))
    assert c.behind_nat is True
    assert c.notes


def test_plain_observers_without_filtering_tests() -> None:
    c = classify(obs([40000] * 3))
    assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT
    assert c.filtering == FilteringBehavior.UNKNOWN
    assert c.nat_type == "cone"
    assert "filtering was not tested" in c.notes


def test_incomplete_mapping_evidence() -> None:
    # one observer
    c = classify(obs([40000]))
    assert c.mapping == MappingBehavior.UNKNOWN
    assert c.nat_type == "unknown"
    # two observers on one IP that agree: EIM or ADM
    one_ip = [MappingObservation(A1P1, (WAN, 1)), MappingObservation(A1P2, (WAN, 1))]
    c = classify(NatObservations(local=LOCAL, mappings=one_ip))
    assert c.mapping == MappingBehavior.UNKNOWN
    # ... that disagree: address-and-port-dependent is proven
    one_ip = [MappingObservation(A1P1, (WAN, 1)), MappingObservation(A1P2, (WAN, 2))]
    c = classify(NatObservations(local=LOCAL, mappings=one_ip))
    assert c.mapping == MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
    # two IPs that disagree, no same-IP pair: endpoint-dependent, but which kind is unknown
    two_ips = [MappingObservation(A1P1, (WAN, 1)), MappingObservation(A2P2, (WAN, 2))]
    c = classify(NatObservations(local=LOCAL, mappings=two_ips))
    assert c.mapping == MappingBehavior.UNKNOWN
    assert any("two observer ports" in n for n in c.notes)


def test_no_answer_at_all() -> None:
    c = classify(NatObservations(local=("0.0.0.0", 4000)))
    assert c.mapped is None
    assert c.behind_nat is None
    assert c.nat_type == "unknown"
    assert "no observer answered" in c.notes


def test_unstable_mapping_is_noted() -> None:
    mappings = [
        MappingObservation(A1P1, (WAN, 1)),
        MappingObservation(A2P1, (WAN, 1)),
        MappingObservation(A1P1, (WAN, 9)),
    ]
    c = classify(NatObservations(local=LOCAL, mappings=mappings))
    assert c.mapping == MappingBehavior.ENDPOINT_INDEPENDENT
    assert any("two mappings" in n for n in c.notes)


@pytest.mark.parametrize(
    ("probes", "expected"),
    [
        ([], FilteringBehavior.UNKNOWN),
        ([FilteringProbe("other-address", False)], FilteringBehavior.UNKNOWN),
        ([FilteringProbe("other-port", True)], FilteringBehavior.UNKNOWN),
        ([FilteringProbe("other-port", False)], FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT),
        ([FilteringProbe("other-address", True)], FilteringBehavior.ENDPOINT_INDEPENDENT),
        (ADF, FilteringBehavior.ADDRESS_DEPENDENT),
        (APDF, FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT),
        # a second observer we never sent to reached us: endpoint-independent
        (
            [FilteringProbe("other-port", True), FilteringProbe("other-address", True)],
            FilteringBehavior.ENDPOINT_INDEPENDENT,
        ),
    ],
)
def test_filtering_rules(probes: list[FilteringProbe], expected: FilteringBehavior) -> None:
    assert classify(obs([1, 1], probes)).filtering == expected


def test_inconsistent_filtering_is_noted() -> None:
    c = classify(
        obs([1, 1], [FilteringProbe("other-address", True), FilteringProbe("other-port", False)])
    )
    assert c.filtering == FilteringBehavior.ENDPOINT_INDEPENDENT
    assert c.notes


def test_to_dict_is_json() -> None:
    c = classify(
        NatObservations(
            local=("2001:db8::2", 4000),
            mappings=[
                MappingObservation(("2001:db8:1::1", 3478), ("2001:db8::2", 4000), 0.002),
                MappingObservation(("2001:db8:1::2", 3478), ("2001:db8::2", 4000), 0.003),
            ],
            filtering=EIF,
            hairpin=True,
        )
    )
    d = json.loads(json.dumps(c.to_dict()))
    assert d["nat_type"] == "none"
    assert d["mapped"] == "[2001:db8::2]:4000"
    assert d["mapping"] == "endpoint-independent"
    assert d["filtering"] == "endpoint-independent"
    assert d["hairpinning"] is True
    assert d["observations"][1] == {
        "server": "[2001:db8:1::2]:3478",
        "mapped": "[2001:db8::2]:4000",
        "rtt": 0.003,
    }
    assert d["filtering_probes"] == [{"source": "other-address", "arrived": True}]


addrs = st.tuples(st.ip_addresses(v=4).map(str), st.integers(1, 65535))


@given(
    st.lists(st.tuples(addrs, addrs), max_size=8),
    st.lists(
        st.tuples(st.sampled_from(["other-address", "other-port"]), st.booleans()), max_size=4
    ),
    st.none() | addrs,
    st.none() | st.booleans(),
)
def test_classify_is_total(
    pairs: list[tuple[Address, Address]],
    probes: list[tuple[str, bool]],
    local: Address | None,
    hairpin: bool | None,
) -> None:
    c = classify(
        NatObservations(
            local=local,
            mappings=[MappingObservation(s, m) for s, m in pairs],
            filtering=[FilteringProbe(p, a) for p, a in probes],  # type: ignore[arg-type]
            hairpin=hairpin,
        )
    )
    json.dumps(c.to_dict())
    assert c.nat_type in {
        "none",
        "firewall",
        "full-cone",
        "restricted",
        "port-restricted",
        "cone",
        "symmetric",
        "unknown",
    }
    if c.port_allocation == PortAllocation.SEQUENTIAL:
        assert c.port_delta
        assert all(1024 <= p <= 65535 for p in c.predict_ports(5))
