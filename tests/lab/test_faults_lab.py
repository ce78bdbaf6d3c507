"""Faults in the lab (crust issue 8, item 3): NAT rebinding."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.conftest import LabFactory
from tests.lab.matrix import PunchLab
from tests.lab.netlab import pair_spec

pytestmark = pytest.mark.lab


def test_quic_survives_nat_rebinding_without_losing_a_message(
    lab_factory: LabFactory, tmp_path: Path
) -> None:
    """``a`` behind a symmetric NAT sends to ``pub`` over QUIC; halfway the router forgets
    every mapping (conntrack flushed), so a's next packets leave from a new public port. The
    connection continues on the new path: every message arrives once, in order."""
    lab = lab_factory(pair_spec("symmetric", "none"))
    plab = PunchLab(lab, tmp_path)
    pub = plab.pub
    quic = next(c for c in pub.ready["contacts"] if c.startswith("quic://198.18.0."))
    a = plab._node("a", ["quic://0.0.0.0:7100"], "--contact", quic)
    try:
        a.wait_ready()
        assert a.expect("peer_connected", peer=pub.peer_id)["transport"] == "quic"
        first = pub.expect("peer_connected", peer=a.peer_id)
        n = 60
        for i in range(n):
            if i == n // 2:
                lab.reset_nat(["ra"])  # the NAT rebinding
            a.command(cmd="send", peer=pub.peer_id, data=f"m{i}")
        got = [pub.expect("message_received", peer=a.peer_id, timeout=30)["data"] for _ in range(n)]
        assert got == [f"m{i}" for i in range(n)]
        # the other way too: pub answers on the new path
        pub.command(cmd="send", peer=a.peer_id, data="back")
        assert a.expect("message_received", peer=pub.peer_id, timeout=30)["data"] == "back"
        # the router's current mapping for a's QUIC socket has another public port
        old_port = first["remote"].rsplit(":", 1)[1]
        table = lab.conntrack("ra")
        flows = [line for line in table.splitlines() if "udp" in line and "sport=7100" in line]
        assert flows, table
        assert all(f"dport={old_port} " not in line for line in flows), flows
        # still the one connection: no PeerLost, no second PeerConnected for a
        assert not [e for e in pub.history if e.get("event") == "peer_lost"]
        assert [e for e in pub.history if e.get("event") == "peer_connected"] == [first]
    finally:
        a.close()
