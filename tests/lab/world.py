"""The shared "world" of the lab self-tests: echo servers on the public hosts and probes
started on demand (IPv4 self-test and IPv6 self-test)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

from tests.lab.netlab import Lab
from tests.lab.probe import Addr, Probe, UdpSocket

#: How long a packet that should *not* arrive is waited for.
SILENCE = 0.5
ECHO_PORT = 4000
ECHO_PORT2 = 4001


@dataclass
class EchoWorld:
    lab: Lab
    echo1: UdpSocket  # pub A1:4000
    echo1b: UdpSocket  # pub A1:4001 (same address, other port)
    echo1c: UdpSocket  # pub A2:4000 (same host, other address)
    echo2: UdpSocket  # pub2 B:4000 (other host)
    tcp_echo: Addr  # pub A1:4000
    probes: dict[str, Probe] = field(default_factory=dict)
    ports: Iterator[int] = field(default_factory=lambda: itertools.count(20000, 7))

    @classmethod
    def start(cls, lab: Lab, a1: str, a2: str, b: str, first_port: int) -> Self:
        """Echo servers on pub's two addresses ``a1``/``a2`` and on pub2's ``b``."""
        pub = Probe.start(lab, "pub")
        pub2 = Probe.start(lab, "pub2")
        w = cls(
            lab=lab,
            echo1=pub.udp_echo(a1, ECHO_PORT),
            echo1b=pub.udp_echo(a1, ECHO_PORT2),
            echo1c=pub.udp_echo(a2, ECHO_PORT),
            echo2=pub2.udp_echo(b, ECHO_PORT),
            tcp_echo=(a1, pub.tcp_echo(a1, ECHO_PORT)),
            ports=itertools.count(first_port, 7),
        )
        w.probes.update(pub=pub, pub2=pub2)
        return w

    def probe(self, node: str) -> Probe:
        if node not in self.probes:
            self.probes[node] = Probe.start(self.lab, node)
        return self.probes[node]

    @staticmethod
    def addr(s: UdpSocket) -> Addr:
        return s.addr, s.port


def payloads(sock: UdpSocket, timeout: float = SILENCE) -> set[str]:
    return {data for _, data in sock.recv(timeout)}
