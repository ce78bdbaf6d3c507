"""``crust bench``: the command runs the suites and prints results of the documented shape.

Only the shape and the bookkeeping are checked (a figure's ratio is crust / baseline, every
suite either ran or says why not); speed is never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.nodeproc import CLI, cli_env

ROOT = Path(__file__).resolve().parents[2]
FIGURE_KEYS = {
    "suite",
    "baseline_name",
    "key",
    "figure",
    "unit",
    "crust",
    "baseline",
    "ratio",
    "higher_is_better",
    "target",
    "met",
    "details",
    "error",
}


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "bench", *args],
        capture_output=True,
        text=True,
        timeout=110,
        env=cli_env(tmp_path),
        cwd=tmp_path,  # the checkout is found from the installed crust, not the cwd
        check=False,
    )


@pytest.mark.timeout(120)
def test_bench_smoke_json_shape(tmp_path: Path) -> None:
    proc = run_bench(tmp_path, "--quick", "--smoke", "--json", "--suites", "tcp,quic,libp2p,relay")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["benchmark"] == "crust bench"
    assert out["mode"] == "smoke"
    assert Path(out["source"]) == ROOT
    assert set(out["suites"]) == {"tcp", "quic", "libp2p", "relay"}
    tcp = out["suites"]["tcp"]
    assert "skipped" not in tcp and "error" not in tcp
    for name, suite in out["suites"].items():
        ran = "figures" in suite
        assert ran != ("skipped" in suite), name
        if not ran:
            assert isinstance(suite["skipped"], str) and suite["skipped"]
            assert not any(f["suite"] == name for f in out["figures"])
    keys = {f["key"] for f in out["figures"] if f["suite"] == "tcp"}
    for size in (64, 1024, 65536, 1048576):
        assert f"bulk_{size}" in keys
    assert {"small_msgs", "connect_first_msg_p50", "connect_first_msg_p99"} <= keys
    assert "connections_concurrent" in keys
    relay = out["suites"]["relay"]
    assert "skipped" not in relay and "error" not in relay
    relay_keys = {f["key"] for f in out["figures"] if f["suite"] == "relay"}
    assert relay_keys == {f"relay_bulk_{size}" for size in (1024, 65536, 1048576)}
    bulk_64 = next(f for f in out["figures"] if f["key"] == "bulk_64")
    for who in ("crust", "baseline"):
        rates = bulk_64["rates"][who]
        assert set(rates) == {"tx_msgs_per_s", "tx_mb_per_s", "rx_msgs_per_s", "rx_mb_per_s"}
        # the same messages either way: messages/s and MB/s differ by the 64 B size
        assert math.isclose(rates["rx_mb_per_s"] * 1e6, rates["rx_msgs_per_s"] * 64)
    for f in out["figures"]:
        assert set(f) - {"rates"} == FIGURE_KEYS, f["key"]
        assert f["error"] is None, f
        assert f["crust"] > 0 and f["baseline"] > 0
        assert math.isclose(f["ratio"], f["crust"] / f["baseline"])
        assert f["unit"] in {"MB/s", "MiB/s", "msg/s", "ms", "conn/s"}
    # the progress went to stderr, one line per step when it is not a terminal
    assert "tcp: bulk 64 B" in proc.stderr


def test_bench_table_and_suite_selection(tmp_path: Path) -> None:
    bad = run_bench(tmp_path, "--suites", "tcp,nope")
    assert bad.returncode == 2
    assert "choose among" in bad.stderr
    missing = run_bench(tmp_path, "--source", str(tmp_path), "--smoke")
    assert missing.returncode == 1
    assert "no benchmarks/ package" in missing.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("libp2p") is None, reason="py-libp2p ([bench] extra) not installed"
)
def test_libp2p_worker_failure_is_an_error_not_a_number() -> None:
    from benchmarks import bench_libp2p

    # nobody listens on the address: the sender fails and says why, within the deadline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = "12D3KooWFy8BjPcNCDW5uEPyzrqWqjycHgv1FWC7Kx8jQ1Jbunp5"
    worker = bench_libp2p._Worker("--send", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}", "64", "1")
    try:
        with pytest.raises(RuntimeError, match="py-libp2p sender failed"):
            worker.next_json(time.monotonic() + 60, "sender")
    finally:
        worker.stop()
        worker.err.close()
    assert worker.proc.returncode is not None
