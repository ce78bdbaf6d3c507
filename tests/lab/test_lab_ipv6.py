"""Self-test of the IPv6 lab: hosts with global addresses behind stateful firewalls (no NAT).

One lab (``LabSpec(ipv6=True)``) holds the :func:`~tests.lab.netlab.pair_spec6` topology -- peers
``a`` and ``b`` behind ``firewall6`` routers ``ra``/``rb`` and a public ``pub`` -- plus a second
host ``a2`` in ``a``'s LAN, a second public host ``pub2``, a host ``hd`` behind a dual-stack
port-restricted NAT router and a host ``hn`` behind two nested firewalls.  Probe agents
(``probe.py``) run inside; observers are UDP echo servers on ``pub`` (``A1:4000``, ``A1:4001``,
``A2:4000``) and ``pub2`` (``B:4000``), all on IPv6, and a TCP echo on ``A1:4000``.
"""

from __future__ import annotations

import ipaddress
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lab import netlab
from tests.lab.conftest import LabFactory
from tests.lab.netlab import (
    INTERNET6_LINK,
    INTERNET6_NET,
    HostSpec,
    Lab,
    LabSpec,
    Netem,
    RouterSpec,
    pair_spec,
    pair_spec6,
)
from tests.lab.probe import Addr, Probe, UdpSocket
from tests.lab.world import ECHO_PORT, SILENCE, EchoWorld, payloads

pytestmark = pytest.mark.lab

_PAIR = pair_spec6()
WORLD6 = LabSpec(
    routers=[
        *_PAIR.routers,
        RouterSpec("rds", nat="port-restricted"),  # dual stack: NAT44 + IPv6 firewall
        RouterSpec("rfo", nat="firewall6"),
        RouterSpec("rfi", nat="firewall6", upstream="rfo"),
    ],
    hosts=[
        *_PAIR.hosts,
        HostSpec("pub2"),
        HostSpec("a2", router="ra"),
        HostSpec("hd", router="rds"),
        HostSpec("hn", router="rfi"),
    ],
    ipv6=True,
)


class World(EchoWorld):
    def sock(self, node: str, port: int | None = None) -> UdpSocket:
        """A fresh IPv6 UDP socket in ``node`` on a port no earlier test used."""
        return self.probe(node).udp(port=port or next(self.ports), addr="::")

    def addr6(self, node: str) -> str:
        return self.lab.address6(node)

    def endpoint(self, s: UdpSocket) -> Addr:
        """Where ``s`` is reached from anywhere: its host's global address (no NAT)."""
        return self.addr6(s.probe.node), s.port


@pytest.fixture(scope="module")
def world(module_lab_factory: LabFactory) -> World:
    lab = module_lab_factory(WORLD6)
    a1, a2 = lab.host("pub").addresses6
    b = lab.address6("pub2")
    return World.start(lab, a1, a2, b, first_port=30000)


@pytest.fixture(autouse=True)
def _fresh_firewall_state(request: pytest.FixtureRequest) -> None:
    """Every test that uses the shared world starts without conntrack state."""
    if "world" in request.fixturenames:
        w: World = request.getfixturevalue("world")
        if not w.lab.timings.get("teardown"):
            w.lab.reset_nat()


# --------------------------------------------------------------------------------------------
# Spec and topology
# --------------------------------------------------------------------------------------------


def test_spec_validation6() -> None:
    with pytest.raises(ValueError, match="needs LabSpec"):
        Lab(LabSpec(routers=[RouterSpec("x", nat="firewall6")]))
    with pytest.raises(ValueError, match="no NAT to hairpin"):
        Lab(LabSpec(routers=[RouterSpec("x", nat="firewall6", hairpin=True)], ipv6=True))
    ipv4_only = netlab.Host("h", "ns", router=None, addresses=["198.18.0.10"], gateway=None)
    with pytest.raises(netlab.LabError, match="no IPv6 address"):
        _ = ipv4_only.address6


