"""Self-test of the NAT lab: every NAT type behaves as named, using only plain sockets.

One lab holds a router of every type (plus hairpin, double NAT, netem and short-timeout
variants); probes (``probe.py`` agents) run inside the namespaces.  Observers:

* ``pub`` -- UDP echo on ``A1:4000``, ``A1:4001`` and ``A2:4000`` (its second address),
  TCP echo on ``A1:4000``;
* ``pub2`` -- UDP echo on ``B:4000`` (a different public host).
"""

from __future__ import annotations

import ipaddress
import shutil
import time
from pathlib import Path

import pytest

from tests.lab import netlab
from tests.lab.conftest import LabFactory
from tests.lab.netlab import (
    NAT_TYPES,
    HostSpec,
    Lab,
    LabError,
    LabSpec,
    NatType,
    Netem,
    RouterSpec,
    pair_spec,
)
from tests.lab.probe import Addr, Probe, UdpSocket
from tests.lab.world import ECHO_PORT, SILENCE, EchoWorld, payloads

pytestmark = pytest.mark.lab

#: The host that stands for each NAT type (behind its own router, or public for ``none``).
HOST_FOR: dict[NatType, str] = {
    "none": "hno",
    "full-cone": "hfc",
    "restricted": "hrs",
    "port-restricted": "hpr",
    "symmetric": "hsy",
    "symmetric-sequential": "hsq",
}

WORLD = LabSpec(
    routers=[
        RouterSpec("rfc", nat="full-cone"),
        RouterSpec("rrs", nat="restricted"),
        RouterSpec("rpr", nat="port-restricted", hairpin=True),
        RouterSpec("rsy", nat="symmetric"),
        RouterSpec("rsq", nat="symmetric-sequential"),
        RouterSpec("rs3", nat="symmetric-sequential", port_delta=3, port_base=40000),
        RouterSpec("rnh", nat="port-restricted", hairpin=False),
        RouterSpec("rdo", nat="port-restricted"),
        RouterSpec("rdi", nat="full-cone", upstream="rdo"),
        RouterSpec("rto", nat="full-cone", udp_timeout=2, udp_stream_timeout=2),
    ],
    hosts=[
        HostSpec("pub", extra_addresses=1),
        HostSpec("pub2"),
        HostSpec("hno"),
        HostSpec("hfc", router="rfc"),
        HostSpec("hrs", router="rrs"),
        HostSpec("hpr", router="rpr"),
        HostSpec("hpr2", router="rpr"),
        HostSpec("hsy", router="rsy"),
        HostSpec("hsq", router="rsq"),
        HostSpec("hs3", router="rs3"),
        HostSpec("hnh", router="rnh"),
        HostSpec("hnh2", router="rnh"),
        HostSpec("hd", router="rdi"),
        HostSpec("hto", router="rto"),
        HostSpec("hlag", netem=Netem(delay_ms=30)),
    ],
)


class World(EchoWorld):
    def sock(self, node: str, port: int | None = None) -> UdpSocket:
        """A fresh UDP socket in ``node`` on a port no earlier test used."""
        return self.probe(node).udp(port=port if port is not None else next(self.ports))

    def wan(self, router: str) -> str:
        return self.lab.router(router).wan_address

    @property
    def observers(self) -> list[Addr]:
        """A1:4000, A1:4001 (same address other port), B:4000 (other address)."""
        return [self.addr(self.echo1), self.addr(self.echo1b), self.addr(self.echo2)]


@pytest.fixture(scope="module")
def world(module_lab_factory: LabFactory) -> World:
    lab = module_lab_factory(WORLD)
    a1, a2 = lab.host("pub").addresses
    b = lab.host("pub2").address
    return World.start(lab, a1, a2, b, first_port=20000)


@pytest.fixture(autouse=True)
def _fresh_nat_state(request: pytest.FixtureRequest) -> None:
    """Every test that uses the shared world starts without learnt mappings."""
    if "world" in request.fixturenames:
        w: World = request.getfixturevalue("world")
        if not w.lab.timings.get("teardown"):
            w.lab.reset_nat()


