"""``crust netcheck`` on loopback: a STUN server with two addresses (127.0.0.1 and 127.0.0.2)
and a crust node, which also answers STUN on its QUIC port."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from crust import errors
from crust.aio.stun import StunDispatcher, StunServer, stun_binding
from crust.cli.main import main
from crust.contact import Contact
from crust.netcheck import netcheck


async def test_netcheck_with_stun_and_a_crust_node(make: Callable[..., Any]) -> None:
    node, _ = await make()
    async with await StunServer.start(("127.0.0.1", 0), alternate_ip="127.0.0.2") as server:
        host, port = server.address
        report = await netcheck([f"{host}:{port}"], [node.contacts()[0]], timeout=2.0)
    d = report.to_dict()
    assert d["nat_type"] == "none"  # loopback: the mapped address is our own
    assert d["udp"] is True
    assert d["mapping"] == "endpoint-independent"
    kinds = {o["kind"]: o for o in d["observers"]}
    assert kinds["stun"]["ok"] and kinds["stun"]["mapped"].startswith("127.0.0.1:")
    assert kinds["crust"]["ok"] and kinds["crust"]["latency"] > 0
    assert kinds["crust"]["udp"] is True  # the node answered the address echo on its UDP port


async def test_every_node_answers_stun_on_its_quic_port(make: Callable[..., Any]) -> None:
    node, _ = await make()
    quic = next(Contact.parse(c) for c in node.contacts() if c.startswith("quic://"))
    async with StunDispatcher.open("127.0.0.1") as d:
        got = await stun_binding(d, (quic.host, quic.port), timeout=2.0)
    assert got.mapped == d.local_address


async def test_netcheck_needs_an_observer() -> None:
    with pytest.raises(errors.ConfigError):
        await netcheck([], [])
    with pytest.raises(errors.ConfigError, match="HOST:PORT"):
        await netcheck(["nonsense"], [])


async def test_unreachable_node_is_reported_not_raised() -> None:
    report = await netcheck([], ["tcp://127.0.0.1:1"], timeout=1.0)
    (obs,) = report.observers
    assert not obs.ok and obs.error


def test_cli_json_output(make: Callable[..., Any]) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main, ["netcheck", "--contact", "tcp://127.0.0.1:1", "--json", "--timeout", "1"]
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["observers"][0]["ok"] is False
    bad = runner.invoke(main, ["netcheck", "--stun", "x", "--no-port-mapping"])
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output
