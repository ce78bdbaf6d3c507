"""Port mapping against a real miniupnpd (UPnP IGD + NAT-PMP + PCP) in a lab router.

Topology: ``a`` (10.1.0.2) behind router ``ra`` (port-restricted NAT, WAN 198.18.0.10) that
runs miniupnpd on its LAN side; ``pub`` (198.18.0.11 + 198.18.1.11) on the lab internet runs
coturn, which miniupnpd uses to learn that its reserved 198.18.0.0/15 WAN address is in fact
reachable (see ``netlab.start_miniupnpd``).  SSDP multicast stays on ``ra``'s LAN bridge.

Checked for each protocol our client speaks: the mappings are granted, a host on the internet
reaches the mapped TCP and UDP ports (and the inside host sees that host's real address),
``upnpc -l`` lists them, renewal keeps them, and closing deletes them (``upnpc -l`` no longer
lists them and new packets are dropped again).  Our client and the independent ``upnpc`` /
``natpmpc`` agree on each other's mappings and on the external address; a crust node behind
the router is reachable through its mapped TCP and QUIC ports (path ``"mapped"``).
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import LabFactory
from tests.lab.netlab import (
    HostSpec,
    Lab,
    LabProcess,
    LabSpec,
    MiniUpnpd,
    RouterSpec,
    start_coturn,
    start_miniupnpd,
)
from tests.lab.probe import Probe

pytestmark = pytest.mark.lab

AGENT = str(Path(__file__).with_name("portmap_agent.py"))
UDP_PORT = 40001
TCP_PORT = 40002
SILENCE = 0.5
TIMEOUT = 20.0

TOOLS = {
    "miniupnpd": "/usr/sbin/miniupnpd",
    "upnpc": "upnpc",
    "natpmpc": "natpmpc",
    "turnserver": "turnserver",
}


@pytest.fixture(autouse=True)
def _tools() -> None:
    missing = [name for name, path in TOOLS.items() if shutil.which(path) is None]
    if missing:
        pytest.skip(
            f"port-mapping lab needs {', '.join(missing)} "
            "(apt-get install miniupnpd-nftables miniupnpc natpmpc coturn)"
        )


class JsonLines:
    """A process in a lab node that prints one JSON object per line and reads commands."""

    def __init__(self, proc: LabProcess, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        stream = self.proc.stdout
        try:
            if stream is not None:
                for raw in stream:
                    try:
                        self._lines.put(json.loads(raw))
                    except ValueError:
                        self._lines.put({"event": "<not json>", "raw": raw})
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    def diagnostics(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-3000:]
        return f"lines: {self.history[-20:]}\nstderr: {err}"

    def expect(self, event: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        def match(line: dict[str, Any]) -> bool:
            return line.get("event") == event and all(line.get(k) == v for k, v in fields.items())

        for line in self._pending:
            if match(line):
                self._pending.remove(line)
                return line
        while True:
            try:
                got = self._lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no {event!r} within {timeout} s\n{self.diagnostics()}")
            if got is None:
                self._lines.put(None)
                pytest.fail(f"output ended before {event!r}\n{self.diagnostics()}")
            self.history.append(got)
            if match(got):
                return got
            self._pending.append(got)

    def command(self, **cmd: Any) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()


@dataclass
class UpnpLab:
    lab: Lab
    daemon: MiniUpnpd
    inside: Probe
    outside: Probe
    workdir: Path

    @property
    def external(self) -> str:
        return self.lab.router("ra").wan_address

    @property
    def inside_address(self) -> str:
        return self.lab.host("a").address

    def start_agent(self, methods: list[str], requests: list[list[Any]]) -> JsonLines:
        config = json.dumps({"methods": methods, "requests": requests})
        err = self.workdir / f"agent-{len(self.lab.processes)}.stderr"
        with err.open("w") as stderr:  # the child keeps its own copy
            proc = self.lab.spawn_python(
                "a", ["-u", AGENT, config], stdin=subprocess.PIPE, stderr=stderr
            )
        agent = JsonLines(proc, err)
        agent.expect("ready")
        return agent

    def upnpc_list(self) -> set[tuple[str, int, str, int]]:
        """(protocol, external port, internal address, internal port) listed by ``upnpc -l``
        (``-i``: accept an IGD whose external address is reserved, as the lab's is; ``-u``:
        its description URL, instead of waiting for SSDP answers)."""
        url = self.daemon.description_url
        out = self.lab.run("a", ["upnpc", "-i", "-u", url, "-l"], timeout=30).stdout
        found = set()
        for m in re.finditer(r"^\s*\d+\s+(TCP|UDP)\s+(\d+)->([\d.]+):(\d+)", out, re.M):
            found.add((m.group(1).lower(), int(m.group(2)), m.group(3), int(m.group(4))))
        return found


@pytest.fixture
def upnp_lab(lab_factory: LabFactory, tmp_path: Path) -> UpnpLab:
    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted")],
        hosts=[HostSpec("pub", extra_addresses=1), HostSpec("a", router="ra")],
    )
    lab = lab_factory(spec)
    pub = lab.host("pub")
    start_coturn(lab, "pub", tmp_path)
    outside = Probe.start(lab, "pub")
    # miniupnpd asks coturn at start: wait until coturn answers
    assert outside.udp().stun((pub.address, 3478), timeout=10.0) is not None, "coturn is down"
    daemon = start_miniupnpd(lab, "ra", tmp_path / "miniupnpd", (pub.address, 3478))
    inside = Probe.start(lab, "a")
    return UpnpLab(lab, daemon, inside, outside, tmp_path)


@pytest.mark.parametrize("method", ["pcp", "natpmp", "upnp"])
def test_mappings_via_each_protocol(upnp_lab: UpnpLab, method: str) -> None:
    ul = upnp_lab
    ext = ul.external
    pub_address = ul.lab.host("pub").address
    ul.inside.udp_echo("0.0.0.0", UDP_PORT)
    ul.inside.tcp_echo("0.0.0.0", TCP_PORT)
    # without a mapping, the NAT lets nothing in
    assert ul.outside.udp().try_query((ext, UDP_PORT), timeout=SILENCE) is None
    assert ul.outside.tcp_query((ext, TCP_PORT), timeout=SILENCE) is None

    agent = ul.start_agent([method], [["udp", UDP_PORT], ["tcp", TCP_PORT]])
    granted = {g["protocol"]: g for g in (agent.expect("granted"), agent.expect("granted"))}
    for protocol, port in (("udp", UDP_PORT), ("tcp", TCP_PORT)):
        g = granted[protocol]
        assert g["method"] == method
        assert g["internal"] == [ul.inside_address, port]
        assert g["external"] == [ext, port]
        assert g["lifetime"] >= 120

    # a host on the internet reaches both ports; the inside host sees its real address
    sock = ul.outside.udp()
    assert sock.query((ext, UDP_PORT)) == (pub_address, sock.port)
    seen = ul.outside.tcp_query((ext, TCP_PORT))
    assert seen is not None and seen[0] == pub_address

    # the independent client lists what our client made
    listed = ul.upnpc_list()
    assert ("udp", UDP_PORT, ul.inside_address, UDP_PORT) in listed
    assert ("tcp", TCP_PORT, ul.inside_address, TCP_PORT) in listed

    # renewing keeps the same mappings (and they still work)
    agent.command(cmd="renew")
    agent.expect("renewed")
    agent.command(cmd="mappings")
    after = agent.expect("mappings")["mappings"]
    assert sorted(m["external"][1] for m in after) == [UDP_PORT, TCP_PORT]
    assert ul.outside.udp().query((ext, UDP_PORT))[0] == pub_address

    # closing deletes them at the gateway
    agent.command(cmd="close")
    assert agent.expect("closed")["mappings"] == 0
    listed = ul.upnpc_list()
    assert not {e for e in listed if e[1] in (UDP_PORT, TCP_PORT)}, listed
    assert ul.outside.udp().try_query((ext, UDP_PORT), timeout=SILENCE) is None
    assert ul.outside.tcp_query((ext, TCP_PORT), timeout=SILENCE) is None
    assert agent.proc.wait(TIMEOUT) == 0


def test_independent_clients_and_ours_agree(upnp_lab: UpnpLab) -> None:
    ul = upnp_lab
    a = ul.inside_address
    url = ul.daemon.description_url
    ul.lab.run("a", ["upnpc", "-i", "-u", url, "-e", "by-upnpc", "-r", "45000", "TCP"], timeout=30)
    natpmpc = ul.lab.run("a", ["natpmpc", "-a", "45001", "45001", "udp", "300"], timeout=30)
    public = re.search(r"Public IP address : ([\d.]+)", natpmpc.stdout)
    assert public is not None, natpmpc.stdout
    assert public.group(1) == ul.external

    agent = ul.start_agent(["upnp"], [["tcp", TCP_PORT]])
    assert agent.expect("granted")["method"] == "upnp"
    # our GetGenericPortMappingEntry sees the others' mappings and ours
    agent.command(cmd="upnp_list")
    entries = {
        (e["protocol"], e["external_port"], e["internal_client"], e["internal_port"])
        for e in agent.expect("upnp_list")["entries"]
    }
    assert {("tcp", 45000, a, 45000), ("udp", 45001, a, 45001), ("tcp", TCP_PORT, a, TCP_PORT)} <= (
        entries
    )
    assert entries == ul.upnpc_list()
    # our NAT-PMP client sees the external address natpmpc saw
    agent.command(cmd="natpmp_external")
    assert agent.expect("natpmp_external")["address"] == public.group(1)
    agent.command(cmd="close")
    agent.expect("closed")
    # only our own mapping went away
    left = ul.upnpc_list()
    assert ("tcp", 45000, a, 45000) in left and ("udp", 45001, a, 45001) in left
    assert ("tcp", TCP_PORT, a, TCP_PORT) not in left


def crust_node(ul: UpnpLab, node: str, config: dict[str, Any]) -> JsonLines:
    toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    cfg = ul.workdir / f"{node}.toml"
    cfg.write_text(toml)
    err = ul.workdir / f"{node}.stderr"
    with err.open("w") as stderr:  # the child keeps its own copy
        proc = _spawn_node(ul, node, cfg, stderr)
    return JsonLines(proc, err)


def _spawn_node(ul: UpnpLab, node: str, cfg: Path, stderr: Any) -> LabProcess:
    return ul.lab.spawn_python(
        node,
        [
            "-m",
            "crust.cli.main",
            "node",
            "--json",
            "--config",
            str(cfg),
            "--identity",
            str(ul.workdir / f"{node}.pem"),
        ],
        stdin=subprocess.PIPE,
        stderr=stderr,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(ul.workdir)},
    )


def test_service_behind_miniupnpd_is_reached_through_its_mappings(upnp_lab: UpnpLab) -> None:
    ul = upnp_lab
    base = {"service_discovery": False, "bootstrap_cache": str(ul.workdir / "cache.json")}
    inner = crust_node(
        ul,
        "a",
        {**base, "port_mapping": True, "listen": ["tcp://0.0.0.0:0", "quic://0.0.0.0:0"]},
    )
    peer_a = inner.expect("ready")["peer_id"]
    grants = [inner.expect("port_mapping_granted"), inner.expect("port_mapping_granted")]
    external = {g["external"].split("://")[0]: g["external"] for g in grants}
    assert set(external) == {"tcp", "quic"}
    for g in grants:
        assert g["protocol"] == "pcp"  # miniupnpd speaks PCP, the first one tried
        assert g["external"].startswith(f"{g['external'].split('://')[0]}://{ul.external}:")
        assert g["internal"].split("://")[1].startswith(f"{ul.inside_address}:")
    inner.command(cmd="endpoints")
    endpoints = inner.expect("endpoints")["endpoints"]
    assert {ep["external"] for ep in endpoints} == set(external.values())
    listed = ul.upnpc_list()
    for contact in external.values():
        port = int(contact.rsplit(":", 1)[1])
        proto = "tcp" if contact.startswith("tcp") else "udp"
        assert (proto, port, ul.inside_address, port) in listed

    pub_address = ul.lab.host("pub").address
    outer = crust_node(
        ul,
        "pub",
        {**base, "port_mapping": False, "listen": [f"tcp://{pub_address}:0"]},
    )
    outer.expect("ready")
    for scheme in ("tcp", "quic"):
        target = f"{external[scheme]}#{peer_a}"
        outer.command(cmd="connect", to=target)
        outer.expect("connected", peer=peer_a)
        event = inner.expect("peer_connected", transport=scheme)
        assert event["path"] == "mapped" and event["outbound"] is False
        assert event["remote"].split("://")[1].startswith(f"{pub_address}:")
        outer.command(cmd="disconnect", peer=peer_a)
        outer.expect("disconnected", peer=peer_a)
        inner.expect("peer_lost")

    # the node deletes its mappings when it stops
    inner.command(cmd="quit")
    inner.expect("stopped")
    assert inner.proc.wait(TIMEOUT) == 0
    left = ul.upnpc_list()
    assert not {e for e in left if e[2] == ul.inside_address}, left
    outer.command(cmd="quit")
    outer.expect("stopped")


def test_netcheck_reports_the_port_mapping_protocols_that_answer(upnp_lab: UpnpLab) -> None:
    import json
    import sys

    lab = upnp_lab.lab
    pub = lab.host("pub").address
    argv = [sys.executable, "-m", "crust.cli.main", "netcheck", "--stun", f"{pub}:3478", "--json"]
    report = json.loads(lab.run("a", argv, timeout=60).stdout)
    assert report["port_mapping"] == {"pcp": True, "natpmp": True, "upnp": True}, report
    # and without a gateway that speaks any of them (the public host has none)
    report = json.loads(lab.run("pub", argv, timeout=60).stdout)
    assert report["port_mapping"] == {"pcp": False, "natpmp": False, "upnp": False}


def test_a_node_behind_miniupnpd_becomes_a_node_through_its_mapping(upnp_lab: UpnpLab) -> None:
    """The dial-back from pub's second address reaches the mapped port: role node (without the
    mapping the same host stays a client: tests/lab/test_roles_lab.py)."""
    ul = upnp_lab
    base = {"service_discovery": False, "bootstrap_cache": False}
    outer = crust_node(ul, "pub", {**base, "port_mapping": False, "listen": ["tcp://0.0.0.0:7000"]})
    pub_contact = outer.expect("ready")["contacts"][0]
    assert pub_contact.startswith(f"tcp://{ul.lab.host('pub').address}:7000#")
    inner = crust_node(ul, "a", {**base, "port_mapping": True, "listen": ["tcp://0.0.0.0:0"]})
    inner.expect("ready")
    grant = inner.expect("port_mapping_granted")
    inner.command(cmd="connect", to=pub_contact)
    checked = inner.expect("reachability_checked")
    assert checked["reachable"] is True and checked["contacts"] == [grant["external"]], checked
    inner.command(cmd="endpoints")
    assert inner.expect("endpoints")["role"] == "node"
    for node in (inner, outer):
        node.command(cmd="quit")
        node.expect("stopped")