# --------------------------------------------------------------------------------------------
# Building and tearing down
# --------------------------------------------------------------------------------------------


def test_build_and_teardown_kills_processes(lab_factory: LabFactory) -> None:
    lab = lab_factory(pair_spec("port-restricted", "symmetric"))
    assert set(lab.namespaces) == {lab.switch_ns} | {
        n.netns for n in [*lab.hosts.values(), *lab.routers.values()]
    }
    assert all(len(ns) < 15 for ns in lab.namespaces)
    live = set(netlab.list_namespaces())
    assert set(lab.namespaces) <= live
    sleeper = lab.spawn("a", ["sleep", "300"])
    grandchild = lab.spawn("pub", ["sh", "-c", "sleep 300 & wait"])
    assert sleeper.poll() is None
    assert grandchild.poll() is None
    echo = Probe.start(lab, "pub").udp_echo(lab.host("pub").address, ECHO_PORT)
    seen = Probe.start(lab, "a").udp(port=33333).query((echo.addr, echo.port))
    assert seen == (lab.router("ra").wan_address, 33333)
    lab.close()
    assert sleeper.returncode is not None
    assert grandchild.returncode is not None
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.prefix)]
    print(f"\npair lab: build {lab.timings['build']:.3f}s teardown {lab.timings['teardown']:.3f}s")


@pytest.mark.parametrize("nat_pair_lab", [("none", "symmetric")], indirect=True)
def test_nat_pair_lab_fixture(nat_pair_lab: Lab) -> None:
    lab = nat_pair_lab
    assert set(lab.hosts) == {"pub", "a", "b"}
    assert list(lab.routers) == ["rb"]
    pub = lab.host("pub")
    echo = Probe.start(lab, "pub").udp_echo(pub.address, ECHO_PORT)
    for peer in ("a", "b"):
        seen = Probe.start(lab, peer).udp().query((echo.addr, echo.port))
        assert seen[0] == lab.public_address(peer)
    assert lab.public_address("a") == lab.host("a").address  # "none": directly on the internet


def test_failed_build_tears_down_half_built_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = LabSpec(
        routers=[RouterSpec("r", nat="full-cone")],
        hosts=[HostSpec("pub"), HostSpec("h", router="r", netem=Netem(delay_ms=5))],
    )
    lab = Lab(spec)

    def boom(*_: object) -> None:
        raise LabError("injected failure after namespaces and links exist")

    monkeypatch.setattr(Lab, "_apply_netem", boom)
    with pytest.raises(LabError, match="injected"):
        lab.build()
    assert len(lab.namespaces) == 4  # all were created before the failure ...
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.prefix)]  # ... and gone


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="unknown router"):
        Lab(LabSpec(hosts=[HostSpec("h", router="nope")]))
    with pytest.raises(ValueError, match="at most"):
        Lab(LabSpec(hosts=[HostSpec("muchtoolongname")]))
    with pytest.raises(ValueError, match="cycle"):
        Lab(LabSpec(routers=[RouterSpec("x", upstream="y"), RouterSpec("y", upstream="x")]))
    with pytest.raises(ValueError, match="nat must be"):
        Lab(LabSpec(routers=[RouterSpec("x", nat="none")]))


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------


def test_topology(world: World) -> None:
    lab = world.lab
    for r in lab.routers.values():
        assert lab.sysctl(r.name, "net.ipv4.ip_forward") == "1"
        assert r.lan_subnet.is_private
    for h in lab.hosts.values():
        if h.router is None:
            assert all(ipaddress.IPv4Address(a) in netlab.INTERNET_NET for a in h.addresses)
        else:
            assert lab.public_address(h) != h.address
    assert lab.router("rdi").wan_address.startswith("10.")  # inner router of the double NAT
    assert lab.public_address("hd") == world.wan("rdo")
    assert [r.name for r in lab.routers_of("hd")] == ["rdi", "rdo"]
    # A public host has no route into private space (only the on-link 198.18.0.0/15).
    res = lab.run("pub", ["ip", "route", "get", lab.host("hpr").address], check=False)
    assert res.returncode != 0
    assert "unreachable" in res.stderr


