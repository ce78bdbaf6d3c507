"""crust itself in the NAT lab: introductions through a public node and hole punching.

Every trial runs real ``crust node`` processes in the lab's namespaces (see
``tests/lab/matrix.py``, also runnable as ``scripts/lab``).
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from tests.lab import netlab
from tests.lab.conftest import LabFactory
from tests.lab.matrix import CONE_TYPES, SCHEMES, PunchLab, pairs, summarize
from tests.lab.netlab import HostSpec, LabSpec, NatType, RouterSpec, pair_spec, pair_spec6
from tests.nodeproc import CLI

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("CRUST_LAB_TRIALS", "5"))


@pytest.mark.parametrize(("nat_a", "nat_b"), pairs(CONE_TYPES), ids=lambda n: str(n))
def test_cone_pairs_always_connect_directly(
    lab_factory: LabFactory, tmp_path: Path, nat_a: NatType, nat_b: NatType
) -> None:
    plab = PunchLab(lab_factory(pair_spec(nat_a, nat_b)), tmp_path)
    results = [plab.trial(nat_a, nat_b, scheme) for scheme in SCHEMES for _ in range(TRIALS)]
    failed = [r for r in results if not r.direct]
    assert not failed, summarize(results)
    for r in results:
        assert r.path == "punched" and r.transport == r.scheme


@pytest.mark.parametrize(
    ("nat_a", "nat_b"), [("port-restricted", "symmetric"), ("symmetric", "symmetric")]
)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_symmetric_pairs_connect_relayed_at_worst(
    lab_factory: LabFactory, tmp_path: Path, nat_a: NatType, nat_b: NatType, scheme: str
) -> None:
    """No direct path exists yet for these (port prediction and birthday probing come next):
    the punch gives up after its rounds, never hangs, and the public node relays."""
    plab = PunchLab(lab_factory(pair_spec(nat_a, nat_b)), tmp_path)
    r = plab.trial(nat_a, nat_b, scheme)
    assert r.ok, r
    assert r.path in ("punched", "relayed"), r


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hosts_behind_one_nat_connect_over_their_lan(
    lab_factory: LabFactory, tmp_path: Path, scheme: str
) -> None:
    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted")],
        hosts=[HostSpec("pub"), HostSpec("a", router="ra"), HostSpec("b", router="ra")],
    )
    lab = lab_factory(spec)
    plab = PunchLab(lab, tmp_path)
    with plab.pair(scheme) as (a, b):
        a.command(cmd="connect", to=b.peer_id, id="c")
        a.expect("connected", id="c")
        a.command(cmd="peers")
        peers = {p["peer"]: p for p in a.expect("peers")["peers"]}
        remote = peers[b.peer_id]["remote"]
        host = remote.split("://")[1].rsplit(":", 1)[0]
        assert ipaddress.ip_address(host) in ipaddress.ip_network(lab.router("ra").lan_subnet), (
            remote
        )
        assert peers[b.peer_id]["path"] == "punched"


def test_external_quic_address_is_learnt_and_reported(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    lab = lab_factory(pair_spec("port-restricted", "full-cone"))
    plab = PunchLab(lab, tmp_path)
    with plab.pair("quic") as (a, _b):
        ev = a.expect("external_address_changed")
        wan = lab.router("ra").wan_address
        assert ev["endpoint"].startswith(f"quic://{wan}:")
        a.command(cmd="endpoints")
        eps = a.expect("endpoints")
        assert eps["endpoints"][0]["external"] == ev["endpoint"]
        assert any(c.startswith(ev["endpoint"] + "#") for c in eps["contacts"])


@pytest.mark.parametrize("nat", ["none", "full-cone", "restricted", "port-restricted", "symmetric"])
def test_netcheck_reports_the_nat_the_lab_built(
    module_lab_factory: LabFactory, tmp_path: Path, nat: NatType
) -> None:
    lab = module_lab_factory(pair_spec(nat, "none"))
    netlab.start_coturn(lab, "pub", tmp_path)
    plab = PunchLab(lab, tmp_path)
    pub = lab.host("pub").address
    out = lab.run(
        "a",
        [*CLI, "netcheck", "--stun", f"{pub}:3478", "--contact", plab.pub_contact, "--json"],
        timeout=60,
    )
    report = json.loads(out.stdout)
    assert report["nat_type"] == nat, report
    assert report["udp"] is True
    wan = lab.router("ra").wan_address if nat != "none" else lab.host("a").address
    assert any(e.split("://")[-1].startswith(f"{wan}:") for e in report["external"]), report
    crust_obs = next(o for o in report["observers"] if o["kind"] == "crust")
    assert crust_obs["ok"] and crust_obs["udp"] and crust_obs["latency"] > 0
    assert crust_obs["mapped"].split("://")[1].startswith(f"{wan}:")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ipv6_hosts_behind_stateful_firewalls_punch(
    lab_factory: LabFactory, tmp_path: Path, scheme: str
) -> None:
    """No NAT, but firewalls that drop unsolicited inbound (as home routers do for IPv6):
    the same introduction and punch open both, over IPv6 only."""
    lab = lab_factory(pair_spec6())
    plab = PunchLab(lab, tmp_path, ipv6=True)
    for _ in range(2):
        r = plab.trial("firewall6", "firewall6", scheme)
        assert r.ok and r.path == "punched" and r.transport == scheme, r
    with plab.pair(scheme) as (a, b):
        a.command(cmd="connect", to=b.peer_id, id="c")
        a.expect("connected", id="c")
        a.command(cmd="peers")
        peers = {p["peer"]: p for p in a.expect("peers")["peers"]}
        assert f"[{lab.address6('b')}]" in peers[b.peer_id]["remote"]
