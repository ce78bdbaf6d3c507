"""crust's STUN client and NAT prober inside the NAT lab, against coturn and crust's own server.

One lab (built once for the module) holds a host behind a router of every NAT type plus a
public host.  ``pub`` runs coturn on its two addresses (RFC 5780: CHANGE-REQUEST and
OTHER-ADDRESS); ``pub2`` runs crust's :class:`~crust.aio.stun.StunServer` on its two addresses.
One client process per NAT host runs, in parallel:

* a Binding request from its own socket and one through a :class:`~crust.aio.udp_mux.UdpMux`;
* :class:`~crust.aio.stun.NatProber` against coturn, against crust's server, and against three
  plain observers (no RFC 5780) -- each on a fresh socket.

The tests then check every result against what the lab built.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab import netlab
from tests.lab.conftest import LabFactory
from tests.lab.netlab import NAT_TYPES, HostSpec, Lab, LabProcess, LabSpec, NatType, RouterSpec

pytestmark = pytest.mark.lab

HOST_FOR: dict[NatType, str] = {
    "none": "hno",
    "full-cone": "hfc",
    "restricted": "hrs",
    "port-restricted": "hpr",
    "symmetric": "hsy",
    "symmetric-sequential": "hsq",
}
HAIRPIN: dict[NatType, bool] = {
    "none": True,  # a public host reaches its own address
    "full-cone": True,
    "restricted": False,
    "port-restricted": True,
    "symmetric": False,
    "symmetric-sequential": False,
}
SPEC = LabSpec(
    routers=[
        RouterSpec("rfc", nat="full-cone", hairpin=True),
        RouterSpec("rrs", nat="restricted"),
        RouterSpec("rpr", nat="port-restricted", hairpin=True),
        RouterSpec("rsy", nat="symmetric"),
        RouterSpec("rsq", nat="symmetric-sequential"),
    ],
    hosts=[
        HostSpec("pub", extra_addresses=1),
        HostSpec("pub2", extra_addresses=1),
        HostSpec("hno"),
        HostSpec("hfc", router="rfc"),
        HostSpec("hrs", router="rrs"),
        HostSpec("hpr", router="rpr"),
        HostSpec("hsy", router="rsy"),
        HostSpec("hsq", router="rsq"),
    ],
)
SYMMETRIC = ("symmetric", "symmetric-sequential")
CRUST_PORT, CRUST_ALT_PORT = 3478, 3479
CLIENT_PORT = 41000

SERVER_SCRIPT = """
import asyncio, json, sys
from crust.aio.stun import StunServer

