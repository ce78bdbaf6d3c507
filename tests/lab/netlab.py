"""NAT laboratory: network namespaces, bridges, veth pairs and nftables NAT routers.

A lab is described by a :class:`LabSpec` (routers and hosts) and built by :class:`Lab`::

    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted")],
        hosts=[HostSpec("pub"), HostSpec("ha", router="ra")],
    )
    with Lab(spec) as lab:
        lab.run("ha", ["ip", "route"])                    # a command inside a namespace
        node = lab.spawn_python("ha", ["-m", "crust"])    # tracked, killed on teardown

Topology: one *switch* namespace holds Linux bridges -- ``br0`` is the simulated internet
(198.18.0.0/15), and every router gets its own LAN bridge.  Every other node is a namespace
connected to one bridge (hosts) or two bridges (routers: ``wan0`` upstream, ``lan0`` downstream)
by veth pairs.  Nothing is ever linked to the host's own network namespace.

NAT types are named by their RFC 4787 behaviour (see ``docs/lab.md``):

``none``
    no NAT: a host directly on the internet (``HostSpec(router=None)``).
``full-cone``
    endpoint-independent mapping and filtering.
``restricted``
    endpoint-independent mapping, address-dependent filtering.
``port-restricted``
    endpoint-independent mapping (with port preservation), address-and-port-dependent filtering.
``symmetric``
    address-and-port-dependent mapping (random port per destination) and filtering.
``symmetric-sequential``
    address-and-port-dependent mapping and filtering; every new mapping takes the next port of
    a counter (previous + ``RouterSpec.port_delta``), one counter per protocol.

IPv6 (``LabSpec(ipv6=True)``): the internet also carries 2001:db8::/64 (inside the documentation
prefix 2001:db8::/32) and every router LAN gets a routed /64 (``2001:db8:0:N::/64``) -- no NAT66,
hosts have global addresses.  Every router filters IPv6 like a home router: a stateful ``ip6``
firewall lets in only packets of flows started from inside (see :func:`nftables6_ruleset`).
Routers of the NAT types above are then dual-stack; a router of type ``firewall6`` forwards no
IPv4 at all (an IPv6-only uplink).  :func:`pair_spec6` builds two peers behind such routers.

Every namespace name starts with :data:`RUN_PREFIX` (unique per Python process) followed by a
per-lab id, so parallel runs never collide.  :meth:`Lab.close` (also called on build failure,
from ``atexit`` and on SIGTERM/SIGHUP) kills every process started in the lab and deletes every
namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import IO, Any, Final, Literal, get_args

__all__ = [
    "FIREWALL6",
    "INTERNET6_LINK",
    "INTERNET6_NET",
    "INTERNET_NET",
    "NAT_TYPES",
    "RUN_PREFIX",
    "SEQUENTIAL_SPAN",
    "Host",
    "HostSpec",
    "Lab",
    "LabCommandError",
    "LabError",
    "LabProcess",
    "LabSpec",
    "MiniUpnpd",
    "NatType",
    "Netem",
    "NetemBackend",
    "Node",
    "Router",
    "RouterKind",
    "RouterSpec",
    "cleanup_prefix",
    "coturn_argv",
    "list_namespaces",
    "missing_requirements",
    "nftables6_ruleset",
    "nftables_ruleset",
    "pair_spec",
    "pair_spec6",
    "start_coturn",
    "start_miniupnpd",
]

NatType = Literal[
    "none", "full-cone", "restricted", "port-restricted", "symmetric", "symmetric-sequential"
]
NAT_TYPES: Final[tuple[NatType, ...]] = get_args(NatType)
#: A router's type: one of the IPv4 NAT types, or ``firewall6`` (IPv6 lab only): IPv6 routed
#: through the stateful firewall and no IPv4 forwarding at all.
RouterKind = NatType | Literal["firewall6"]
FIREWALL6: Final = "firewall6"

#: The simulated internet.  198.18.0.0/15 is reserved for benchmarking and never routed.
INTERNET_NET: Final = ipaddress.IPv4Network("198.18.0.0/15")
#: The simulated IPv6 internet (IPv6 labs only), inside the documentation prefix 2001:db8::/32:
#: the internet link itself is :data:`INTERNET6_LINK`; router ``N``'s LAN is 2001:db8:0:N::/64.
INTERNET6_NET: Final = ipaddress.IPv6Network("2001:db8::/48")
INTERNET6_LINK: Final = ipaddress.IPv6Network("2001:db8::/64")

#: Interface names inside the nodes.
HOST_IFACE: Final = "eth0"
WAN_IFACE: Final = "wan0"
LAN_IFACE: Final = "lan0"
INTERNET_BRIDGE: Final = "br0"

#: Every node of an IPv6 lab: IPv6 on, static addresses only -- no duplicate address
#: detection, no router advertisements accepted, no router solicitations sent.
_IPV6_NODE_SYSCTLS: Final[Mapping[str, str | int]] = {
    f"net.ipv6.conf.{scope}.{key}": value
    for scope in ("all", "default")
    for key, value in (
        ("disable_ipv6", 0),
        ("accept_dad", 0),
        ("dad_transmits", 0),
        ("accept_ra", 0),
        ("router_solicitations", 0),
    )
}

_NS_MAX_LEN: Final = 14  # keep names < 15 characters (IFNAMSIZ - 1 is 15)
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9]*$")
_DEFAULT_TIMEOUT: Final = 20.0


def _new_run_prefix() -> str:
    existing = _ns_names_or_empty()
    while True:
        prefix = "nl" + secrets.token_hex(2)
        if not any(name.startswith(prefix) for name in existing):
            return prefix


def _ns_names_or_empty() -> list[str]:
    if shutil.which("ip") is None:
        return []
    try:
        return list_namespaces()
    except (LabError, OSError):
        return []


class LabError(RuntimeError):
    """Building, running or tearing down the lab failed."""


class LabCommandError(LabError):
    """A command run for the lab exited non-zero or timed out."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        what = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{' '.join(argv)!r} {what}: {stderr.strip() or stdout.strip()}")


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = _DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (in its own process group) and capture its output.

    On timeout the whole process group is killed and :class:`LabCommandError` is raised.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(env) if env is not None else None,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise LabCommandError(argv, None, out, err) from None
    except BaseException:
        _kill_group(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise LabCommandError(argv, proc.returncode, out, err)
    return result


def list_namespaces() -> list[str]:
    """Names of all network namespaces known to ``ip netns``."""
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(netns: str) -> list[int]:
    res = run_command(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in res.stdout.split() if tok.isdigit()]


def _kill_ns_processes(namespaces: Sequence[str], grace: float = 1.0) -> None:
    """Kill (by pid) every process still living in one of ``namespaces``."""
    pids = [pid for ns in namespaces for pid in _ns_pids(ns)]
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not [ns for ns in namespaces if _ns_pids(ns)]:
            return
        time.sleep(0.05)
    for pid in [pid for ns in namespaces for pid in _ns_pids(ns)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _delete_namespaces(namespaces: Sequence[str]) -> None:
    if not namespaces:
        return
    existing = set(_ns_names_or_empty())
    todo = [ns for ns in namespaces if ns in existing]
    if not todo:
        return
    _kill_ns_processes(todo)
    script = "".join(f"netns delete {ns}\n" for ns in todo)
    run_command(["ip", "-force", "-batch", "-"], input=script, check=False)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (after killing its processes).

    Meant for leftovers of a crashed run: ``python tests/lab/netlab.py --cleanup nl1a2b``.
    Returns the deleted names.
    """
    if len(prefix) < 4:
        raise ValueError("refusing to clean up with a prefix shorter than 4 characters")
    names = [ns for ns in list_namespaces() if ns.startswith(prefix)]
    _delete_namespaces(names)
    return names


NetemBackend = Literal["tc", "linkemu"]
_netem_backend_cache: NetemBackend | None = None
LINKEMU_PATH: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "linkemu.py")


def _detect_netem_backend(netns: str) -> NetemBackend:
    """``tc`` when the kernel has ``sch_netem``, else the userspace ``linkemu``.

    ``CRUST_LAB_NETEM=tc|linkemu`` forces one.  Probed once per process on the ``lo`` of a
    lab namespace.
    """
    global _netem_backend_cache
    forced = os.environ.get("CRUST_LAB_NETEM", "")
    if forced in ("tc", "linkemu"):
        return "tc" if forced == "tc" else "linkemu"
    if _netem_backend_cache is None:
        probe = ["tc", "-n", netns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]
        if run_command(probe, check=False).returncode == 0:
            run_command(["tc", "-n", netns, "qdisc", "del", "dev", "lo", "root"], check=False)
            _netem_backend_cache = "tc"
        else:
            _netem_backend_cache = "linkemu"
    return _netem_backend_cache


def missing_requirements() -> str | None:
    """Why the lab cannot run here, or ``None`` when it can."""
    if sys.platform != "linux":
        return f"NAT lab needs Linux network namespaces (platform is {sys.platform})"
    if os.geteuid() != 0:
        return "NAT lab needs root (network namespaces, nftables); run the lab tests as root"
    missing = [tool for tool in ("ip", "nft", "conntrack", "tc") if shutil.which(tool) is None]
    if missing:
        return (
            f"NAT lab needs {', '.join(missing)} on PATH "
            "(apt-get install iproute2 nftables conntrack)"
        )
    return None


# --------------------------------------------------------------------------------------------
# Lab description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Netem:
    """``tc netem`` impairment, applied to *both* directions of a link."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    duplicate_pct: float = 0.0
    """A second copy of the frame follows (with its own delay)."""
    reorder_pct: float = 0.0
    """The frame is sent at once, overtaking those held back by the delay (needs a delay)."""

    def tc_args(self) -> list[str]:
        args = ["netem"]
        if self.delay_ms or self.jitter_ms:
            args += ["delay", f"{self.delay_ms}ms"]
            if self.jitter_ms:
                args.append(f"{self.jitter_ms}ms")
        if self.loss_pct:
            args += ["loss", f"{self.loss_pct}%"]
        if self.duplicate_pct:
            args += ["duplicate", f"{self.duplicate_pct}%"]
        if self.reorder_pct:
            args += ["reorder", f"{self.reorder_pct}%"]
        return args

    def linkemu_fields(self) -> dict[str, float]:
        """The impairment as a ``linkemu`` request's fields."""
        return {
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "loss_pct": self.loss_pct,
            "duplicate_pct": self.duplicate_pct,
            "reorder_pct": self.reorder_pct,
        }


@dataclass(frozen=True)
class RouterSpec:
    """A NAT router.  ``upstream`` is ``None`` (WAN on the internet) or another router's name
    (double NAT: this router's WAN sits in that router's LAN).

    In an IPv6 lab every router also routes its LAN's /64 through a stateful IPv6 firewall;
    ``nat="firewall6"`` (IPv6 labs only) is such a router that forwards no IPv4.
    """

    name: str
    nat: RouterKind = "port-restricted"
    upstream: str | None = None
    hairpin: bool = False
    lan_subnet: str | None = None
    #: ``net.netfilter.nf_conntrack_udp_timeout`` / ``..._stream`` in this router (seconds).
    udp_timeout: int | None = None
    udp_stream_timeout: int | None = None
    #: Lifetime of learnt full-cone / restricted / hairpin mappings; default: the UDP stream
    #: timeout (or 120 s).
    mapping_timeout: int | None = None
    wan_netem: Netem | None = None
    #: ``symmetric-sequential`` only: the step between consecutive new mappings' ports, and
    #: the port of the first one (per protocol; the counter wraps after ``SEQUENTIAL_SPAN``
    #: mappings).
    port_delta: int = 1
    port_base: int = 20000


@dataclass(frozen=True)
class HostSpec:
    """A host.  ``router=None`` puts it directly on the internet (NAT type ``none``)."""

    name: str
    router: str | None = None
    #: Additional IPv4 addresses on the same interface (e.g. a second "observer" address).
    extra_addresses: int = 0
    netem: Netem | None = None


@dataclass(frozen=True)
class LabSpec:
    routers: Sequence[RouterSpec] = ()
    hosts: Sequence[HostSpec] = ()
    #: Also build IPv6 (dual stack): global addresses for every node, routed LAN prefixes,
    #: stateful IPv6 firewalls in the routers.  Off: IPv6 is disabled in every namespace.
    ipv6: bool = False


def pair_spec(
    nat_a: NatType,
    nat_b: NatType,
    *,
    hairpin: bool = False,
    netem: Netem | None = None,
    udp_timeout: int | None = None,
    ipv6: bool = False,
) -> LabSpec:
    """Two peers ``a`` and ``b`` behind routers ``ra``/``rb`` of the given NAT types (or public
    for ``none``) plus a public host ``pub`` (rendezvous / STUN / relay).

    ``ipv6=True`` makes it dual-stack: the routers also route IPv6 through their stateful
    firewalls (see :func:`pair_spec6` for IPv6-only uplinks)."""
    routers: list[RouterSpec] = []
    hosts = [HostSpec("pub", extra_addresses=1)]
    for side, nat in (("a", nat_a), ("b", nat_b)):
        if nat == "none":
            hosts.append(HostSpec(side, netem=netem))
        else:
            routers.append(
                RouterSpec(
                    f"r{side}",
                    nat=nat,
                    hairpin=hairpin,
                    udp_timeout=udp_timeout,
                    udp_stream_timeout=udp_timeout,
                )
            )
            hosts.append(HostSpec(side, router=f"r{side}", netem=netem))
    return LabSpec(routers=routers, hosts=hosts, ipv6=ipv6)


def pair_spec6(*, netem: Netem | None = None, udp_timeout: int | None = None) -> LabSpec:
    """Two peers ``a`` and ``b``, each behind its own ``firewall6`` router (``ra``/``rb``):
    global IPv6 addresses, stateful firewalls that drop unsolicited inbound, no IPv4 beyond
    the LAN -- plus a dual-stack public host ``pub`` with two addresses per family.

    Reach ``pub`` at ``lab.address6("pub")``; the peers are at ``lab.address6("a")`` /
    ``lab.address6("b")`` from inside and outside alike (no NAT).
    """
    routers = [
        RouterSpec(r, nat="firewall6", udp_timeout=udp_timeout, udp_stream_timeout=udp_timeout)
        for r in ("ra", "rb")
    ]
    hosts = [
        HostSpec("pub", extra_addresses=1),
        HostSpec("a", router="ra", netem=netem),
        HostSpec("b", router="rb", netem=netem),
    ]
    return LabSpec(routers=routers, hosts=hosts, ipv6=True)


# --------------------------------------------------------------------------------------------
# Built lab objects
# --------------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    netns: str


@dataclass
class Host(Node):
    router: str | None
    addresses: list[str]
    gateway: str | None
    iface: str = HOST_IFACE
    #: Global IPv6 addresses (IPv6 labs only; the same number as IPv4 addresses).
    addresses6: list[str] = field(default_factory=list)
    #: The IPv6 default gateway (the router's LAN address), ``None`` on the internet.
    gateway6: str | None = None

    @property
    def address(self) -> str:
        """The primary IPv4 address."""
        return self.addresses[0]

    @property
    def address6(self) -> str:
        """The primary global IPv6 address (no NAT: also what the internet sees)."""
        if not self.addresses6:
            raise LabError(f"host {self.name!r} has no IPv6 address (use LabSpec(ipv6=True))")
        return self.addresses6[0]


@dataclass
class Router(Node):
    nat: RouterKind
    hairpin: bool
    upstream: str | None
    wan_address: str
    wan_gateway: str | None
    lan_address: str
    lan_subnet: ipaddress.IPv4Network
    mapping_timeout: int
    wan_iface: str = WAN_IFACE
    lan_iface: str = LAN_IFACE
    #: ``symmetric-sequential``: step and first port of the per-protocol port counter.
    port_delta: int = 1
    port_base: int = 20000
    #: IPv6 labs only: WAN address, upstream router's LAN address (``None`` on the internet),
    #: LAN address (``::1`` of the LAN prefix) and the routed LAN prefix.
    wan_address6: str | None = None
    wan_gateway6: str | None = None
    lan_address6: str | None = None
    lan_subnet6: ipaddress.IPv6Network | None = None


@dataclass
class _Link:
    """One veth pair: ``port`` in the switch namespace (on ``bridge``), ``iface`` in ``node``."""

    node: str
    iface: str
    port: str
    bridge: str
    netem: Netem | None


def nftables_ruleset(router: Router) -> str:
    """The nftables ruleset that turns ``router`` into a NAT of its type.

    * port-restricted: ``masquerade`` (conntrack keeps the source port when it is free: EIM
      with port preservation; only replies of tracked flows come in).
    * symmetric: ``masquerade random`` (a new external port per destination).
    * symmetric-sequential: ``snat`` to the WAN address and the next port of a counter
      (``numgen inc``: the nat chain sees only the first packet of a flow, so the counter
      moves once per new mapping), one rule and so one counter per protocol.
    * full-cone / restricted: masquerade plus a dynamic map learnt in postrouting *after*
      srcnat (external proto+port -> internal addr+port, read from the conntrack reply tuple)
      and a DNAT of new inbound WAN packets through it.  For restricted the remote address must
      also be in a dynamic set of (external port, remote address) the mapping has sent to.
    * hairpin: LAN packets to the WAN address are DNATed through the same map and SNATed to the
      sender's own external mapping (or any port of the WAN address for symmetric).
    * input drops unsolicited packets from the WAN, so an early inbound packet cannot create a
      conntrack entry on the router that would steal the port masquerade wants to reuse.
    * firewall6: no NAT and no IPv4 forwarding at all; IPv6 is :func:`nftables6_ruleset`.
    """
    wan, lan, wan_addr = router.wan_iface, router.lan_iface, router.wan_address
    if router.nat == FIREWALL6:
        return "\n".join(
            [
                "table ip crustlab {",
                "  chain input {",
                "    type filter hook input priority filter; policy accept;",
                "    ct state established,related accept",
                f'    iifname "{wan}" drop',
                "  }",
                "  chain forward {",
                "    type filter hook forward priority filter; policy drop;",
                "  }",
                "}",
                "",
            ]
        )
    learn = router.nat in ("full-cone", "restricted") or router.hairpin
    t = router.mapping_timeout
    random = " random" if router.nat == "symmetric" else ""
    endpoint_dependent = router.nat in ("symmetric", "symmetric-sequential")
    tcpudp = "meta l4proto { tcp, udp }"
    lines = ["table ip crustlab {"]
    if learn:
        lines += [
            "  map extmap {",
            "    type inet_proto . inet_service : ipv4_addr . inet_service",
            f"    flags dynamic, timeout; timeout {t}s;",
            "  }",
            "  map intmap {",
            "    type inet_proto . ipv4_addr . inet_service : ipv4_addr . inet_service",
            f"    flags dynamic, timeout; timeout {t}s;",
            "  }",
            "  set peerset {",
            "    type inet_proto . inet_service . ipv4_addr",
            f"    flags dynamic, timeout; timeout {t}s;",
            "  }",
        ]
    lines += [
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    if router.nat == "full-cone":
        lines.append(
            f'    iifname "{wan}" ip daddr {wan_addr} {tcpudp}'
            " dnat ip to meta l4proto . th dport map @extmap"
        )
    elif router.nat == "restricted":
        lines.append(
            f'    iifname "{wan}" ip daddr {wan_addr} {tcpudp}'
            " meta l4proto . th dport . ip saddr @peerset"
            " dnat ip to meta l4proto . th dport map @extmap"
        )
    if router.hairpin:
        lines.append(
            f'    iifname "{lan}" ip daddr {wan_addr} {tcpudp}'
            " dnat ip to meta l4proto . th dport map @extmap"
        )
    lines += ["  }", "  chain postrouting {"]
    lines.append("    type nat hook postrouting priority srcnat; policy accept;")
    if router.hairpin:
        if not endpoint_dependent:
            lines.append(
                f'    iifname "{lan}" oifname "{lan}" ct status dnat {tcpudp}'
                " snat ip to meta l4proto . ip saddr . th sport map @intmap"
            )
        if router.nat == "symmetric-sequential":
            lines += [
                f'    iifname "{lan}" oifname "{lan}" ct status dnat meta l4proto {proto}'
                f" snat ip to {wan_addr}:{_sequential_ports(router)}"
                for proto in ("udp", "tcp")
            ]
        lines.append(
            f'    iifname "{lan}" oifname "{lan}" ct status dnat snat ip to {wan_addr}{random}'
        )
    if router.nat == "symmetric-sequential":
        lines += [
            f'    oifname "{wan}" meta l4proto {proto}'
            f" snat ip to {wan_addr}:{_sequential_ports(router)}"
            for proto in ("udp", "tcp")
        ]
    lines += [f'    oifname "{wan}" masquerade{random}', "  }"]
    if learn:
        lines += [
            "  chain learn {",
            "    type filter hook postrouting priority srcnat + 1; policy accept;",
            f'    oifname "{wan}" ct status snat {tcpudp}'
            " update @extmap { meta l4proto . ct reply proto-dst"
            " : ct original ip saddr . ct original proto-src }"
            " update @intmap { meta l4proto . ct original ip saddr . ct original proto-src"
            " : ct reply ip daddr . ct reply proto-dst }"
            " update @peerset { meta l4proto . ct reply proto-dst . ct original ip daddr }",
            "  }",
        ]
    lines += [
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        f'    iifname "{wan}" drop',
        f'    iifname "{lan}" ip daddr {wan_addr} {tcpudp} drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        "    ct status dnat accept",
        f'    iifname "{wan}" drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


#: Mappings a ``symmetric-sequential`` router hands out before its port counter wraps.
SEQUENTIAL_SPAN: Final = 4096


def _sequential_ports(router: Router) -> str:
    """The nft expression for the next port of a sequential counter: ``numgen inc`` counts
    the flows this rule translated (only a flow's first packet meets a nat chain).  The
    counter goes through a map: ``numgen ... offset`` would give the port in host byte order
    (20000 came out as 8270)."""
    d, base = router.port_delta, router.port_base
    count = min(SEQUENTIAL_SPAN, (65535 - base) // d + 1)
    elements = ", ".join(f"{i} : {base + d * i}" for i in range(count))
    return f"numgen inc mod {count} map {{ {elements} }}"


#: Named nftables counter of unsolicited inbound IPv6 packets a router's firewall dropped.
FIREWALL6_DROP_COUNTER: Final = "inbound_dropped"


def nftables6_ruleset(router: Router) -> str:
    """The ``ip6`` ruleset of every router in an IPv6 lab: a stateful firewall, no NAT66.

    Like a home router (RFC 6092 "simple security"): packets of flows started from the LAN and
    their replies pass, as do ICMPv6 errors about such flows (``related``); everything else
    arriving on the WAN is dropped -- unsolicited TCP, UDP, ICMPv6 echo requests, other
    protocols.  Conntrack matches the full 5-tuple, so filtering is address-and-port-dependent:
    after a host has sent UDP to ``(ip, port)`` only that endpoint can answer.  TCP
    simultaneous open passes: the inbound SYN matches the outbound SYN's conntrack entry.
    Neighbour discovery to the router itself is allowed on the WAN, nothing else that is new.
    Dropped forwarded packets are counted in :data:`FIREWALL6_DROP_COUNTER`.
    """
    wan = router.wan_iface
    lines = [
        "table ip6 crustlab {",
        f"  counter {FIREWALL6_DROP_COUNTER} {{",
        "  }",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        "    ct state established,related accept",
        f'    iifname "{wan}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept',
        f'    iifname "{wan}" drop',
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ct state established,related accept",
        f'    iifname "{wan}" counter name {FIREWALL6_DROP_COUNTER} drop',
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


class LabProcess:
    """A background process running inside a lab namespace (its own process group).

    ``stop()`` (or lab teardown) sends SIGTERM to the group, then SIGKILL after ``grace``.
    """

    def __init__(self, node: str, argv: Sequence[str], popen: subprocess.Popen[str]) -> None:
        self.node = node
        self.argv = list(argv)
        self.popen = popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[str] | None:
        return self.popen.stdin

    @property
    def stdout(self) -> IO[str] | None:
        return self.popen.stdout

    @property
    def stderr(self) -> IO[str] | None:
        return self.popen.stderr

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, grace: float = 2.0) -> int | None:
        """Terminate the process group; returns the exit code.  Idempotent."""
        if self.popen.poll() is None:
            # Not reaped yet, so the pid (== pgid) cannot have been reused.
            _kill_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _kill_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(grace)
        else:
            # The leader is gone; make sure nothing else of its group lingers.
            _kill_group(self.popen.pid, signal.SIGKILL)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.popen.returncode

    def __repr__(self) -> str:
        return f"LabProcess(node={self.node!r}, pid={self.pid}, argv={self.argv!r})"


class _LineAgent:
    """A helper process spoken to in JSON lines (one answer per request)."""

    def __init__(self, proc: LabProcess, what: str) -> None:
        self.proc = proc
        self.what = what
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._request_lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self._read(10.0)
        if not hello.get("ready"):
            raise LabError(f"{what} did not start: {hello}")

    def _pump(self) -> None:
        stream = self.proc.stdout
        try:
            if stream is not None:
                for line in stream:
                    self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise LabError(f"{self.what}: no answer within {timeout}s") from None
        if line is None:
            raise LabError(f"{self.what} exited (rc={self.proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return its answer (``LabError`` unless it is ``ok``)."""
        stdin = self.proc.stdin
        if stdin is None:
            raise LabError(f"{self.what} has no stdin")
        with self._request_lock:
            stdin.write(json.dumps(dict(request)) + "\n")
            stdin.flush()
            answer = self._read(10.0)
        if not answer.get("ok"):
            raise LabError(f"{self.what}: {answer.get('error')}")
        return answer

    def configure(self, request: Mapping[str, Any]) -> None:
        self.request(request)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2.0)
        self.proc.stop()


# --------------------------------------------------------------------------------------------
# Registry for atexit / signal teardown
# --------------------------------------------------------------------------------------------

_live_labs: set[Lab] = set()
_registry_lock = threading.RLock()  # re-entered by signal handlers
_handlers_installed = False
_used_lab_ids: set[str] = set()
_lab_counter = 0


def _close_all_labs() -> None:
    with _registry_lock:
        labs = list(_live_labs)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _kill_all_labs() -> None:
    """Teardown from a signal handler: no graceful cleanups (the interrupted frame may hold
    their locks), SIGKILL every tracked process group, delete the namespaces."""
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab._teardown(graceful=False)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _kill_all_labs()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_previous_handlers: dict[int, Any] = {}


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    atexit.register(_close_all_labs)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(sig)
            if current is signal.SIG_IGN:
                continue
            _previous_handlers[sig] = current
            signal.signal(sig, _on_signal)
    _handlers_installed = True


def _new_lab_id() -> str:
    global _lab_counter
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    with _registry_lock:
        for _ in range(len(digits)):
            lab_id = digits[_lab_counter % len(digits)]
            _lab_counter += 1
            if lab_id not in _used_lab_ids:
                _used_lab_ids.add(lab_id)
                return lab_id
    raise LabError("too many labs alive at once (36)")


RUN_PREFIX: Final[str] = _new_run_prefix()


# --------------------------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    hosts: dict[str, Host] = field(default_factory=dict)
    routers: dict[str, Router] = field(default_factory=dict)
    links: list[_Link] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    #: IPv6 labs: ``ip`` commands (routes) per node name, applied after the addresses.
    routes6: dict[str, list[str]] = field(default_factory=dict)


def _v6_text(value: int) -> str:
    """``value`` written with decimal digits as one IPv6 group (12 -> "12", i.e. 0x12), so an
    IPv6 address ends like its IPv4 twin."""
    if not 0 <= value <= 9999:
        raise ValueError(f"cannot mirror {value} into one IPv6 group")
    return str(value)


def _plan_ipv6(plan: _Plan) -> None:
    """Give every node of ``plan`` IPv6 addresses mirroring its IPv4 ones, plus routes.

    * internet (``2001:db8::/64``): ``198.18.T.N`` -> ``2001:db8::T:N`` (``2001:db8::N`` for T=0);
    * LAN of the N-th router (``2001:db8:0:N::/64``): the K-th address of its IPv4 LAN ->
      ``2001:db8:0:N::K`` (the router itself is ``::1``).

    Routing is static, as a provider would do it: every node on a link gets a route to each
    prefix behind each *other* router whose WAN is on that link (its LAN, and the LANs of the
    routers below it), via that router's WAN address; nodes in a LAN get a default route via
    the LAN's router.  Public nodes have no default route (like IPv4).
    """
    net4 = int(INTERNET_NET.network_address)
    index = {name: n for n, name in enumerate(plan.routers, start=1)}

    def public6(addr4: str) -> str:
        offset = int(ipaddress.IPv4Address(addr4)) - net4
        third, last = divmod(offset, 256)
        body = f"{_v6_text(third)}:{_v6_text(last)}" if third else _v6_text(last)
        return str(ipaddress.IPv6Address(f"{INTERNET6_LINK.network_address}{body}"))

    def lan6(router: str, addr4: str) -> str:
        r = plan.routers[router]
        offset = int(ipaddress.IPv4Address(addr4)) - int(r.lan_subnet.network_address)
        return str(
            ipaddress.IPv6Address(f"2001:db8:0:{_v6_text(index[router])}::{_v6_text(offset)}")
        )

    def addr6(link: str | None, addr4: str) -> str:
        return public6(addr4) if link is None else lan6(link, addr4)

    for name, r in plan.routers.items():
        r.lan_subnet6 = ipaddress.IPv6Network(f"2001:db8:0:{_v6_text(index[name])}::/64")
        r.lan_address6 = lan6(name, r.lan_address)
        r.wan_address6 = addr6(r.upstream, r.wan_address)
        if r.upstream is not None:
            r.wan_gateway6 = plan.routers[r.upstream].lan_address6
    for h in plan.hosts.values():
        h.addresses6 = [addr6(h.router, a) for a in h.addresses]
        if h.router is not None:
            h.gateway6 = plan.routers[h.router].lan_address6

    def behind(router: str) -> list[ipaddress.IPv6Network]:
        r = plan.routers[router]
        assert r.lan_subnet6 is not None
        nets = [r.lan_subnet6]
        for child in plan.routers.values():
            if child.upstream == router:
                nets += behind(child.name)
        return nets

    # (node, link it is attached to (None = internet), interface, default gateway)
    attached: list[tuple[str, str | None, str, str | None]] = []
    for r in plan.routers.values():
        attached.append((r.name, r.upstream, r.wan_iface, r.wan_gateway6))
        attached.append((r.name, r.name, r.lan_iface, None))
    for h in plan.hosts.values():
        attached.append((h.name, h.router, h.iface, h.gateway6))
    for node, link, iface, gateway in attached:
        cmds = plan.routes6.setdefault(node, [])
        for other in plan.routers.values():
            if other.upstream == link and other.name != node:
                cmds += [
                    f"route add {net} via {other.wan_address6} dev {iface}"
                    for net in behind(other.name)
                ]
        if gateway is not None:
            cmds.append(f"route add ::/0 via {gateway} dev {iface}")


class Lab:
    """A NAT laboratory built from a :class:`LabSpec`.

    Use as a context manager, or call :meth:`build` and then (always) :meth:`close`.
    """

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.lab_id = _new_lab_id()
        self.prefix = f"{RUN_PREFIX}{self.lab_id}-"
        self.switch_ns = f"{self.prefix}sw"
        self._plan = self._make_plan(spec)
        self._namespaces: list[str] = []
        self._processes: list[LabProcess] = []
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._built = False
        self._closed = False
        self._torn_down = False
        self._netem_backend: NetemBackend | None = None
        self._wired: set[str] = set()
        self._linkemu_agent: _LineAgent | None = None
        #: Measured seconds: ``build`` and ``teardown``.
        self.timings: dict[str, float] = {}

    # ---- planning -----------------------------------------------------------------------

    def _ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _make_plan(self, spec: LabSpec) -> _Plan:
        max_len = _NS_MAX_LEN - len(self.prefix)
        names: set[str] = set()
        items: list[RouterSpec | HostSpec] = [*spec.routers, *spec.hosts]
        for item in items:
            if not _NAME_RE.match(item.name) or len(item.name) > max_len:
                raise ValueError(
                    f"node name {item.name!r} must match [a-z][a-z0-9]* and have at most "
                    f"{max_len} characters"
                )
            if item.name in names or item.name == "sw":
                raise ValueError(f"duplicate or reserved node name {item.name!r}")
            names.add(item.name)
        router_specs = {r.name: r for r in spec.routers}
        for r in spec.routers:
            if r.nat == FIREWALL6:
                if not spec.ipv6:
                    raise ValueError(f"router {r.name!r}: nat 'firewall6' needs LabSpec(ipv6=True)")
                if r.hairpin:
                    raise ValueError(f"router {r.name!r}: a firewall6 router has no NAT to hairpin")
            elif r.nat not in NAT_TYPES or r.nat == "none":
                raise ValueError(
                    f"router {r.name!r}: nat must be one of {NAT_TYPES[1:]} "
                    "(a host with router=None is NAT type 'none')"
                )
            if not 1 <= r.port_delta <= 64 or not 1024 <= r.port_base <= 65535 - r.port_delta:
                raise ValueError(
                    f"router {r.name!r}: port_delta must be 1..64 and port_base 1024..65535"
                )
            if r.upstream is not None and r.upstream not in router_specs:
                raise ValueError(f"router {r.name!r}: unknown upstream router {r.upstream!r}")
        for h in spec.hosts:
            if h.router is not None and h.router not in router_specs:
                raise ValueError(f"host {h.name!r}: unknown router {h.router!r}")

        # Order routers so that upstreams come first (and reject cycles).
        ordered: list[RouterSpec] = []
        depth: dict[str, int] = {}

        def visit(r: RouterSpec, trail: tuple[str, ...]) -> int:
            if r.name in trail:
                raise ValueError(f"router cycle: {' -> '.join((*trail, r.name))}")
            if r.name in depth:
                return depth[r.name]
            d = 0 if r.upstream is None else visit(router_specs[r.upstream], (*trail, r.name)) + 1
            depth[r.name] = d
            ordered.append(r)
            return d

        for r in spec.routers:
            visit(r, ())

        plan = _Plan(bridges=[INTERNET_BRIDGE])
        port_counter = iter(range(1, 10_000))
        public_hosts = iter(range(10, 255))
        lan_next: dict[str, int] = {}
        lan_extra_next: dict[str, int] = {}
        lan_bridge: dict[str, str] = {}
        subnets: dict[str, ipaddress.IPv4Network] = {}
        used_subnets: set[ipaddress.IPv4Network] = set()

        def public_addr(extra: int = 0) -> tuple[str, list[str]]:
            idx = next(public_hosts, None)
            if idx is None:
                raise ValueError("too many public nodes (max 245)")
            base = int(INTERNET_NET.network_address)
            primary = str(ipaddress.IPv4Address(base + idx))
            extras = [str(ipaddress.IPv4Address(base + 256 * (j + 1) + idx)) for j in range(extra)]
            return primary, extras

        def lan_addr(router: str) -> str:
            n = lan_next[router]
            lan_next[router] = n + 1
            if n >= 100:
                raise ValueError(f"too many nodes in the LAN of {router!r}")
            return str(subnets[router].network_address + n)

        def lan_extra(router: str) -> str:
            n = lan_extra_next[router]
            lan_extra_next[router] = n + 1
            if n >= 250:
                raise ValueError(f"too many extra addresses in the LAN of {router!r}")
            return str(subnets[router].network_address + n)

        for n, r in enumerate(ordered, start=1):
            if r.lan_subnet is not None:
                subnet = ipaddress.IPv4Network(r.lan_subnet)
                if not subnet.is_private or subnet.prefixlen > 24 or subnet.overlaps(INTERNET_NET):
                    raise ValueError(f"router {r.name!r}: LAN must be a private /24 or larger")
            elif depth[r.name] == 0:
                subnet = ipaddress.IPv4Network(f"10.{n}.0.0/24")
            else:
                subnet = ipaddress.IPv4Network(f"192.168.{n}.0/24")
            if any(subnet.overlaps(s) for s in used_subnets):
                raise ValueError(f"router {r.name!r}: LAN {subnet} overlaps another LAN")
            used_subnets.add(subnet)
            subnets[r.name] = subnet
            lan_next[r.name] = 2
            lan_extra_next[r.name] = 100
            lan_bridge[r.name] = f"br{n}"
            plan.bridges.append(f"br{n}")
            if r.upstream is None:
                wan_address, _ = public_addr()
                wan_gateway: str | None = None
                wan_bridge = INTERNET_BRIDGE
            else:
                wan_address = lan_addr(r.upstream)
                wan_gateway = plan.routers[r.upstream].lan_address
                wan_bridge = lan_bridge[r.upstream]
            if r.mapping_timeout is not None:
                mapping_timeout = r.mapping_timeout
            else:
                mapping_timeout = r.udp_stream_timeout or 120
            plan.routers[r.name] = Router(
                name=r.name,
                netns=self._ns(r.name),
                nat=r.nat,
                hairpin=r.hairpin,
                upstream=r.upstream,
                wan_address=wan_address,
                wan_gateway=wan_gateway,
                lan_address=str(subnet.network_address + 1),
                lan_subnet=subnet,
                mapping_timeout=mapping_timeout,
                port_delta=r.port_delta,
                port_base=r.port_base,
            )
            plan.links.append(
                _Link(r.name, WAN_IFACE, f"p{next(port_counter)}", wan_bridge, r.wan_netem)
            )
            plan.links.append(
                _Link(r.name, LAN_IFACE, f"p{next(port_counter)}", lan_bridge[r.name], None)
            )

        for h in spec.hosts:
            if h.router is None:
                primary, extras = public_addr(h.extra_addresses)
                gateway: str | None = None
                bridge = INTERNET_BRIDGE
            else:
                primary = lan_addr(h.router)
                extras = [lan_extra(h.router) for _ in range(h.extra_addresses)]
                gateway = plan.routers[h.router].lan_address
                bridge = lan_bridge[h.router]
            plan.hosts[h.name] = Host(
                name=h.name,
                netns=self._ns(h.name),
                router=h.router,
                addresses=[primary, *extras],
                gateway=gateway,
            )
            plan.links.append(_Link(h.name, HOST_IFACE, f"p{next(port_counter)}", bridge, h.netem))
        if spec.ipv6:
            _plan_ipv6(plan)
        return plan

    # ---- lookup -------------------------------------------------------------------------

    @property
    def hosts(self) -> dict[str, Host]:
        return dict(self._plan.hosts)

    @property
    def routers(self) -> dict[str, Router]:
        return dict(self._plan.routers)

    @property
    def namespaces(self) -> list[str]:
        """Namespaces created so far (switch first)."""
        return list(self._namespaces)

    def host(self, name: str) -> Host:
        try:
            return self._plan.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in this lab") from None

    def router(self, name: str) -> Router:
        try:
            return self._plan.routers[name]
        except KeyError:
            raise KeyError(f"no router {name!r} in this lab") from None

    def node(self, name: str) -> Node:
        if name in self._plan.hosts:
            return self._plan.hosts[name]
        return self.router(name)

    def _netns_of(self, node: str | Node) -> str:
        if isinstance(node, Node):
            return node.netns
        if node == "sw":
            return self.switch_ns
        return self.node(node).netns

    def public_address(self, host: str | Host) -> str:
        """The address the internet sees for ``host`` (its outermost router's WAN address)."""
        h = host if isinstance(host, Host) else self.host(host)
        if h.router is None:
            return h.address
        r = self.router(h.router)
        while r.upstream is not None:
            r = self.router(r.upstream)
        return r.wan_address

    def address6(self, host: str | Host) -> str:
        """The global IPv6 address of ``host`` (IPv6 labs).  There is no NAT66: the host binds
        it, and the internet -- or a peer behind another firewall -- sees and reaches it."""
        h = host if isinstance(host, Host) else self.host(host)
        return h.address6

    def firewall6_drops(self, router: str) -> int:
        """How many unsolicited inbound IPv6 packets ``router``'s firewall has dropped."""
        out = self.run(
            router, ["nft", "list", "counter", "ip6", "crustlab", FIREWALL6_DROP_COUNTER]
        ).stdout
        match = re.search(r"packets (\d+)", out)
        if match is None:
            raise LabError(f"no packet count in {out!r}")
        return int(match.group(1))

    def routers_of(self, host: str | Host) -> list[Router]:
        """The routers between ``host`` and the internet, innermost first."""
        h = host if isinstance(host, Host) else self.host(host)
        chain: list[Router] = []
        name = h.router
        while name is not None:
            r = self.router(name)
            chain.append(r)
            name = r.upstream
        return chain

    # ---- building -----------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def build(self) -> Lab:
        """Create namespaces, links, addresses, routes and NAT rules.

        On any failure everything created so far is torn down before the error propagates.
        """
        if self._built or self._closed:
            raise LabError("a Lab can be built only once")
        self._built = True
        with _registry_lock:
            _live_labs.add(self)
        _install_handlers()
        start = time.monotonic()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.timings["build"] = time.monotonic() - start
        return self

    def _add_namespace(self, ns: str) -> None:
        self._namespaces.append(ns)  # recorded first: teardown tolerates a missing namespace
        run_command(["ip", "netns", "add", ns])

    def _sysctl(self, ns: str, settings: Mapping[str, str | int]) -> None:
        args = [f"{key}={value}" for key, value in settings.items()]
        run_command(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *args])

    def _batch(self, ns: str, commands: Sequence[str], tool: str = "ip") -> None:
        if commands:
            run_command([tool, "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")

    def _build(self) -> None:
        plan = self._plan
        no_ipv6 = {
            "net.ipv6.conf.all.disable_ipv6": 1,
            "net.ipv6.conf.default.disable_ipv6": 1,
        }
        base_sysctls = _IPV6_NODE_SYSCTLS if self.spec.ipv6 else no_ipv6
        self._add_namespace(self.switch_ns)
        switch_sysctls: dict[str, str | int] = dict(no_ipv6)  # bridges need no IPv6 of their own
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
            # Bridged frames in the switch must not meet any netfilter hook.
            switch_sysctls["net.bridge.bridge-nf-call-iptables"] = 0
        if self.spec.ipv6 and os.path.exists("/proc/sys/net/bridge/bridge-nf-call-ip6tables"):
            switch_sysctls["net.bridge.bridge-nf-call-ip6tables"] = 0
        self._sysctl(self.switch_ns, switch_sysctls)
        for node in [*plan.routers.values(), *plan.hosts.values()]:
            self._add_namespace(node.netns)
            settings: dict[str, str | int] = dict(base_sysctls)
            if isinstance(node, Router):
                settings["net.ipv4.ip_forward"] = 0 if node.nat == FIREWALL6 else 1
                if self.spec.ipv6:
                    settings["net.ipv6.conf.all.forwarding"] = 1
            self._sysctl(node.netns, settings)

        # Switch: bridges and the switch end of every veth pair (the peer goes straight into
        # the node's namespace; nothing is ever created in the caller's namespace).
        sw: list[str] = ["link set lo up"]
        # IPv6 labs: no multicast snooping, so neighbour discovery is plainly flooded.
        snooping = " mcast_snooping 0" if self.spec.ipv6 else ""
        for br in plan.bridges:
            sw.append(f"link add {br} type bridge forward_delay 0 stp_state 0{snooping}")
            sw.append(f"link set {br} up")
        for link in plan.links:
            sw.append(
                f"link add {link.port} type veth peer name {link.iface} netns {self._ns(link.node)}"
            )
            sw.append(f"link set {link.port} master {link.bridge} up")
        self._batch(self.switch_ns, sw)

        internet_len = INTERNET_NET.prefixlen
        for r in plan.routers.values():
            if r.upstream is None:
                wan_prefix = internet_len
            else:
                wan_prefix = self.router(r.upstream).lan_subnet.prefixlen
            cmds = [
                "link set lo up",
                f"addr add {r.wan_address}/{wan_prefix} dev {r.wan_iface}",
                f"link set {r.wan_iface} up",
                f"addr add {r.lan_address}/{r.lan_subnet.prefixlen} dev {r.lan_iface}",
                f"link set {r.lan_iface} up",
            ]
            if r.wan_gateway is not None:
                cmds.append(f"route add default via {r.wan_gateway} dev {r.wan_iface}")
            self._batch(r.netns, cmds)
            run_command(
                ["ip", "netns", "exec", r.netns, "nft", "-f", "-"], input=nftables_ruleset(r)
            )
            spec = next(s for s in self.spec.routers if s.name == r.name)
            ct: dict[str, str | int] = {}
            if spec.udp_timeout is not None:
                ct["net.netfilter.nf_conntrack_udp_timeout"] = spec.udp_timeout
            if spec.udp_stream_timeout is not None:
                ct["net.netfilter.nf_conntrack_udp_timeout_stream"] = spec.udp_stream_timeout
            if ct:
                self._sysctl(r.netns, ct)

        for h in plan.hosts.values():
            if h.router is None:
                prefix = internet_len
            else:
                prefix = self.router(h.router).lan_subnet.prefixlen
            cmds = ["link set lo up"]
            cmds += [f"addr add {a}/{prefix} dev {h.iface}" for a in h.addresses]
            cmds.append(f"link set {h.iface} up")
            if h.gateway is not None:
                cmds.append(f"route add default via {h.gateway} dev {h.iface}")
            self._batch(h.netns, cmds)

        if self.spec.ipv6:
            self._build_ipv6()

        for link in plan.links:
            if link.netem is not None:
                self._apply_netem(link, link.netem)

    def _build_ipv6(self) -> None:
        """Addresses (no DAD), routes and the ``ip6`` firewall of every node (IPv6 labs)."""
        plan = self._plan
        for r in plan.routers.values():
            if r.upstream is None:
                wan_prefix = INTERNET6_LINK.prefixlen
            else:
                upstream6 = self.router(r.upstream).lan_subnet6
                assert upstream6 is not None
                wan_prefix = upstream6.prefixlen
            assert r.lan_subnet6 is not None
            cmds = [
                f"addr add {r.wan_address6}/{wan_prefix} dev {r.wan_iface} nodad",
                f"addr add {r.lan_address6}/{r.lan_subnet6.prefixlen} dev {r.lan_iface} nodad",
                *plan.routes6.get(r.name, []),
            ]
            self._batch(r.netns, cmds)
            run_command(
                ["ip", "netns", "exec", r.netns, "nft", "-f", "-"], input=nftables6_ruleset(r)
            )
        for h in plan.hosts.values():
            if h.router is None:
                prefix = INTERNET6_LINK.prefixlen
            else:
                lan6 = self.router(h.router).lan_subnet6
                assert lan6 is not None
                prefix = lan6.prefixlen
            # The kernel lists the newest global address first and prefers it as a source on
            # a tie, so the primary address is added last.
            cmds = [f"addr add {a}/{prefix} dev {h.iface} nodad" for a in reversed(h.addresses6)]
            self._batch(h.netns, [*cmds, *plan.routes6.get(h.name, [])])

    @property
    def netem_backend(self) -> NetemBackend:
        """``"tc"`` (kernel ``sch_netem``) or ``"linkemu"`` (userspace fallback, see linkemu.py)."""
        if self._netem_backend is None:
            self._netem_backend = _detect_netem_backend(self.switch_ns)
        return self._netem_backend

    def _apply_netem(self, link: _Link, netem: Netem | None) -> None:
        if self.netem_backend == "tc":
            for ns, dev in ((self._ns(link.node), link.iface), (self.switch_ns, link.port)):
                if netem is None:
                    run_command(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                else:
                    run_command(
                        ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *netem.tc_args()]
                    )
            return
        if link.port not in self._wired:
            if netem is None:
                return
            # Take the switch port off its bridge and splice the emulator in between:
            #   node eth0 <-> pN ==linkemu== pNw <-> pNb (in the bridge)
            # The two interfaces that send into the emulator (the node's, and pNb) cut GSO
            # super-frames into packets themselves (gso_max_segs 1), so the emulator loses,
            # delays and duplicates packets one by one, as a real link would, rather than
            # whole bursts of a TCP or UDP GSO send.
            w, b = f"{link.port}w", f"{link.port}b"
            self._batch(
                self.switch_ns,
                [
                    f"link set {link.port} nomaster",
                    f"link add {w} type veth peer name {b}",
                    f"link set {b} gso_max_segs 1",
                    f"link set {b} master {link.bridge} up",
                    f"link set {w} up",
                ],
            )
            self._batch(self._ns(link.node), [f"link set {link.iface} gso_max_segs 1"])
            self._wired.add(link.port)
        impairment = netem or Netem()
        self._linkemu().configure(
            {"a": link.port, "b": f"{link.port}w", **impairment.linkemu_fields()}
        )

    def _linkemu(self) -> _LineAgent:
        if self._linkemu_agent is None:
            proc = self.spawn_python(
                "sw", ["-u", LINKEMU_PATH], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self._linkemu_agent = _LineAgent(proc, "linkemu")
            self.add_cleanup(self._linkemu_agent.close)
        return self._linkemu_agent

    def linkemu_stats(self) -> dict[str, Any]:
        """The link emulator's counters per impaired link, keyed by node (``{}`` without one).

        For each: ``to_node`` and ``from_node`` with frames in/out, lost, duplicated,
        reordered, overflowed, queued (now and at most), send errors and the kernel's drops.
        """
        if self._linkemu_agent is None:
            return {}
        raw = self._linkemu_agent.request({"cmd": "stats"})["stats"]
        by_port = {link.port: link for link in self._plan.links}
        out: dict[str, Any] = {}
        for port, entry in raw.items():
            link = by_port.get(port)
            name = port if link is None else f"{link.node}:{link.iface}"
            out[name] = {
                "impairment": entry["impairment"],
                "from_node": entry["a_to_b"],
                "to_node": entry["b_to_a"],
            }
        return out

    def set_netem(self, node: str | Node, netem: Netem | None, iface: str | None = None) -> None:
        """Change (or with ``None`` remove) the impairment on a node's link, both directions.

        ``iface`` defaults to ``eth0`` for hosts and ``wan0`` for routers.
        """
        name = node.name if isinstance(node, Node) else node
        n = self.node(name)
        dev = iface or (WAN_IFACE if isinstance(n, Router) else HOST_IFACE)
        for link in self._plan.links:
            if link.node == name and link.iface == dev:
                self._apply_netem(link, netem)
                return
        raise KeyError(f"{name!r} has no link {dev!r}")

    # ---- running things -----------------------------------------------------------------

    def exec_argv(self, node: str | Node, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``node``'s namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self._netns_of(node), *argv]

    def run(
        self,
        node: str | Node,
        argv: Sequence[str],
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``node`` (``"sw"`` is the switch) and capture its output."""
        self._require_running()
        return run_command(
            self.exec_argv(node, argv), timeout=timeout, check=check, input=input, env=env
        )

    def spawn(
        self,
        node: str | Node,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> LabProcess:
        """Start a background process inside ``node``; it is killed (by pid) on teardown.

        Text mode, line buffered.  Pass ``stdout=open(path, "w")`` to log to a file.
        """
        self._require_running()
        full = self.exec_argv(node, argv)
        with self._lock:
            popen = subprocess.Popen(
                full,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                text=True,
                bufsize=1,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
            proc = LabProcess(node.name if isinstance(node, Node) else node, argv, popen)
            self._processes.append(proc)
        return proc

    def spawn_python(self, node: str | Node, args: Sequence[str], **kwargs: Any) -> LabProcess:
        """:meth:`spawn` the current interpreter (the venv python) with ``args``."""
        return self.spawn(node, [sys.executable, *args], **kwargs)

    @property
    def processes(self) -> list[LabProcess]:
        return list(self._processes)

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` at teardown, before processes are killed (last added runs first)."""
        self._cleanups.append(fn)

    def _require_running(self) -> None:
        if not self._built or self._closed:
            raise LabError("the lab is not built (or already closed)")

    # ---- NAT state ----------------------------------------------------------------------

    def reset_nat(self, routers: Sequence[str] | None = None) -> None:
        """Forget all NAT state: flush conntrack and the learnt maps in every router.

        Flushing conntrack also closes every IPv6 firewall again (both families are flushed).

        Call between trials, otherwise the next trial inherits old mappings.
        """
        self._require_running()
        for name in routers if routers is not None else list(self._plan.routers):
            r = self.router(name)
            if r.nat in ("full-cone", "restricted") or r.hairpin:
                flush = "".join(
                    f"flush {kind} ip crustlab {obj}\n"
                    for kind, obj in (("map", "extmap"), ("map", "intmap"), ("set", "peerset"))
                )
                run_command(["ip", "netns", "exec", r.netns, "nft", "-f", "-"], input=flush)
            # Flush conntrack only after the maps, so that no packet can re-learn in between
            # from a flow that is about to be forgotten.
            run_command(["ip", "netns", "exec", r.netns, "conntrack", "-F"], check=False)

    def conntrack(self, router: str) -> str:
        """``conntrack -L`` of a router (for debugging)."""
        return self.run(router, ["conntrack", "-L"], check=False).stdout

    def nft_list(self, router: str) -> str:
        """``nft list ruleset`` of a router, learnt maps included (for debugging)."""
        return self.run(router, ["nft", "list", "ruleset"]).stdout

    def sysctl(self, node: str, key: str) -> str:
        return self.run(node, ["sysctl", "-n", key]).stdout.strip()

    # ---- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process started in the lab and delete every namespace.  Idempotent."""
        self._teardown(graceful=True)

    def _teardown(self, graceful: bool) -> None:
        """``graceful``: run cleanups, stop processes politely.  Otherwise (signal handler):
        take no lock another frame of the main thread may hold, SIGKILL, delete namespaces."""
        with self._lock:  # an RLock: a signal handler in the main thread may re-enter
            if self._torn_down or (graceful and self._closed):
                return
            self._closed = True
        start = time.monotonic()
        errors: list[BaseException] = []
        if graceful:
            while self._cleanups:
                fn = self._cleanups.pop()
                try:
                    fn()
                except Exception as exc:
                    errors.append(exc)
        for proc in reversed(self._processes):
            try:
                if graceful:
                    proc.stop()
                elif proc.popen.returncode is None:
                    _kill_group(proc.pid, signal.SIGKILL)
            except Exception as exc:
                errors.append(exc)
        # Node namespaces first (their veths vanish with them), the switch last.
        order = [ns for ns in self._namespaces if ns != self.switch_ns]
        if self.switch_ns in self._namespaces:
            order.append(self.switch_ns)
        try:
            _delete_namespaces(order)
        except Exception as exc:
            errors.append(exc)
        leftovers = [ns for ns in _ns_names_or_empty() if ns.startswith(self.prefix)]
        if leftovers:
            # Something raced us (or a delete failed): one more forceful attempt.
            with contextlib.suppress(Exception):
                _delete_namespaces(leftovers)
            leftovers = [ns for ns in _ns_names_or_empty() if ns.startswith(self.prefix)]
        self._torn_down = not leftovers
        with _registry_lock:
            _live_labs.discard(self)
            if not leftovers:
                _used_lab_ids.discard(self.lab_id)
        self.timings["teardown"] = time.monotonic() - start
        if leftovers:
            raise LabError(f"namespaces left behind: {leftovers}") from (
                errors[0] if errors else None
            )
        if errors:
            raise LabError(f"errors during teardown: {errors!r}") from errors[0]

    def describe(self) -> str:
        """A human-readable summary of the topology."""
        lines = [f"lab {self.prefix} (switch {self.switch_ns})"]
        for r in self._plan.routers.values():
            up = r.upstream or "internet"
            lines.append(
                f"  router {r.name}: {r.nat}{' +hairpin' if r.hairpin else ''} "
                f"wan {r.wan_address} (on {up}) lan {r.lan_subnet}"
            )
            if r.lan_subnet6 is not None:
                lines.append(f"    ipv6 firewall: wan {r.wan_address6} lan {r.lan_subnet6}")
        for h in self._plan.hosts.values():
            where = h.router or "internet"
            lines.append(f"  host {h.name}: {', '.join(h.addresses)} (on {where})")
            if h.addresses6:
                lines.append(f"    ipv6: {', '.join(h.addresses6)}")
        return "\n".join(lines)


def coturn_argv(
    addresses: Sequence[str],
    workdir: str | os.PathLike[str],
    port: int = 3478,
    alt_port: int = 3479,
) -> list[str]:
    """A ``turnserver`` command line serving STUN only on ``addresses`` (lab addresses).

    Nothing outside ``workdir`` is read or written: no config file (``-n``), pid file, SQLite
    db and log inside ``workdir``; no TLS/DTLS, no CLI, no authentication.  With two addresses
    coturn also answers RFC 5780 CHANGE-REQUESTs (OTHER-ADDRESS, ``alt_port``).
    """
    if not addresses:
        raise ValueError("coturn needs at least one listening address")
    wd = os.fspath(workdir)
    argv = ["turnserver", "-n"]
    for addr in addresses:
        argv += ["--listening-ip", addr]
    argv += [
        "--relay-ip",
        addresses[0],
        "--listening-port",
        str(port),
        "--alt-listening-port",
        str(alt_port),
        "--stun-only",
        "--no-auth",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--no-software-attribute",
        "--pidfile",
        os.path.join(wd, "turnserver.pid"),
        "--db",
        os.path.join(wd, "turndb"),
        "--log-file",
        os.path.join(wd, "turnserver.log"),
        "--simple-log",
        "--no-stdout-log",
    ]
    return argv


def start_coturn(
    lab: Lab,
    node: str,
    workdir: str | os.PathLike[str],
    addresses: Sequence[str] | None = None,
    port: int = 3478,
    alt_port: int = 3479,
) -> LabProcess:
    """Start coturn as a STUN server in ``node`` (default: on all of the host's addresses).

    The process is tracked by the lab; wait for it with a STUN request before use.
    """
    addrs = list(addresses) if addresses is not None else lab.host(node).addresses
    return lab.spawn(
        node,
        coturn_argv(addrs, workdir, port, alt_port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


#: nftables skeleton miniupnpd (nftables build) adds its rules to: base chains at the
#: forward / dstnat / srcnat hooks that jump to the chains named in its config.  It runs one
#: priority step before the lab's own ``ip crustlab`` chains, so a mapped (DNATed) flow is
#: already translated when the lab's forward chain accepts ``ct status dnat``.
MINIUPNPD_TABLE: Final = "crustupnp"
MINIUPNPD_PATH: Final = "/usr/sbin/miniupnpd"


def miniupnpd_ruleset(table: str = MINIUPNPD_TABLE) -> str:
    """The ``table inet`` miniupnpd expects (see ``miniupnpd_config``)."""
    return "\n".join(
        [
            f"table inet {table} {{",
            "  chain forward {",
            "    type filter hook forward priority filter - 1; policy accept;",
            "    jump upnp_forward;",
            "  }",
            "  chain upnp_forward {",
            "  }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat - 1; policy accept;",
            "    jump upnp_prerouting;",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat - 1; policy accept;",
            "    jump upnp_postrouting;",
            "  }",
            "  chain upnp_prerouting {",
            "  }",
            "  chain upnp_postrouting {",
            "  }",
            "}",
            "",
        ]
    )


def miniupnpd_config(
    router: Router,
    workdir: str | os.PathLike[str],
    stun: tuple[str, int],
    *,
    upnp: bool = True,
    natpmp: bool = True,
    min_lifetime: int = 120,
    table: str = MINIUPNPD_TABLE,
) -> str:
    """A self-contained miniupnpd.conf for ``router`` (files only inside ``workdir``).

    miniupnpd refuses to map when its WAN address is private *or reserved*, and the lab's
    internet is 198.18.0.0/15 (benchmarking, reserved); ``ext_ip=`` with such an address is a
    fatal config error.  What works is ``ext_perform_stun=yes``: it asks the lab's STUN
    server, sees its own WAN address with no filtering in front of it (all four RFC 5780
    probes answered from the mapped ports), concludes "unrestricted 1:1 NAT" and enables port
    forwarding with the STUN answer as external address.
    """
    wd = os.fspath(workdir)
    lines = [
        f"ext_ifname={router.wan_iface}",
        f"listening_ip={router.lan_iface}",
        "ipv6_disable=yes",
        "http_port=0",
        f"enable_upnp={'yes' if upnp else 'no'}",
        f"enable_natpmp={'yes' if natpmp else 'no'}",
        "ext_perform_stun=yes",
        f"ext_stun_host={stun[0]}",
        f"ext_stun_port={stun[1]}",
        "secure_mode=yes",
        "system_uptime=no",
        "notify_interval=60",
        "clean_ruleset_interval=600",
        f"min_lifetime={min_lifetime}",
        "max_lifetime=86400",
        "uuid=8c1e6f2a-5d1b-4c55-9e0b-6c7261737431",
        f"lease_file={os.path.join(wd, 'upnp.leases')}",
        f"minissdpdsocket={os.path.join(wd, 'minissdpd.sock')}",
        f"upnp_table_name={table}",
        f"upnp_nat_table_name={table}",
        "upnp_forward_chain=upnp_forward",
        "upnp_nat_chain=upnp_prerouting",
        "upnp_nat_postrouting_chain=upnp_postrouting",
        f"allow 1024-65535 {router.lan_subnet} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
    ]
    return "\n".join(lines) + "\n"


class MiniUpnpd:
    """A running miniupnpd in a lab router (see :func:`start_miniupnpd`)."""

    def __init__(self, proc: LabProcess, log_path: str, router: Router) -> None:
        self.proc = proc
        self.log_path = log_path
        self.router = router
        self.http_port: int | None = None
        """The port of its description and control URLs (once it serves UPnP)."""
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._ended = False
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        stream = self.proc.stdout
        with open(self.log_path, "a", encoding="utf-8") as log:
            try:
                if stream is not None:
                    for line in stream:
                        log.write(line)
                        log.flush()
                        with self._cond:
                            self._lines.append(line)
                            self._cond.notify_all()
            except (OSError, ValueError):
                pass
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """The first log line containing ``text``; LabError if it does not come."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if text in line:
                        return line
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    tail = "".join(self._lines[-15:])
                    raise LabError(
                        f"miniupnpd: no {text!r} in its log (rc={self.proc.poll()}):\n{tail}"
                    )
                self._cond.wait(remaining)

    @property
    def description_url(self) -> str:
        """``http://<router LAN address>:<port>/rootDesc.xml`` (for ``upnpc -u``)."""
        if self.http_port is None:
            raise LabError("miniupnpd does not serve UPnP")
        return f"http://{self.router.lan_address}:{self.http_port}/rootDesc.xml"

    def log(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def stop(self) -> int | None:
        return self.proc.stop()


def start_miniupnpd(
    lab: Lab,
    router: str,
    workdir: str | os.PathLike[str],
    stun: tuple[str, int],
    *,
    upnp: bool = True,
    natpmp: bool = True,
    stun_alt_port: int = 3479,
    timeout: float = 15.0,
) -> MiniUpnpd:
    """Run miniupnpd (UPnP IGD, NAT-PMP and PCP) on ``router``'s LAN side.

    ``stun`` is a STUN server on the lab internet with RFC 5780 support (``start_coturn``
    on a host with two addresses; ``stun_alt_port`` its other port).  The router's input
    chain lets that server's answers in (from all its addresses and both ports: miniupnpd's
    probe needs the ones from the other address and port), the
    skeleton table of :func:`miniupnpd_ruleset` is installed, and the call returns once
    miniupnpd serves requests with port forwarding enabled.  The process belongs to the lab
    (killed on teardown; on SIGTERM it removes its rules itself).
    """
    r = lab.router(router)
    wd = os.fspath(workdir)
    os.makedirs(wd, exist_ok=True)
    lab.run(r.name, ["nft", "-f", "-"], input=miniupnpd_ruleset())
    owners = [h for h in lab.hosts.values() if stun[0] in h.addresses]
    addresses = ", ".join(owners[0].addresses) if owners else stun[0]
    lab.run(
        r.name,
        [
            "nft",
            "insert",
            "rule",
            "ip",
            "crustlab",
            "input",
            "iifname",
            r.wan_iface,
            "ip",
            "saddr",
            f"{{ {addresses} }}",
            "udp",
            "sport",
            f"{{ {stun[1]}, {stun_alt_port} }}",
            "accept",
        ],
    )
    conf = os.path.join(wd, "miniupnpd.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(miniupnpd_config(r, wd, stun, upnp=upnp, natpmp=natpmp))
    proc = lab.spawn(
        r.name,
        [MINIUPNPD_PATH, "-d", "-f", conf, "-P", os.path.join(wd, "miniupnpd.pid")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    daemon = MiniUpnpd(proc, os.path.join(wd, "miniupnpd.log"), r)
    stun_line = daemon.wait_for("STUN: ", timeout)
    if "behind restrictive" in stun_line or "filters incoming" in stun_line:
        raise LabError(f"miniupnpd: port forwarding disabled after STUN: {stun_line.strip()}")
    if natpmp:
        daemon.wait_for("Listening for NAT-PMP/PCP traffic", timeout)
    if upnp:
        line = daemon.wait_for("HTTP listening on port", timeout)
        daemon.http_port = int(line.rsplit(" ", 1)[1])
    return daemon


def main(argv: Sequence[str] | None = None) -> int:
    """``python tests/lab/netlab.py --cleanup PREFIX`` removes a crashed run's namespaces."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cleanup", metavar="PREFIX", help="delete namespaces named PREFIX*")
    parser.add_argument("--list", action="store_true", help="list lab namespaces (nl*)")
    args = parser.parse_args(argv)
    if args.cleanup:
        for name in cleanup_prefix(args.cleanup):
            print(f"deleted {name}")
    if args.list:
        for name in list_namespaces():
            if re.match(r"^nl[0-9a-f]{4}", name):
                print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