def test_failed_ipv6_build_tears_down(monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(pair_spec6())

    def boom(self: Lab) -> None:
        raise netlab.LabError("injected failure while configuring IPv6")

    monkeypatch.setattr(Lab, "_build_ipv6", boom)
    with pytest.raises(netlab.LabError, match="injected"):
        lab.build()
    assert len(lab.namespaces) == 6
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.prefix)]


def test_topology6(world: World) -> None:
    lab = world.lab
    pub = lab.host("pub")
    assert len(pub.addresses6) == len(pub.addresses) == 2
    for h in lab.hosts.values():
        for a in h.addresses6:
            ip = ipaddress.IPv6Address(a)
            assert ip in INTERNET6_NET
            if h.router is None:
                assert ip in INTERNET6_LINK
                assert h.gateway6 is None
            else:
                router = lab.router(h.router)
                assert router.lan_subnet6 is not None
                assert ip in router.lan_subnet6
                assert h.gateway6 == router.lan_address6
        # Static, global, and not tentative (no duplicate address detection).
        shown = lab.run(h.name, ["ip", "-6", "addr", "show", "dev", h.iface]).stdout
        for a in h.addresses6:
            assert f"inet6 {a}/64 scope global" in shown
        assert "tentative" not in shown
        assert lab.sysctl(h.name, f"net.ipv6.conf.{h.iface}.accept_dad") == "0"
        assert lab.sysctl(h.name, f"net.ipv6.conf.{h.iface}.accept_ra") == "0"
    # Every LAN is its own /64; the IPv6 address ends like its IPv4 twin.
    assert len({str(r.lan_subnet6) for r in lab.routers.values()}) == len(lab.routers)
    assert lab.address6("a").endswith("::" + lab.host("a").address.rsplit(".", 1)[1])
    for r in lab.routers.values():
        assert lab.sysctl(r.name, "net.ipv6.conf.all.forwarding") == "1"
        assert lab.sysctl(r.name, "net.ipv4.ip_forward") == ("1" if r.name == "rds" else "0")
    # The inner firewall's WAN sits in the outer one's LAN, like the IPv4 double NAT.
    rfi, rfo = lab.router("rfi"), lab.router("rfo")
    assert rfo.lan_subnet6 is not None
    assert ipaddress.IPv6Address(rfi.wan_address6) in rfo.lan_subnet6
    assert rfi.wan_gateway6 == rfo.lan_address6
    # No NAT66 anywhere: the ip6 table has no nat chain.
    assert "nat" not in lab.run("ra", ["nft", "list", "table", "ip6", "crustlab"]).stdout


def test_ipv4_lab_still_has_ipv6_disabled(lab_factory: LabFactory) -> None:
    lab = lab_factory(pair_spec("port-restricted", "none"))
    for node in ("a", "ra", "pub", "sw"):
        assert lab.sysctl(node, "net.ipv6.conf.all.disable_ipv6") == "1"
    assert lab.host("a").addresses6 == []
    assert lab.router("ra").wan_address6 is None


# --------------------------------------------------------------------------------------------
# Reaching the internet, and what comes back in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["a", "b", "hd", "hn"])
def test_host_reaches_pub_over_ipv6(world: World, host: str) -> None:
    s = world.sock(host)
    # No NAT: every observer sees the host's own global address and port.
    for echo in (world.echo1, world.echo1c, world.echo2):
        assert s.query(world.addr(echo)) == world.endpoint(s)
    local = next(world.ports)
    assert world.probe(host).tcp_query(world.tcp_echo, port=local) == (world.addr6(host), local)


