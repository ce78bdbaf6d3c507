"""The TCP listener's kernel filter: connection attempts from dropped addresses get no
answer at all (their SYNs never reach the accept queue); everyone else connects."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Coroutine
from typing import Any

import pytest

from crust.aio.tcp import TcpListener, drop_filter

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_PACKET"), reason="Linux socket filters")


async def _answered(host: str, port: int, source: str | None = None) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    if source is not None:
        s.bind((source, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, (host, port)), 1.0)
        return True
    except TimeoutError:
        return False  # no answer at all: the SYN was dropped
    except ConnectionError:
        return True  # answered, then reset by the refusal at accept
    finally:
        s.close()


def _never(coro: Coroutine[Any, Any, None]) -> None:
    coro.close()
    raise AssertionError("every connection is refused at accept")


def _listener(host: str) -> tuple[TcpListener, int]:
    # every connection that reaches accept is refused there (a reset): the kernel has
    # completed its handshake by then, so the dialler's connect succeeds
    lst = TcpListener.bind(host, 0, lambda _tr: None, lambda _h: True, _never)
    return lst, int(lst.sockets[0].getsockname()[1])


async def test_dropped_ipv4_addresses_get_no_answer() -> None:
    lst, port = _listener("127.0.0.1")
    try:
        assert await _answered("127.0.0.1", port, "127.0.0.66")
        assert lst.drop_from(["127.0.0.66", "198.51.100.7", "not an address"])
        assert not await _answered("127.0.0.1", port, "127.0.0.66")
        assert await _answered("127.0.0.1", port, "127.0.0.1")
        assert lst.drop_from([])  # lifted
        assert await _answered("127.0.0.1", port, "127.0.0.66")
    finally:
        lst.close()


async def test_dropped_ipv6_addresses_get_no_answer() -> None:
    lst, port = _listener("::1")
    try:
        assert lst.drop_from(["2001:db8::1"])
        assert await _answered("::1", port)
        assert lst.drop_from(["2001:db8::1", "::1"])
        assert not await _answered("::1", port)
    finally:
        lst.close()


def test_the_filter_program_has_one_block_per_address() -> None:
    insn = struct.calcsize("HBBI")
    v4 = drop_filter(socket.AF_INET, ["10.0.0.1", "10.0.0.2", "::1", "junk"])
    assert len(v4) == (1 + 2 * 2 + 1) * insn  # load, (compare, drop) per address, accept
    v6 = drop_filter(socket.AF_INET6, ["::1", "10.0.0.1"])
    assert len(v6) == (9 + 1) * insn  # four (load, compare) and a drop, then accept
    # the last instruction accepts the whole packet
    assert struct.unpack("HBBI", v4[-insn:]) == (0x06, 0, 0, 0xFFFFFFFF)
