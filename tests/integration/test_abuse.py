"""AbuseDetected for limits and floods (garbage and stalled handshakes: test_service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from crust import errors
from crust.events import AbuseDetected, PeerConnected

TCP = ("tcp://127.0.0.1:0",)


async def test_one_address_at_its_connection_limit_is_reported_once(
    make: Callable[..., Any],
) -> None:
    svc, w = await make(listen=TCP, max_connections_per_ip=2)
    host, port = svc.contacts()[0].split("://")[1].split("#")[0].rsplit(":", 1)
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(6):  # silent sockets: the first two hold the address's quota
            s = socket.socket()
            socks.append(s)
            s.setblocking(False)
            # the others are reset as soon as they are accepted, possibly before
            # sock_connect has returned
            with contextlib.suppress(ConnectionResetError):
                await loop.sock_connect(s, (host, int(port)))
        ev = await w.wait(AbuseDetected)
        assert ev.kind == "limit" and ev.address == host and ev.peer is None
        # a real peer from the same address is refused too (after the silent ones)
        other, _ = await make(listen=TCP)
        with pytest.raises(errors.CrustError):  # closed before the handshake
            await other.connect(svc.contacts()[0])
        assert svc.statistics().limits_hit >= 5
        # five refusals, one event: a flood of connections is not a flood of events
        assert len(w.of(AbuseDetected)) == 1
    finally:
        for s in socks:
            s.close()


async def test_a_peer_flooding_introductions_is_reported(make: Callable[..., Any]) -> None:
    node, wn = await make()
    a, _ = await make()
    await a.connect(node.contacts())
    await wn.wait(PeerConnected)
    conn = a._active[node.peer_id]
    for i in range(30):  # the node forwards 10 at once, then 2 per second
        conn.session.send_control({"t": "fw", "to": bytes(32), "m": {"k": "intro", "id": i}})
    conn.control_changed()
    ev = await wn.wait(AbuseDetected)
    assert ev.kind == "flood" and ev.peer == a.peer_id
    assert node.statistics().introductions_refused == 30  # none forwarded: unknown target