@pytest.mark.parametrize(("host", "router"), [("a", "ra"), ("hd", "rds"), ("hn", "rfo")])
def test_unsolicited_inbound_udp_and_tcp_are_dropped(world: World, host: str, router: str) -> None:
    lab = world.lab
    before = lab.firewall6_drops(router)
    s = world.sock(host)  # bound, but has never sent anything
    world.echo1.send(world.endpoint(s), "unsolicited", count=3)
    assert payloads(s) == set()
    listener = world.probe(host).tcp_echo("::", next(world.ports))
    observed, error = world.probe("pub").tcp_try((world.addr6(host), listener), timeout=1.0)
    assert observed is None
    assert error is not None
    assert "timed out" in error  # silently dropped, not refused by the host
    # The packets reached the firewall and were dropped there (the outermost one for hn).
    assert lab.firewall6_drops(router) >= before + 4
    # Control: the listener does answer -- from a host that is not outside the firewall.
    if host == "a":
        assert world.probe("a2").tcp_query((world.addr6("a"), listener)) is not None


def test_public_host_is_not_filtered(lab_factory: LabFactory) -> None:
    """A dual-stack ``pair_spec``: ``b`` is public (no router, no firewall), ``a`` is not."""
    lab = lab_factory(pair_spec("port-restricted", "none", ipv6=True))
    pub = Probe.start(lab, "pub").udp(addr="::")
    sa = Probe.start(lab, "a").udp(addr="::")
    sb = Probe.start(lab, "b").udp(addr="::")
    pub.send((lab.address6("b"), sb.port), "to-public")
    pub.send((lab.address6("a"), sa.port), "to-firewalled")
    assert sb.recv_first(2.0) == ((lab.address6("pub"), pub.port), "to-public")
    assert sa.recv(SILENCE) == []


def test_endpoint_dependent_filtering(world: World) -> None:
    s = world.sock("a")
    assert s.query(world.addr(world.echo1)) == world.endpoint(s)  # the only destination
    me = world.endpoint(s)
    world.echo1.send(me, "same", count=2)
    world.echo1b.send(me, "other-port", count=2)
    world.echo1c.send(me, "other-addr", count=2)
    world.echo2.send(me, "other-host", count=2)
    # Address-and-port-dependent, like a port-restricted cone.
    assert payloads(s) == {"same"}
    assert s.query(world.addr(world.echo1)) == me


def test_reset_nat_forgets_firewall_state(world: World) -> None:
    s = world.sock("a")
    s.query(world.addr(world.echo1))
    world.echo1.send(world.endpoint(s), "before")
    assert payloads(s) == {"before"}
    world.lab.reset_nat(["ra"])
    world.echo1.send(world.endpoint(s), "after")
    assert payloads(s) == set()


def test_firewall6_router_forwards_no_ipv4(world: World) -> None:
    a4 = world.probe("a").udp()
    pub4 = world.probe("pub").udp_echo(world.lab.host("pub").address, ECHO_PORT)
    assert a4.try_query(world.addr(pub4), timeout=0.5) is None
    # IPv4 inside the LAN still works, and so does the dual-stack router's NAT44.
    lan_echo = world.probe("a2").udp_echo(world.lab.host("a2").address, ECHO_PORT)
    assert a4.query(world.addr(lan_echo)) == (world.lab.host("a").address, a4.port)
    hd4 = world.probe("hd").udp()
    assert hd4.query(world.addr(pub4)) == (world.lab.router("rds").wan_address, hd4.port)


# --------------------------------------------------------------------------------------------
# Two firewalled hosts reach each other (what crust relies on)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "y"), [("a", "b"), ("b", "hn")])
def test_udp_punch_between_firewalled_hosts(world: World, x: str, y: str) -> None:
    sx, sy = world.sock(x), world.sock(y)
    ex, ey = world.endpoint(sx), world.endpoint(sy)
    sx.send(ey, "x-first")
    # y's firewall has no state for x yet: the first packet is dropped ...
    assert sy.recv(SILENCE) == []
    # ... but it opened x's firewall for y's answer, which in turn opens y's.
    sy.send(ex, "y-first")
    assert sx.recv_first(2.0) == (ey, "y-first")
    sx.send(ey, "x-second")
    assert sy.recv_first(2.0) == (ex, "x-second")
    sy.send(ex, "y-second")
    assert sx.recv_first(2.0) == (ey, "y-second")


