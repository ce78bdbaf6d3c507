"""LAN discovery between real ``crust node`` processes on one lab LAN (never the real LAN).

Nodes run *without* ``--testing``, with a config file that keeps the beacon on and turns off
what would reach beyond the lab (port mapping, the bootstrap cache file).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.conftest import LabFactory
from tests.lab.netlab import HostSpec, Lab, LabSpec, RouterSpec
from tests.nodeproc import NodeProcess

pytestmark = pytest.mark.lab

DISCOVERY_PORT = 5484


def config_file(tmp_path: Path, network: str, port: int) -> Path:
    path = tmp_path / f"{network}-{port}.toml"
    path.write_text(
        f'network_name = "{network}"\n'
        f'listen = ["tcp://0.0.0.0:{port}", "quic://0.0.0.0:{port}"]\n'
        "port_mapping = false\n"
        "bootstrap_cache = false\n"
        "service_discovery = true\n"
        f"service_discovery_port = {DISCOVERY_PORT}\n"
    )
    return path


def start(
    lab: Lab, host: str, tmp_path: Path, index: int, network: str, port: int = 7000
) -> NodeProcess:
    node = NodeProcess(
        [
            "--config",
            str(config_file(tmp_path, network, port)),
            "--identity",
            str(tmp_path / f"{host}-{port}.id"),
        ],
        tmp_path,
        index,
        subprocess.PIPE,
        wrap=lab.exec_argv(host, []),
        wait=False,
        testing=False,
    )
    lab.add_cleanup(node.close)
    node.wait_ready()
    return node


def test_new_node_finds_lan_peers_within_a_second_and_connects(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted")],
        hosts=[HostSpec(h, router="ra") for h in ("a", "b", "c", "x")],
    )
    lab = lab_factory(spec)
    a = start(lab, "a", tmp_path, 1, "crust")
    b = start(lab, "b", tmp_path, 2, "crust")
    # a and b find each other (b's start query is answered by a)
    b.expect("lan_peer_discovered", peer=a.peer_id)
    a.expect("lan_peer_discovered", peer=b.peer_id)
    other = start(lab, "x", tmp_path, 3, "elsewhere")
    began = time.monotonic()
    c = start(lab, "c", tmp_path, 4, "crust")
    ready = time.monotonic()
    found = {
        c.expect("lan_peer_discovered", timeout=5.0)["peer"],
        c.expect("lan_peer_discovered", timeout=5.0)["peer"],
    }
    done = time.monotonic()
    assert found == {a.peer_id, b.peer_id}
    # reported, not asserted (tests never assert speed): from spawning the new node's process
    # (interpreter start included) and from its "ready" line (its query is already out then)
    print(
        f"new node found both LAN peers {done - began:.2f} s after its spawn, "
        f"{done - ready:.2f} s after its ready line"
    )
    line = c.seen("lan_peer_discovered")[0]
    lab_contacts = [x for x in line["contacts"] if x.startswith("tcp://10.")]
    assert lab_contacts and all(x.endswith("#" + line["peer"]) for x in line["contacts"])
    # c connects to a by peer id alone: directly, on the LAN contact from the beacon
    c.command(cmd="connect", to=a.peer_id, id="k")
    c.expect("connected", id="k", timeout=10.0)
    ev = c.expect("peer_connected", peer=a.peer_id)
    assert ev["path"] == "direct" and ev["remote"].split("://")[1].startswith(
        lab.host("a").address + ":"
    )
    # b bootstraps with no cache and no hard-coded contacts: from its LAN peers
    b.command(cmd="bootstrap")
    boot = b.expect("bootstrap_connected", timeout=10.0)
    assert boot["peer"] in {a.peer_id, c.peer_id}
    # the node of another network was never reported, and it ignored ours
    for node in (a, b, c):
        assert other.peer_id not in {x["peer"] for x in node.seen("lan_peer_discovered")}
    other.command(cmd="peers")
    other.expect("peers")
    assert other.seen("lan_peer_discovered") == []


def test_two_nodes_on_one_host_share_the_discovery_port(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """SO_REUSEADDR/SO_REUSEPORT: a second node on the same host binds 5484 too, and both
    receive the broadcasts (of the other host and of each other)."""
    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted")],
        hosts=[HostSpec(h, router="ra") for h in ("a", "b")],
    )
    lab = lab_factory(spec)
    a1 = start(lab, "a", tmp_path, 1, "crust", 7000)
    a2 = start(lab, "a", tmp_path, 2, "crust", 7001)
    b = start(lab, "b", tmp_path, 3, "crust", 7000)
    for node, others in ((a1, (a2, b)), (a2, (a1, b)), (b, (a1, a2))):
        for other in others:
            node.expect("lan_peer_discovered", peer=other.peer_id, timeout=5.0)
    b.command(cmd="connect", to=a2.peer_id, id="k")
    b.expect("connected", id="k", timeout=10.0)
    ev = b.expect("peer_connected", peer=a2.peer_id)
    assert ev["path"] == "direct" and ev["remote"].endswith(":7001")
