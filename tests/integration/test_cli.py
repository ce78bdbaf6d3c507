"""The ``crust`` command line, driven as real subprocesses on loopback.

Every node runs with ``--testing`` (loopback listener, no beacon, no port mapping, no cache);
every wait reads output lines with a timeout — nothing sleeps to wait.
"""

from __future__ import annotations

import base64
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import crust
from tests.nodeproc import CLI, NodeProcess, cli_env

Spawn = Callable[..., NodeProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``crust node --json --testing`` processes; all are killed at the end."""
    nodes: list[NodeProcess] = []

    def start(*args: str, stdin: int | IO[Any] | None = subprocess.PIPE) -> NodeProcess:
        node = NodeProcess(list(args), tmp_path, len(nodes), stdin)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            node.close()


def run_cli(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(tmp_path),
        check=False,
    )


def dead_contact() -> str:
    """A loopback port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def connect(a: NodeProcess, b: NodeProcess) -> None:
    a.command(cmd="connect", to=b.contact)
    a.expect("connected", peer=b.peer_id)
    a.expect("peer_connected", peer=b.peer_id)
    b.expect("peer_connected", peer=a.peer_id)


# --------------------------------------------------------------------------- crust node


def test_ready_line_lists_dialable_loopback_contacts(spawn: Spawn) -> None:
    a = spawn()
    assert len(a.peer_id) == 52
    assert crust.PeerId.parse(a.peer_id)
    contacts = a.ready["contacts"]
    assert [c.split("://")[0] for c in contacts] == ["tcp", "quic"]  # --testing listens on both
    for contact in contacts:
        assert contact.split("://")[1].startswith("127.0.0.1:")
        assert contact.endswith("#" + a.peer_id)
        assert "0.0.0.0" not in contact
    started = {a.expect("listener_started")["endpoint"] for _ in contacts}
    assert {c.partition("#")[0] for c in contacts} == started


def test_node_listens_on_quic_only_and_connects_over_it(spawn: Spawn) -> None:
    a = spawn("--listen", "quic://127.0.0.1:0")
    b = spawn("--listen", "quic://127.0.0.1:0")
    assert a.contact.startswith("quic://127.0.0.1:")
    a.command(cmd="connect", to=b.contact, id="q")
    assert a.expect("connected", id="q")["peer"] == b.peer_id
    assert a.expect("peer_connected", peer=b.peer_id)["transport"] == "quic"
    a.command(cmd="send", peer=b.peer_id, data="over quic")
    assert b.expect("message_received", peer=a.peer_id)["data"] == "over quic"


def test_connect_send_peers_quit(spawn: Spawn) -> None:
    a, b = spawn(), spawn()
    a.command(cmd="connect", to=b.contact)
    assert a.expect("connected", peer=b.peer_id)["to"] == b.contact
    out = a.expect("peer_connected", peer=b.peer_id)
    assert (out["transport"], out["path"], out["outbound"]) == ("tcp", "direct", True)
    inb = b.expect("peer_connected", peer=a.peer_id)
    assert inb["outbound"] is False
    assert inb["remote"].startswith("tcp://127.0.0.1:")

    text = 'hello ünïcode ✓ "quoted"\nsecond line'
    a.command(cmd="send", peer=b.peer_id, data=text)
    got = b.expect("message_received", peer=a.peer_id)
    assert got["data"] == text
    assert got["priority"] == 0
    assert a.expect("sent", peer=b.peer_id)["bytes"] == len(text.encode())

    binary = bytes([0xFF, 0x00, 0x80, 0xFE])
    a.command(cmd="send", peer=b.peer_id, data_b64=base64.b64encode(binary).decode(), priority=3)
    got = b.expect("message_received", peer=a.peer_id)
    assert "data" not in got
    assert base64.b64decode(got["data_b64"]) == binary
    assert got["priority"] == 3

    b.command(cmd="send", peer=a.peer_id, data="and back")
    assert a.expect("message_received", peer=b.peer_id)["data"] == "and back"

    a.command(cmd="peers")
    (row,) = a.expect("peers")["peers"]
    assert row["peer"] == b.peer_id
    assert (row["transport"], row["path"]) == ("tcp", "direct")
    assert row["remote"] == b.contact.partition("#")[0]
    assert "rtt" in row

    a.command(cmd="endpoints")
    eps = a.expect("endpoints")
    assert eps["contacts"] == a.ready["contacts"]
    assert eps["endpoints"][0]["protocol"] == "tcp"
    assert eps["endpoints"][0]["local"].startswith("tcp://127.0.0.1:")

    a.command(cmd="statistics", id="s1")
    stats = a.expect("statistics", id="s1")
    assert stats["peers"] == 1
    assert stats["connects_outbound"] == 1

    a.command(cmd="quit")
    assert a.wait_exit() == 0
    assert a.rest()[-1] == {"event": "stopped"}
    b.expect("peer_lost", peer=a.peer_id)


def test_connect_by_contact_list_and_by_peer_id(spawn: Spawn) -> None:
    a, b = spawn(), spawn()
    dead = dead_contact() + "#" + b.peer_id
    a.command(cmd="connect", to=[dead, b.contact], id="list")
    assert a.expect("connected", id="list")["peer"] == b.peer_id
    b.expect("peer_connected", peer=a.peer_id)
    a.command(cmd="connect", to=b.peer_id, id="again")  # already connected: at once
    assert a.expect("connected", id="again")["peer"] == b.peer_id
    a.command(cmd="connect", to=str(crust.Identity.generate().peer_id))
    # unknown peer: b (the only connected node) is asked to introduce it and is not connected
    assert a.expect("connect_failed")["error"] == "HolePunchFailed"


def test_disconnect(spawn: Spawn) -> None:
    a, b = spawn(), spawn()
    connect(a, b)
    a.command(cmd="disconnect", peer=b.peer_id)
    a.expect("disconnected", peer=b.peer_id)
    a.expect("peer_lost", peer=b.peer_id)
    b.expect("peer_lost", peer=a.peer_id)
    a.command(cmd="peers")
    assert a.expect("peers")["peers"] == []


def test_bad_lines_get_errors_and_the_node_keeps_working(spawn: Spawn) -> None:
    a, b = spawn(), spawn()
    stranger = str(crust.Identity.generate().peer_id)

    a.send_raw("this is not json")
    assert a.expect("error")["error"] == "BadCommand"
    a.send_raw("[1, 2, 3]")
    assert a.expect("error")["error"] == "BadCommand"
    a.command(cmd="fly", id=1)
    err = a.expect("error", id=1)
    assert (err["error"], err["cmd"]) == ("BadCommand", "fly")
    assert "fly" in err["message"]
    a.command(cmd="send", data="no peer", id=2)
    err = a.expect("error", id=2)
    assert err["error"] == "BadCommand"
    assert "peer" in err["message"]
    a.command(cmd="send", peer="not-a-peer-id", data="x", id=3)
    err = a.expect("error", id=3)
    assert (err["error"], err["field"]) == ("ConfigError", "peer")
    a.command(cmd="connect", to="tcp://nowhere", id=4)
    err = a.expect("error", id=4)
    assert (err["error"], err["field"]) == ("ConfigError", "to")
    a.command(cmd="send", peer=stranger, data="x", id=5)
    assert a.expect("error", id=5)["error"] == "NotConnected"
    a.command(cmd="send", peer=stranger, data="x", priority=999, id=6)
    assert a.expect("error", id=6)["error"] == "InvalidArgument"
    a.command(cmd="send", peer=stranger, data="x", priority="high", id=7)
    assert a.expect("error", id=7)["error"] == "BadCommand"
    a.command(cmd="disconnect", peer=stranger, id=8)
    assert a.expect("error", id=8)["error"] == "NotConnected"
    a.command(cmd="send", peer=stranger, data_b64="%%%", id=9)
    assert a.expect("error", id=9)["error"] == "BadCommand"

    connect(a, b)  # still fully working
    a.command(cmd="send", peer=b.peer_id, data="still here")
    assert b.expect("message_received", peer=a.peer_id)["data"] == "still here"
    assert a.proc.poll() is None


def test_a_slow_connect_does_not_block_later_commands(spawn: Spawn) -> None:
    a, b = spawn(), spawn()
    connect(a, b)
    # a loopback listener that never answers: the handshake hangs until it times out
    with socket.create_server(("127.0.0.1", 0)) as silent:
        target = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        a.command(cmd="connect", to=target)
        a.command(cmd="send", peer=b.peer_id, data="not blocked")
        assert b.expect("message_received", peer=a.peer_id)["data"] == "not blocked"
        a.expect("sent", peer=b.peer_id)
        assert not a.seen("connect_failed")
        assert not [line for line in a.seen("connected") if line["to"] == target]


def test_contact_option_connects_at_start_and_bootstraps(spawn: Spawn) -> None:
    a = spawn()
    b = spawn("--contact", a.contact)
    assert b.expect("peer_connected", peer=a.peer_id)["outbound"] is True
    a.expect("peer_connected", peer=b.peer_id)
    b.command(cmd="bootstrap")
    b.expect("bootstrap_connected", peer=a.peer_id)

    a.command(cmd="bootstrap")  # no contacts at all
    assert a.expect("bootstrap_failed")["error"] == "BootstrapFailed"


def test_unreachable_contacts_are_reported_and_the_node_keeps_running(spawn: Spawn) -> None:
    dead = dead_contact()
    a = spawn("--contact", dead)
    assert a.expect("connect_failed", target=dead)["error"] == "ConnectError"
    a.command(cmd="bootstrap")
    failed = a.expect("bootstrap_failed")
    assert failed["error"] == "BootstrapFailed"
    assert [e["error"] for e in failed["errors"]] == ["ConnectError"]
    a.command(cmd="peers")
    assert a.expect("peers")["peers"] == []


def test_end_of_input_does_not_stop_the_node(spawn: Spawn) -> None:
    a = spawn(stdin=subprocess.DEVNULL)
    a.expect("input_closed")
    b = spawn()
    connect(b, a)  # a still accepts after its input ended
    a.proc.send_signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    assert a.rest()[-1] == {"event": "stopped"}
    b.proc.send_signal(signal.SIGINT)
    assert b.wait_exit() == 0


def test_closed_stdin_pipe_keeps_running(spawn: Spawn) -> None:
    a = spawn()
    assert a.proc.stdin is not None
    a.proc.stdin.close()
    a.expect("input_closed")
    b = spawn()
    connect(b, a)
    a.proc.send_signal(signal.SIGINT)
    assert a.wait_exit() == 0


def test_human_output(tmp_path: Path) -> None:
    cmds = '{"cmd": "peers"}\nnot json\n{"cmd": "quit"}\n'
    done = run_cli(tmp_path, "node", "--testing", stdin=cmds)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ready" in lines[0]
    assert "tcp://127.0.0.1:" in lines[0]
    assert any("0 peer(s)" in line for line in lines)
    assert any("BadCommand" in line for line in lines)
    assert "stopped" in lines[-1]
    assert not done.stdout.lstrip().startswith("{")


# --------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--listen", "foo"], "--listen"),
        (["--listen", "tcp://localhost:0"], "--listen"),
        (["--contact", "foo"], "--contact"),
        (["--contact", "udp://127.0.0.1:1"], "--contact"),
        (["--network", ""], "--network"),
        (["--config", "missing.toml"], "--config"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path: Path, args: list[str], option: str) -> None:
    args = [str(tmp_path / a) if a.endswith(".toml") else a for a in args]
    done = run_cli(tmp_path, "node", "--json", "--testing", *args)
    assert done.returncode == 2
    assert option in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("listen = [", ["--config", "not valid TOML"]),
        ("bogus_field = 1\n", ["--config", "bogus_field"]),
        ("max_message_size = -1\n", ["--config", "max_message_size"]),
    ],
)
def test_bad_config_file(tmp_path: Path, toml: str, words: list[str]) -> None:
    path = tmp_path / "crust.toml"
    path.write_text(toml)
    done = run_cli(tmp_path, "node", "--json", "--testing", "--config", str(path))
    assert done.returncode == 2
    for word in words:
        assert word in done.stderr
    assert "Traceback" not in done.stderr