def test_tcp_simultaneous_open_between_firewalled_hosts(world: World) -> None:
    a, b = world.probe("a"), world.probe("b")
    port_a, port_b = next(world.ports), next(world.ports)
    peer_a, peer_b = (world.addr6("a"), port_a), (world.addr6("b"), port_b)
    # Without b's cooperation a plain connect is silently dropped by b's firewall.
    observed, error = a.tcp_try(peer_b, port=port_a, timeout=1.0)
    assert observed is None
    assert error is not None
    assert "timed out" in error
    world.lab.reset_nat()
    with ThreadPoolExecutor(max_workers=2) as pool:
        fa = pool.submit(a.tcp_punch, peer_b, port_a, attempts=5, timeout=2.0)
        fb = pool.submit(b.tcp_punch, peer_a, port_b, attempts=5, timeout=2.0)
        ra, rb = fa.result(timeout=60), fb.result(timeout=60)
    assert ra.connected, ra.errors
    assert rb.connected, rb.errors
    # One connection: each side's peer is the other's bound endpoint, and data went both ways.
    assert ra.local == peer_a
    assert ra.peer == peer_b
    assert rb.local == peer_b
    assert rb.peer == peer_a
    assert ra.received == "hello from b"
    assert rb.received == "hello from a"
    print(f"\nTCP simultaneous open: attempts a={ra.attempts} b={rb.attempts}")


def test_pair_spec6_with_netem(lab_factory: LabFactory) -> None:
    """Delay applies to IPv6 frames too, and bulk TCP crosses the firewall and the delayed link."""
    lab = lab_factory(pair_spec6(netem=Netem(delay_ms=20)))
    assert set(lab.hosts) == {"pub", "a", "b"}
    assert {r.nat for r in lab.routers.values()} == {"firewall6"}
    pub6 = lab.address6("pub")
    pub = Probe.start(lab, "pub")
    echo = pub.udp_echo(pub6, ECHO_PORT)
    a = Probe.start(lab, "a")
    s = a.udp(addr="::")
    assert s.query((echo.addr, echo.port)) == (lab.address6("a"), s.port)
    rtt = min(s.query_rtt((echo.addr, echo.port)) for _ in range(3))
    assert 0.035 <= rtt < 1.0, rtt  # 20 ms each way on a's link
    size = 2 << 20
    received, _ = a.tcp_bulk((pub6, pub.tcp_sink(pub6, 5000)), size)
    assert received == size
    assert "ipv6 firewall" in lab.describe()


# --------------------------------------------------------------------------------------------
# STUN over IPv6, teardown
# --------------------------------------------------------------------------------------------


def test_coturn_stun_binding_over_ipv6(world: World, tmp_path: Path) -> None:
    if shutil.which("turnserver") is None:
        pytest.skip("turnserver (coturn) is not installed: apt-get install coturn")
    lab = world.lab
    a1, _ = lab.host("pub").addresses6
    turn = netlab.start_coturn(lab, "pub", tmp_path, addresses=lab.host("pub").addresses6)
    try:
        s = world.sock("a")
        assert s.stun((a1, 3478), timeout=5.0) == world.endpoint(s)
    finally:
        assert turn.stop() is not None


def test_zz_world_teardown_leaves_nothing(world: World) -> None:
    lab = world.lab
    procs = lab.processes
    assert procs
    lab.close()
    print(
        f"\nIPv6 world lab ({len(lab.namespaces)} namespaces): build {lab.timings['build']:.3f}s "
        f"teardown {lab.timings['teardown']:.3f}s"
    )
    assert all(p.returncode is not None for p in procs)
    assert not [ns for ns in netlab.list_namespaces() if ns.startswith(lab.prefix)]
