"""Statistics, the Prometheus exporter (scraped on loopback) and ``crust node`` logging."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import crust
from crust import errors
from crust.events import PeerConnected
from crust.metrics import MetricsExporter
from crust.signing import SignedMessage, verify_proof
from tests.nodeproc import NodeProcess


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_exporter_serves_the_statistics(make: Callable[..., Any]) -> None:
    a, _ = await make()
    b, wb = await make()
    quic = next(c for c in b.contacts() if c.startswith("quic://"))
    tcp = next(c for c in b.contacts() if c.startswith("tcp://"))
    c, _ = await make()
    await a.connect(quic)
    await c.connect(tcp)
    await wb.count(PeerConnected, 2)
    for i in range(10):
        await a.send(b.peer_id, b"q" * 100, signed=i % 2 == 0)
    await c.send(b.peer_id, b"t" * 100)
    await wb.messages(11)
    async with MetricsExporter(b, port=0) as exporter:
        assert exporter.port > 0
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        got = await asyncio.to_thread(scrape, url)
        stats = b.statistics()
        assert got[("crust_peers", ())] == 2
        assert got[("crust_messages_received_total", ())] == stats.messages_received == 11
        assert got[("crust_signed_messages_received_total", ())] == 5
        by_transport = "crust_messages_received_by_transport_total"
        assert got[(by_transport, (("transport", "quic"),))] == 10
        assert got[(by_transport, (("transport", "tcp"),))] == 1
        assert got[("crust_connects_by_path_total", (("path", "direct"),))] == 2
        assert got[("crust_bytes_received_total", ())] > 1100
        # anything else than GET /metrics is refused
        with pytest.raises(urllib.error.HTTPError) as info:
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{exporter.port}/other", None, 10
            )
        assert info.value.code == 404
        info.value.close()


async def test_limits_hit_are_counted(make: Callable[..., Any]) -> None:
    hub, wh = await make(max_connections_per_ip=1)
    a, _ = await make()
    b, _ = await make()
    tcp = next(c for c in hub.contacts() if c.startswith("tcp://"))
    await a.connect(tcp)
    await wh.wait(PeerConnected)
    with pytest.raises(errors.CrustError):
        await b.connect(tcp)
    assert hub.statistics().limits_hit >= 1
    assert a.statistics().limits_hit == 0


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(*args: str) -> NodeProcess:
        node = NodeProcess(list(args), tmp_path, len(started), subprocess.PIPE)
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.close()


def test_cli_metrics_and_verbose_logging(nodes: Callable[..., NodeProcess]) -> None:
    a = nodes("-vv", "--metrics-port", "0")
    b = nodes()
    url = a.ready["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    a.command(cmd="connect", to=b.contact)
    a.expect("peer_connected", peer=b.peer_id)
    b.expect("peer_connected", peer=a.peer_id)
    a.command(cmd="send", peer=b.peer_id, data="signed hello", signed=True)
    got = b.expect("message_received", peer=a.peer_id)
    assert got["data"] == "signed hello"
    proof = SignedMessage.from_bytes(base64.b64decode(got["proof"]))
    assert verify_proof(proof, receiver=crust.PeerId.parse(b.peer_id), network=proof.network)
    assert proof.sender == crust.PeerId.parse(a.peer_id) and proof.data == b"signed hello"
    assert base64.b64decode(got["signature"]) == proof.signature
    a.expect("sent", peer=b.peer_id)
    metrics = scrape(url)
    assert metrics[("crust_peers", ())] == 1
    assert metrics[("crust_signed_messages_sent_total", ())] == 1
    assert metrics[("crust_connects_by_path_total", (("path", "direct"),))] == 1
    # -vv: debug lines naming the peer (short id) and the path of the connection
    short_b = b.peer_id[:8]
    log = a.stderr_path.read_text()
    assert any("DEBUG" in line and short_b in line for line in log.splitlines()), log
    assert any(f"peer {short_b} connected: tcp direct" in line for line in log.splitlines()), log
    # quiet by default
    assert b.stderr_path.read_text() == ""


async def test_exporter_refuses_bad_requests_and_a_busy_port(make: Callable[..., Any]) -> None:
    svc, _ = await make()
    async with MetricsExporter(svc) as exporter:
        for request, status in (
            (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
            (b"garbage\r\n\r\n", b"405"),
            (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 10_000 + b"\r\n\r\n", b""),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", exporter.port)
            writer.write(request)
            await writer.drain()
            async with asyncio.timeout(10):
                answer = await reader.read()  # the server answers (or not) and closes
            writer.close()
            assert answer.split(b" ")[1:2] == ([status] if status else [])
        with pytest.raises(errors.ConfigError) as info:
            await MetricsExporter(svc, port=exporter.port).start()
        assert info.value.field == "metrics_port"
    with pytest.raises(errors.ConfigError):
        MetricsExporter(svc, port=70000)
