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
from tests.lab.netlab import (
    HostSpec,
    LabSpec,
    NatType,
    Netem,
    RouterSpec,
    pair_spec,
    pair_spec6,
)
from tests.nodeproc import CLI

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("CRUST_LAB_TRIALS", "5"))
SEQUENTIAL: NatType = "symmetric-sequential"


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
def test_symmetric_pairs_connect_by_birthday_probing_or_relay(
    lab_factory: LabFactory, tmp_path: Path, nat_a: NatType, nat_b: NatType, scheme: str
) -> None:
    """A symmetric NAT against a port-restricted one: birthday probing finds a QUIC path
    (TCP has no such trick: relayed). Two symmetric NATs: relayed. Always connected."""
    plab = PunchLab(lab_factory(pair_spec(nat_a, nat_b)), tmp_path)
    for _ in range(2 if scheme == "quic" and nat_a != nat_b else 1):
        r = plab.trial(nat_a, nat_b, scheme)
        assert r.ok, r
        if scheme == "quic" and nat_a != nat_b:
            assert r.path == "punched", r
        else:
            assert r.path in ("punched", "relayed"), r


def _no_birthday(tmp_path: Path, **extra: int) -> list[str]:
    """``crust node`` arguments turning birthday probing off, so that a symmetric NAT can
    only be punched by port prediction."""
    path = tmp_path / "no-birthday.toml"
    lines = ["birthday_sockets = 0", "birthday_probes = 0"]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path)]


@pytest.mark.parametrize(
    "nat_b", ["full-cone", "restricted", "port-restricted", SEQUENTIAL], ids=lambda n: str(n)
)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_sequential_symmetric_nat_is_punched_by_port_prediction(
    lab_factory: LabFactory, tmp_path: Path, nat_b: NatType, scheme: str
) -> None:
    """A symmetric NAT with sequential port allocation against every NAT whose mapping is
    predictable, over TCP and QUIC, with birthday probing off: against a port-restricted
    cone or another sequential NAT only the predicted ports can open the path (a random
    symmetric NAT is relayed there, see test_symmetric_pairs_...)."""
    lab = lab_factory(pair_spec(SEQUENTIAL, nat_b))
    plab = PunchLab(lab, tmp_path, node_args=_no_birthday(tmp_path))
    wan_a = lab.router("ra").wan_address
    for _ in range(2):
        r = plab.trial(SEQUENTIAL, nat_b, scheme)
        assert r.ok and r.path == "punched" and r.transport == scheme, r
    # the peer of the sequential side reaches it at a port of the lab NAT's counter
    with plab.pair(scheme) as (a, b):
        a.command(cmd="connect", to=b.peer_id, id="c")
        a.expect("connected", id="c")
        b.command(cmd="peers")
        peers = {p["peer"]: p for p in b.expect("peers")["peers"]}
        host, port = peers[a.peer_id]["remote"].split("://")[1].rsplit(":", 1)
        assert host == wan_a and int(port) >= 20000, peers[a.peer_id]
        assert peers[a.peer_id]["path"] == "punched"
        a.command(cmd="statistics")
        assert a.expect("statistics")["port_predictions"] >= 1


def test_without_port_prediction_the_sequential_nat_is_relayed(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """The control: the same pair with port prediction off (and no birthday probing) finds
    no path and ends in the relay."""
    lab = lab_factory(pair_spec(SEQUENTIAL, "port-restricted"))
    plab = PunchLab(lab, tmp_path, node_args=_no_birthday(tmp_path, port_prediction=0))
    r = plab.trial(SEQUENTIAL, "port-restricted", "quic")
    assert r.ok and r.path == "relayed", r


@pytest.mark.parametrize("hairpin", [False, True], ids=["no-hairpin", "hairpin"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_hosts_behind_one_nat_connect_over_their_lan(
    lab_factory: LabFactory, tmp_path: Path, scheme: str, hairpin: bool
) -> None:
    spec = LabSpec(
        routers=[RouterSpec("ra", nat="port-restricted", hairpin=hairpin)],
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


@pytest.mark.parametrize(
    "nat", ["none", "full-cone", "restricted", "port-restricted", "symmetric", SEQUENTIAL]
)
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
    assert report["nat_type"] == ("symmetric" if nat == SEQUENTIAL else nat), report
    if nat == SEQUENTIAL:  # and its next ports can be predicted
        assert report["port_allocation"] == "sequential", report
        assert report["classification"]["port_delta"] == 1, report
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


@pytest.mark.parametrize("scheme", SCHEMES)
def test_double_nat_punches(lab_factory: LabFactory, tmp_path: Path, scheme: str) -> None:
    """``b`` behind two port-restricted NATs (a carrier NAT and a home router)."""
    spec = LabSpec(
        routers=[
            RouterSpec("ra", nat="port-restricted"),
            RouterSpec("cgn", nat="port-restricted"),
            RouterSpec("rb", nat="port-restricted", upstream="cgn"),
        ],
        hosts=[
            HostSpec("pub", extra_addresses=1),
            HostSpec("a", router="ra"),
            HostSpec("b", router="rb"),
        ],
    )
    plab = PunchLab(lab_factory(spec), tmp_path)
    for _ in range(2):
        r = plab.trial("port-restricted", "double", scheme)
        assert r.ok and r.path == "punched", r


@pytest.mark.parametrize(
    ("nat_a", "nat_b", "scheme"),
    [
        ("port-restricted", "port-restricted", "tcp"),
        ("port-restricted", "port-restricted", "quic"),
        ("port-restricted", "symmetric", "quic"),
    ],
)
def test_100ms_rtt_and_1pct_loss(
    lab_factory: LabFactory, tmp_path: Path, nat_a: NatType, nat_b: NatType, scheme: str
) -> None:
    """25 ms and 0.5 % loss each way on both peers' links: 100 ms round trip and about 1 %
    loss between them; the punch (birthday probing for the symmetric pair) still connects."""
    netem = Netem(delay_ms=25, loss_pct=0.5)
    plab = PunchLab(lab_factory(pair_spec(nat_a, nat_b, netem=netem)), tmp_path)
    for _ in range(2):
        r = plab.trial(nat_a, nat_b, scheme)
        assert r.ok and r.path == "punched", r