# --------------------------------------------------------------------------------------------
# Mapping behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nat", NAT_TYPES)
def test_mapping(world: World, nat: NatType) -> None:
    host = HOST_FOR[nat]
    s = world.sock(host)
    seen = [s.query(o) for o in world.observers]
    public = world.lab.public_address(host)
    assert {addr for addr, _ in seen} == {public}
    ports = [port for _, port in seen]
    if nat == "symmetric":
        # Address-and-port-dependent mapping: a new external port per destination.
        assert len(set(ports)) == len(ports), seen
    elif nat == "symmetric-sequential":
        # The same, each new port the previous one plus one.
        assert ports == [ports[0] + i for i in range(len(ports))], seen
    else:
        # Endpoint-independent mapping, with port preservation.
        assert ports == [s.port] * len(ports), seen
    # TCP goes through the same NAT.
    local_tcp = next(world.ports)
    observed_tcp = world.probe(host).tcp_query(world.tcp_echo, port=local_tcp)
    assert observed_tcp is not None
    assert observed_tcp[0] == public
    if nat not in ("symmetric", "symmetric-sequential"):
        assert observed_tcp[1] == local_tcp


def test_symmetric_new_port_for_every_destination(world: World) -> None:
    s = world.sock("hsy")
    destinations = [*world.observers, world.addr(world.echo1c)]
    seen = [s.query(d) for d in destinations]
    assert len({port for _, port in seen}) == len(destinations), seen
    assert {addr for addr, _ in seen} == {world.wan("rsy")}
    # Repeating a destination reuses its (still live) mapping.
    assert s.query(destinations[0]) == seen[0]


@pytest.mark.parametrize(("host", "delta"), [("hsq", 1), ("hs3", 3)])
def test_sequential_new_port_is_the_previous_plus_delta(
    world: World, host: str, delta: int
) -> None:
    """symmetric-sequential: every new flow (another destination, or another socket) gets
    the previous mapping's port plus ``delta``; TCP counts on its own."""
    router = world.lab.routers_of(host)[0].name
    s = world.sock(host)
    destinations = [*world.observers, world.addr(world.echo1c)]
    seen = [s.query(d) for d in destinations]
    assert {addr for addr, _ in seen} == {world.wan(router)}
    p = seen[0][1]
    assert [port for _, port in seen] == [p + delta * i for i in range(4)], seen
    assert s.query(destinations[0]) == seen[0]  # a live mapping is reused, no port taken
    # a new socket to a destination already used by another socket: the next port
    assert world.sock(host).query(destinations[0]) == (world.wan(router), p + 4 * delta)
    # an early packet to the next port does not take it (and does not move the counter)
    world.echo2.send((world.wan(router), p + 5 * delta), "early", count=2)
    time.sleep(0.05)
    late = world.sock(host)
    assert late.query(destinations[1]) == (world.wan(router), p + 5 * delta)
    assert payloads(late, 0.2) == set()
    # TCP has its own counter: two connections, two consecutive ports
    t1 = world.probe(host).tcp_query(world.tcp_echo, port=next(world.ports))
    t2 = world.probe(host).tcp_query(world.tcp_echo, port=next(world.ports))
    assert t1 is not None and t2 is not None
    assert t1[0] == t2[0] == world.wan(router)
    assert t2[1] == t1[1] + delta


def test_port_preservation_and_several_hosts_behind_one_router(world: World) -> None:
    wan = world.wan("rpr")
    for port in (next(world.ports), 54321, 61234):
        assert world.sock("hpr", port).query(world.observers[0]) == (wan, port)
    # Two hosts on the same local port: the second cannot keep it, but still gets one
    # endpoint-independent mapping of its own.
    port = next(world.ports)
    first = world.sock("hpr", port)
    second = world.sock("hpr2", port)
    assert first.query(world.observers[0]) == (wan, port)
    seen2 = {second.query(o) for o in world.observers}
    assert len(seen2) == 1
    ((addr2, port2),) = seen2
    assert addr2 == wan
    assert port2 != port


# --------------------------------------------------------------------------------------------
# Filtering behaviour
# --------------------------------------------------------------------------------------------

