"""Faults on loopback (crust issue 8, item 3): a peer killed with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crust.events import PeerConnected, PeerLost
from tests.nodeproc import NodeProcess


@pytest.mark.parametrize("scheme", ["tcp", "quic"])
async def test_a_killed_peer_is_lost_within_the_heartbeat_timeout(
    make: Callable[..., Any], tmp_path: Path, scheme: str
) -> None:
    """TCP: the kernel resets the connection at once. QUIC: nothing tells us (UDP), so the
    heartbeat timeout (2 s here) must: PeerLost arrives within it (plus slack), never hangs."""
    svc, w = await make(
        listen=(f"{scheme}://127.0.0.1:0",), heartbeat_interval=0.5, heartbeat_timeout=2.0
    )
    child = NodeProcess(["--listen", f"{scheme}://127.0.0.1:0"], tmp_path, 0, subprocess.PIPE)
    try:
        peer = await svc.connect(child.contact)
        await w.wait(PeerConnected, lambda e: e.peer == peer)
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
        lost = await w.wait(PeerLost, lambda e: e.peer == peer, timeout=2.0 + 3.0)
        assert not svc.is_connected(peer)
        if scheme == "quic":
            assert svc.statistics().heartbeat_timeouts == 1, lost
    finally:
        child.close()
