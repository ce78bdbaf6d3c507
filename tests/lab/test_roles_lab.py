"""Node or client: a dial-back from the public node's *other* address decides (crust issue 7).

``pub`` has two addresses; a peer that connects to it asks for a dial-back, which comes from
the address the peer did not talk to, so only a listener that is really reachable passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.conftest import LabFactory
from tests.lab.matrix import PunchLab
from tests.lab.netlab import pair_spec

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("scheme", ["tcp", "quic"])
def test_public_host_becomes_a_node_and_a_natted_one_stays_a_client(
    lab_factory: LabFactory, tmp_path: Path, scheme: str
) -> None:
    # b behind an address-restricted NAT: it talked to pub's first address, so a dial-back
    # from that address would pass the NAT; only the one from pub's second address counts
    plab = PunchLab(lab_factory(pair_spec("none", "restricted")), tmp_path)
    with plab.pair(scheme) as (a, b):
        ok = a.expect("reachability_checked", peer=plab.pub.peer_id)
        assert ok["reachable"] is True and ok["contacts"], ok
        assert all(c.startswith(f"{scheme}://") for c in ok["contacts"])
        no = b.expect("reachability_checked", peer=plab.pub.peer_id)
        assert no["reachable"] is False and no["contacts"] == [], no
        a.command(cmd="endpoints")
        assert a.expect("endpoints")["role"] == "node"
        b.command(cmd="endpoints")
        assert b.expect("endpoints")["role"] == "client"