EXPECTED_FILTERING: dict[NatType, set[str]] = {
    "none": {"same", "other-port", "other-addr"},
    "full-cone": {"same", "other-port", "other-addr"},  # endpoint-independent
    "restricted": {"same", "other-port"},  # address-dependent
    "port-restricted": {"same"},  # address-and-port-dependent
    "symmetric": {"same"},  # address-and-port-dependent
    "symmetric-sequential": {"same"},  # address-and-port-dependent
}


@pytest.mark.parametrize("nat", NAT_TYPES)
def test_filtering(world: World, nat: NatType) -> None:
    host = HOST_FOR[nat]
    s = world.sock(host)
    mapped = s.query(world.observers[0])  # the only destination this socket ever sent to
    world.echo1.send(mapped, "same", count=2)
    world.echo1b.send(mapped, "other-port", count=2)
    world.echo2.send(mapped, "other-addr", count=2)
    assert payloads(s) == EXPECTED_FILTERING[nat]
    # Unsolicited packets that were dropped did not disturb the mapping.
    assert s.query(world.observers[0]) == mapped


@pytest.mark.parametrize("nat", ["full-cone", "restricted", "port-restricted"])
def test_early_inbound_packet_does_not_steal_the_port(world: World, nat: NatType) -> None:
    """An inbound packet *before* the mapping exists must not move it (input chain drop)."""
    host = HOST_FOR[nat]
    router = world.lab.routers_of(host)[0]
    port = next(world.ports)
    world.echo2.send((router.wan_address, port), "early", count=3)
    time.sleep(0.05)
    s = world.sock(host, port)
    assert s.query(world.observers[0]) == (router.wan_address, port)


def test_reset_nat_forgets_learnt_mappings(world: World) -> None:
    s = world.sock("hfc")
    mapped = s.query(world.observers[0])
    world.echo2.send(mapped, "before")
    assert payloads(s) == {"before"}
    world.lab.reset_nat(["rfc"])
    world.echo2.send(mapped, "after")
    assert payloads(s) == set()
    assert "elements" not in world.lab.nft_list("rfc")


# --------------------------------------------------------------------------------------------
# Hairpinning
# --------------------------------------------------------------------------------------------


def test_hairpin_on(world: World) -> None:
    a, b = world.sock("hpr"), world.sock("hpr2")
    ma, mb = a.query(world.observers[0]), b.query(world.observers[0])
    a.send(mb, "to-b")
    # b sees the packet coming from a's *public* mapping, not from a's LAN address.
    assert b.recv(SILENCE) == [(ma, "to-b")]
    b.send(ma, "to-a")
    assert a.recv(SILENCE) == [(mb, "to-a")]


def test_hairpin_source_is_the_senders_own_mapping(world: World) -> None:
    port = next(world.ports)
    a, b = world.sock("hpr", port), world.sock("hpr2", port)  # b's port cannot be preserved
    ma, mb = a.query(world.observers[0]), b.query(world.observers[0])
    assert mb[1] != port
    b.send(ma, "from-b")
    assert a.recv(SILENCE) == [(mb, "from-b")]


def test_hairpin_off(world: World) -> None:
    a, b = world.sock("hnh"), world.sock("hnh2")
    ma, mb = a.query(world.observers[0]), b.query(world.observers[0])
    assert ma[0] == mb[0] == world.wan("rnh")
    a.send(mb, "to-b", count=2)
    b.send(ma, "to-a", count=2)
    assert b.recv(SILENCE) == []
    assert a.recv(0.05) == []


# --------------------------------------------------------------------------------------------
# Double NAT, netem, timeouts
# --------------------------------------------------------------------------------------------


def test_double_nat(world: World) -> None:
    s = world.sock("hd")
    seen = {s.query(o) for o in world.observers}
    # The internet sees the outer router; both levels are endpoint-independent here.
    assert seen == {(world.wan("rdo"), s.port)}
    # The inner router itself sees its traffic leave from its private WAN address.
    ct = world.lab.conntrack("rdi")
    assert f"src={world.lab.host('hd').address}" in ct
    assert f"dst={world.lab.router('rdi').wan_address}" in ct
    # Filtering is that of the outer (port-restricted) NAT, even though the inner one is a
    # full cone.
    fresh = world.sock("hd")
    mapped = fresh.query(world.observers[0])
    world.echo1.send(mapped, "same")
    world.echo1b.send(mapped, "other-port")
    world.echo2.send(mapped, "other-addr")
    assert payloads(fresh) == {"same"}