def test_config_file_and_options(spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "crust.toml"
    path.write_text('[crust]\nnetwork_name = "lab"\n')
    a = spawn("--config", str(path))
    b = spawn("--network", "lab", "--listen", "tcp://127.0.0.1:0")
    c = spawn()  # network "crust": refused by the others
    connect(a, b)
    c.command(cmd="connect", to=a.contact)
    assert c.expect("connect_failed")["error"] == "NetworkMismatch"


# --------------------------------------------------------------------------- crust id, demo


def test_id_creates_a_private_stable_identity(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "x"
    first = run_cli(tmp_path, "id", "--identity", str(path))
    assert first.returncode == 0, first.stderr
    peer_id = first.stdout.strip()
    assert len(peer_id) == 52
    assert str(crust.PeerId.parse(peer_id)) == peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = run_cli(tmp_path, "id", "--identity", str(path))
    assert again.stdout.strip() == peer_id
    assert crust.Identity.load(path).peer_id == crust.PeerId.parse(peer_id)


def test_id_rejects_a_bad_identity_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pem"
    path.write_text("not a key")
    done = run_cli(tmp_path, "id", "--identity", str(path))
    assert done.returncode == 2
    assert "--identity" in done.stderr
    assert "Traceback" not in done.stderr


def test_node_uses_the_identity_file(spawn: Spawn, tmp_path: Path) -> None:
    path = tmp_path / "node.pem"
    peer_id = run_cli(tmp_path, "id", "--identity", str(path)).stdout.strip()
    a = spawn("--identity", str(path))
    assert a.peer_id == peer_id


def test_demo(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "demo")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for word in ("Links", "transport", "rtt", "MB/s", "msgs/s", "alice", "dave", "Done"):
        assert word in out, word
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "xdg").exists()  # wrote no per-user files


def test_help_lists_the_commands(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "--help")
    assert done.returncode == 0
    for name in ("id", "node", "demo"):
        assert name in done.stdout
