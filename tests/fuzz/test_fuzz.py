"""The fuzz targets in the normal suite: a short Hypothesis run of each (about two seconds
in all), the seeds checked to be valid inputs, and, when atheris is installed, one short
libFuzzer run over every target at once."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.errors import ProtocolError
from crust.proto import cache, igd, natpmp, pcp, punch, stun
from crust.proto.session import parse_echo_reply
from tests.fuzz.targets import SEEDS, TARGETS

ROOT = Path(__file__).resolve().parents[2]
SHORT = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_target_has_seeds() -> None:
    assert set(SEEDS) == set(TARGETS)
    assert all(SEEDS[name] for name in TARGETS)


def test_seeds_are_valid_inputs() -> None:
    """The seeds reach past the first checks: the parsers accept them."""
    for seed in SEEDS["stun"]:
        stun.parse(seed)
    for seed in SEEDS["punch"]:
        punch.parse(seed)
    for seed in SEEDS["connection_info"]:
        punch.PublicConnectionInfo.from_bytes(seed)
    for seed in SEEDS["address_echo"]:
        assert parse_echo_reply(seed) is not None
    for seed in SEEDS["bootstrap_cache"]:
        assert len(cache.BootstrapCache.from_bytes(seed)) == 2
    for seed in SEEDS["natpmp"]:
        natpmp.parse_response(seed)
    for seed in SEEDS["pcp"]:
        pcp.parse_response(seed)
    igd.parse_ssdp_response(SEEDS["igd"][0][1:])
    assert igd.parse_device_description(SEEDS["igd"][1][1:], "http://10.0.0.1:5000/d.xml")


def test_the_session_target_reaches_the_frame_parser() -> None:
    """Sealed garbage gets through decryption: the session closes with a frame-level
    ProtocolError, not a decryption failure."""
    from tests.fuzz import targets

    pair = targets._established()
    send = pair.a._send
    assert send is not None
    plain = b"\xff" * 40
    record = bytearray(2 + len(plain) + 16)
    record[0:2] = (len(plain) + 16).to_bytes(2, "big")
    send.encrypt_into(plain, memoryview(record)[2:])
    pair.b.receive_data(bytes(record), pair.clock.now)
    assert pair.b.closed
    assert pair.b.closed_event is not None
    error = pair.b.closed_event.error
    assert isinstance(error, ProtocolError)
    assert "decrypt" not in str(error).lower()


def _mutations(name: str) -> st.SearchStrategy[bytes]:
    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(SEEDS[name])))
        for _ in range(draw(st.integers(1, 4))):
            if not data:
                break
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            del data[draw(st.integers(0, len(data))) :]
        return bytes(data)

    return mutated()


@pytest.mark.parametrize("name", sorted(TARGETS))
@SHORT
@given(data=st.data())
def test_target_lets_only_protocol_errors_out(name: str, data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=512), _mutations(name)))
    TARGETS[name](raw)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.timeout(60)
def test_atheris_runs_every_target_briefly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", "all", "2", "--artifacts", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[0])["engine"] == "atheris"
    assert "stat::number_of_executed_units" in proc.stderr
    assert not list(tmp_path.glob("all-crash-*"))


def test_a_crash_is_reported(tmp_path: Path) -> None:
    """The runner does fail when a target lets something else out (Hypothesis engine)."""
    code = (
        "import sys; from tests.fuzz import targets, run\n"
        "def bad(data: bytes) -> None:\n"
        "    if len(data) > 3: raise ValueError('boom')\n"
        "targets.TARGETS['stun'] = bad\n"
        "sys.exit(run.main(['stun', '1', '--engine', 'hypothesis']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode != 0
    assert "ValueError: boom" in proc.stderr