def test_netem_delay_and_loss(world: World) -> None:
    s = world.sock("hlag")
    rtt = min(s.query_rtt(world.observers[0]) for _ in range(3))
    assert 0.055 <= rtt < 1.0, rtt  # 30 ms each way
    world.lab.set_netem("hlag", Netem(loss_pct=100))
    assert s.try_query(world.observers[0], timeout=0.4) is None
    world.lab.set_netem("hlag", None)
    assert min(s.query_rtt(world.observers[0]) for _ in range(3)) < 0.03
    world.lab.set_netem("hlag", Netem(delay_ms=30))


def test_tcp_bulk_through_delayed_link_and_nat(world: World) -> None:
    """Large TCP transfers (GSO, checksum offload) cross the impaired link and the NATs."""
    a1 = world.lab.host("pub").address
    sink = (a1, world.probe("pub").tcp_sink(a1, 5000 + next(world.ports) % 1000))
    size = 2 << 20
    for host in ("hlag", "hpr", "hsy", "hd"):
        received, seconds = world.probe(host).tcp_bulk(sink, size)
        assert received == size, host
        assert seconds < 10, host


def test_short_udp_timeouts_expire_mappings(world: World) -> None:
    lab = world.lab
    assert lab.sysctl("rto", "net.netfilter.nf_conntrack_udp_timeout") == "2"
    assert lab.sysctl("rto", "net.netfilter.nf_conntrack_udp_timeout_stream") == "2"
    # The sysctls are per namespace: other routers keep the kernel defaults.
    assert lab.sysctl("rfc", "net.netfilter.nf_conntrack_udp_timeout") != "2"
    s = world.sock("hto")
    mapped = s.query(world.observers[0])
    world.echo2.send(mapped, "live")
    assert payloads(s, 0.3) == {"live"}
    time.sleep(2.6)
    world.echo2.send(mapped, "expired")
    assert payloads(s) == set()
    assert lab.conntrack("rto").count(f"sport={s.port}") == 0


# --------------------------------------------------------------------------------------------
# STUN with coturn
# --------------------------------------------------------------------------------------------


def test_coturn_stun_binding_sees_the_natted_address(world: World, tmp_path: Path) -> None:
    if shutil.which("turnserver") is None:
        pytest.skip("turnserver (coturn) is not installed: apt-get install coturn")
    lab = world.lab
    a1, a2 = lab.host("pub").addresses
    turn = netlab.start_coturn(lab, "pub", tmp_path)
    try:
        s = world.sock("hpr")
        first = s.stun((a1, 3478), timeout=5.0)
        assert first == (world.wan("rpr"), s.port)
        assert first == s.query(world.observers[0])
        assert s.stun((a2, 3478)) == first  # second address (RFC 5780 setup) agrees
        sym = world.sock("hsy")
        mapped = sym.stun((a1, 3478))
        assert mapped is not None
        assert mapped[0] == world.wan("rsy")
        pub = world.sock("hno")
        assert pub.stun((a1, 3478)) == (lab.host("hno").address, pub.port)
    finally:
        assert turn.stop() is not None
    assert (tmp_path / "turnserver.pid").exists()


# --------------------------------------------------------------------------------------------
# Nothing left behind (keep last)
# --------------------------------------------------------------------------------------------


def test_zz_world_teardown_leaves_nothing(world: World) -> None:
    lab = world.lab
    procs = lab.processes
    assert procs, "the world lab should have started probe agents"
    lab.close()
    print(
        f"\nworld lab ({len(lab.namespaces)} namespaces): build {lab.timings['build']:.3f}s "
        f"teardown {lab.timings['teardown']:.3f}s"
    )
    assert all(p.returncode is not None for p in procs)
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.prefix)]
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(netlab.RUN_PREFIX)]