async def main():
    primary, alternate = sys.argv[1], sys.argv[2]
    port, alt_port = int(sys.argv[3]), int(sys.argv[4])
    async with await StunServer.start(
        (primary, port), alternate, alternate_port=alt_port, software="crust lab"
    ) as srv:
        grid = srv.addresses
        print(json.dumps({"ready": True, "primary": grid.primary, "alternate": grid.alternate}),
              flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""

CLIENT_SCRIPT = """
import asyncio, json, sys
from crust.aio.stun import NatProber, StunDispatcher, stun_binding
from crust.aio.udp_mux import UdpMux

async def main():
    args = json.loads(sys.argv[1])
    coturn, crust_server = tuple(args["coturn"]), tuple(args["crust"])
    out = {}
    async with StunDispatcher.open("0.0.0.0", args["port"]) as d:
        r = await d.binding(coturn, timeout=5, rto=0.25)
        out["own"] = {"local": d.local_address, "mapped": r.mapped,
                      "origin": r.response_origin, "other": r.other_address}
    mux = UdpMux.bind("0.0.0.0", 0, acceptor=None)
    try:
        r = await stun_binding(mux, coturn, timeout=5, rto=0.25)
        out["mux"] = {"local": mux.local_address, "mapped": r.mapped}
    finally:
        mux.close()
    for name, server in (("coturn", coturn), ("crust", crust_server)):
        result = await NatProber(server=server, filter_timeout=1.0, hairpin_timeout=1.0).run()
        out[name] = result.to_dict()
    observers = [tuple(o) for o in args["observers"]]
    out["observers"] = (await NatProber(observers=observers, hairpin=False).run()).to_dict()
    print(json.dumps(out), flush=True)

asyncio.run(main())
"""


@dataclass
class StunWorld:
    lab: Lab
    coturn: tuple[str, int]
    crust: tuple[str, int]
    results: dict[NatType, dict[str, Any]]


def _read_ready(proc: LabProcess, timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"{proc!r} did not start within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        err = proc.stderr.read() if proc.stderr is not None else ""
        raise AssertionError(f"{proc!r} exited: {err[-2000:]}")
    result: dict[str, Any] = json.loads(line)
    return result


@pytest.fixture(scope="module")
def world(module_lab_factory: LabFactory, tmp_path_factory: pytest.TempPathFactory) -> StunWorld:
    if shutil.which("turnserver") is None:
        pytest.skip("turnserver (coturn) is not installed: apt-get install coturn")
    lab = module_lab_factory(SPEC)
    a1 = lab.host("pub").addresses[0]
    b1, b2 = lab.host("pub2").addresses
    workdir: Path = tmp_path_factory.mktemp("coturn")
    netlab.start_coturn(lab, "pub", workdir)
    server = lab.spawn_python(
        "pub2",
        ["-c", SERVER_SCRIPT, b1, b2, str(CRUST_PORT), str(CRUST_ALT_PORT)],
        stdin=subprocess.PIPE,
    )
    hello = _read_ready(server, 20)
    assert hello["primary"] == [b1, CRUST_PORT]
    assert hello["alternate"] == [b2, CRUST_ALT_PORT]
    coturn = (a1, 3478)
    # coturn starts asynchronously: the clients' first request retransmits until it answers
    args = {
        "coturn": coturn,
        "crust": (b1, CRUST_PORT),
        "port": CLIENT_PORT,
        # plain observers: two ports of one address (coturn) and another address (crust)
        "observers": [(a1, 3478), (a1, 3479), (b1, CRUST_PORT)],
    }
    procs = {
        nat: lab.spawn_python(HOST_FOR[nat], ["-c", CLIENT_SCRIPT, json.dumps(args)])
        for nat in NAT_TYPES
    }
    results: dict[NatType, dict[str, Any]] = {}
    for nat, proc in procs.items():
        try:
            out, err = proc.popen.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.stop()
            raise AssertionError(f"STUN client behind {nat} did not finish") from None
        assert proc.returncode == 0, f"client behind {nat} failed:\n{err[-3000:]}"
        results[nat] = json.loads(out)
    for nat, res in results.items():
        print(
            f"\n{nat}: "
            + json.dumps({k: res[k]["nat_type"] for k in ("coturn", "crust", "observers")})
        )
    return StunWorld(lab, coturn, (b1, CRUST_PORT), results)


def _public(world: StunWorld, nat: NatType) -> str:
    return world.lab.public_address(HOST_FOR[nat])


@pytest.mark.parametrize("nat", NAT_TYPES)
def test_binding_sees_the_routers_public_address(world: StunWorld, nat: NatType) -> None:
    res = world.results[nat]
    public = _public(world, nat)
    own, mux = res["own"], res["mux"]
    assert own["mapped"][0] == public
    assert mux["mapped"][0] == public
    assert own["local"][1] == CLIENT_PORT
    if nat not in SYMMETRIC:  # every cone NAT of the lab preserves ports
        assert own["mapped"][1] == CLIENT_PORT
        assert mux["mapped"][1] == mux["local"][1]
    # coturn's RFC 5780 attributes came through our parser
    a1, a2 = world.lab.host("pub").addresses
    assert own["origin"] == [a1, 3478]
    assert own["other"] == [a2, 3479]


EXPECTED: dict[NatType, tuple[str, str, str]] = {
    # nat_type, mapping, filtering
    "none": ("none", "endpoint-independent", "endpoint-independent"),
    "full-cone": ("full-cone", "endpoint-independent", "endpoint-independent"),
    "restricted": ("restricted", "endpoint-independent", "address-dependent"),
    "port-restricted": ("port-restricted", "endpoint-independent", "address-and-port-dependent"),
    "symmetric": ("symmetric", "address-and-port-dependent", "address-and-port-dependent"),
    "symmetric-sequential": (
        "symmetric",
        "address-and-port-dependent",
        "address-and-port-dependent",
    ),
}


@pytest.mark.parametrize("server", ["coturn", "crust"])
@pytest.mark.parametrize("nat", NAT_TYPES)
def test_prober_classifies_the_lab_nat(world: StunWorld, nat: NatType, server: str) -> None:
    c = world.results[nat][server]
    nat_type, mapping, filtering = EXPECTED[nat]
    assert (c["nat_type"], c["mapping"], c["filtering"]) == (nat_type, mapping, filtering), c
    assert c["behind_nat"] is (nat != "none")
    assert c["mapped"].split(":")[0] == _public(world, nat)
    assert c["hairpinning"] is HAIRPIN[nat]
    assert c["port_preservation"] is (nat not in SYMMETRIC)
    assert len(c["observations"]) == 4  # the four RFC 5780 destinations
    if nat == "symmetric":
        assert c["port_allocation"] == "random"  # the lab's symmetric NAT uses random ports
        assert len(set(c["port_samples"])) == 4
    elif nat == "symmetric-sequential":
        # a new port per destination, each the previous one plus one: predictable
        assert c["port_allocation"] == "sequential"
        assert c["port_delta"] == 1
        first = c["port_samples"][0]
        assert c["port_samples"] == [first, first + 1, first + 2, first + 3]
    else:
        assert c["port_allocation"] == "stable"
    assert c["notes"] == [], c["notes"]


@pytest.mark.parametrize("nat", NAT_TYPES)
def test_plain_observers_classify_mapping_only(world: StunWorld, nat: NatType) -> None:
    c = world.results[nat]["observers"]
    assert c["filtering"] == "unknown"
    assert c["hairpinning"] is None
    assert len(c["observations"]) == 3
    if nat in SYMMETRIC:
        assert c["mapping"] == "address-and-port-dependent"
        assert c["nat_type"] == "symmetric"
    else:
        assert c["mapping"] == "endpoint-independent"
        assert c["nat_type"] == ("none" if nat == "none" else "cone")
