"""Faults in the lab (crust issue 8, item 3): NAT rebinding, loss and reordering."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.conftest import LabFactory
from tests.lab.matrix import PunchLab
from tests.lab.netlab import Netem, pair_spec

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


@pytest.mark.parametrize("scheme", ["quic"])
def test_loss_and_jitter_deliver_every_message_once_in_order(
    lab_factory: LabFactory, tmp_path: Path, scheme: str
) -> None:
    """5 % loss and 50 ms of jitter (reordering) on both hosts' links: every message arrives
    exactly once and in order, each way. (The lab's link emulator has no duplication.)

    QUIC only for now: the same trial over TCP passed alone but stalled for over 60 s when run
    after the rebinding test (open in issue 8's note: find out whether crust or the userspace
    link emulator holds the stream)."""
    netem = Netem(delay_ms=10, jitter_ms=50, loss_pct=5)
    lab = lab_factory(pair_spec("none", "none", netem=netem))
    plab = PunchLab(lab, tmp_path)
    # heartbeats as a real deployment has them: the test config's 5 s timeout would call a
    # TCP connection in exponential retransmission backoff dead
    cfg = tmp_path / "lossy.toml"
    cfg.write_text("heartbeat_interval = 5.0\nheartbeat_timeout = 60.0\n")
    a = plab._node("a", [f"{scheme}://0.0.0.0:7100"], "--config", str(cfg))
    b = plab._node("b", [f"{scheme}://0.0.0.0:7101"], "--config", str(cfg))
    try:
        a.wait_ready(60)
        b.wait_ready(60)
        target = next(c for c in b.ready["contacts"] if c.startswith(f"{scheme}://198."))
        a.command(cmd="connect", to=target, id="c")
        a.expect("connected", id="c", timeout=60)
        n = 150
        for i in range(n):
            a.command(cmd="send", peer=b.peer_id, data=f"a{i}")
            b.command(cmd="send", peer=a.peer_id, data=f"b{i}")
        got_b = [b.expect("message_received", timeout=60)["data"] for _ in range(n)]
        got_a = [a.expect("message_received", timeout=60)["data"] for _ in range(n)]
        assert got_b == [f"a{i}" for i in range(n)]
        assert got_a == [f"b{i}" for i in range(n)]
        assert not [e for e in a.history + b.history if e.get("event") == "peer_lost"]
    finally:
        a.close()
        b.close()
