"""``crust netcheck``: what the network in front of this host does to crust.

Two kinds of observers:

* STUN servers (``--stun``): the RFC 5780 tests of :class:`~crust.aio.stun.NatProber` on a
  fresh UDP socket (the first server ideally supports RFC 5780 — coturn with two addresses
  does; the others add mapping observations), plus the latency of one Binding to each;
* crust nodes (``--contact``): a connection to each (TCP/QUIC as the contact says), its
  handshake time, the address the node saw us at, and an address echo to its UDP port.

Nothing is sent anywhere else. Without observers the command refuses to guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

from crust import errors
from crust.aio.stun import NatProber, StunDispatcher, resolve
from crust.config import Config
from crust.contact import Contact
from crust.identity import Identity
from crust.proto.natclass import NatClassification


@dataclass
class ObserverResult:
    observer: str
    kind: str
    """``"stun"`` or ``"crust"``."""
    ok: bool
    latency: float | None = None
    """Seconds: one Binding round trip (STUN), or connect + handshake (crust)."""
    mapped: str | None = None
    """The address the observer saw us at."""
    udp: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "observer": self.observer,
            "kind": self.kind,
            "ok": self.ok,
            "latency": self.latency,
            "mapped": self.mapped,
            "udp": self.udp,
            "error": self.error,
        }


@dataclass
class NetcheckReport:
    nat: NatClassification | None
    observers: list[ObserverResult] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    port_mapping: dict[str, bool] = field(default_factory=dict)
    """Port-mapping protocols that answered (when probed)."""

    @property
    def udp(self) -> bool:
        return any(o.udp for o in self.observers) or (
            self.nat is not None and self.nat.mapped is not None
        )

    @property
    def nat_type(self) -> str:
        return self.nat.nat_type if self.nat is not None else "unknown"

    def to_dict(self) -> dict[str, Any]:
        nat = self.nat
        return {
            "nat_type": self.nat_type,
            "external": self.external,
            "udp": self.udp,
            "mapping": str(nat.mapping) if nat else None,
            "filtering": str(nat.filtering) if nat else None,
            "port_preservation": nat.port_preservation if nat else None,
            "hairpinning": nat.hairpinning if nat else None,
            "port_allocation": str(nat.port_allocation) if nat else None,
            "port_mapping": dict(self.port_mapping),
            "observers": [o.to_dict() for o in self.observers],
            "classification": nat.to_dict() if nat else None,
        }


def _parse_server(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.ConfigError(f"{text!r}: a STUN server is HOST:PORT", "stun")
    return host, int(port)


async def netcheck(
    stun: list[str] | tuple[str, ...] = (),
    contacts: list[str] | tuple[str, ...] = (),
    *,
    network_name: str = "crust",
    timeout: float = 5.0,
    port_mapping: bool = False,
    gateway: str | None = None,
) -> NetcheckReport:
    """Run the checks; raises :class:`~crust.errors.ConfigError` for bad arguments.

    ``port_mapping`` also asks the default gateway (or ``gateway``) which of PCP, NAT-PMP and
    UPnP IGD answer."""
    if not stun and not contacts and not port_mapping:
        raise errors.ConfigError("give at least one STUN server or crust contact", "stun")
    servers = [_parse_server(s) for s in stun]
    parsed = [Contact.parse(c, field="contact") for c in contacts]
    report = NetcheckReport(nat=None)
    if servers:
        resolved = [await resolve(s) for s in servers]
        report.nat = await NatProber(
            server=resolved[0], observers=resolved[1:], timeout=timeout
        ).run()
        if report.nat.mapped is not None:
            report.external.append(f"udp://{_fmt(report.nat.mapped)}")
        async with StunDispatcher.open() as d:
            for text, addr in zip(stun, resolved, strict=True):
                try:
                    got = await d.binding(addr, timeout=timeout)
                    report.observers.append(
                        ObserverResult(text, "stun", True, got.rtt, _fmt(got.mapped), True)
                    )
                except (errors.CrustError, OSError) as exc:
                    report.observers.append(ObserverResult(text, "stun", False, error=str(exc)))
    if parsed:
        await _check_nodes(report, parsed, network_name, timeout)
    if port_mapping:
        report.port_mapping = await probe_port_mapping(gateway, timeout=min(timeout, 3.0))
    return report


async def probe_port_mapping(gateway: str | None, *, timeout: float = 3.0) -> dict[str, bool]:
    """Which port-mapping protocols the gateway answers (PCP ANNOUNCE, NAT-PMP external
    address request, UPnP IGD discovery), asked concurrently."""
    from crust.aio import portmap

    gw = gateway if gateway is not None else portmap.default_gateway()
    if gw is None:
        return {"pcp": False, "natpmp": False, "upnp": False}

    async def pcp() -> bool:
        client = portmap.PcpClient(gw)
        try:
            await client.announce()
            return True
        finally:
            client.close()

    async def natpmp() -> bool:
        client = portmap.NatPmpClient(gw)
        try:
            await client.external_address()
            return True
        finally:
            client.close()

    async def upnp() -> bool:
        await portmap.IgdClient.discover(gw, timeout=timeout)
        return True

    names = ("pcp", "natpmp", "upnp")
    results = await asyncio.gather(
        *(asyncio.wait_for(f(), timeout) for f in (pcp, natpmp, upnp)), return_exceptions=True
    )
    return {n: r is True for n, r in zip(names, results, strict=True)}


async def _check_nodes(
    report: NetcheckReport, contacts: list[Contact], network_name: str, timeout: float
) -> None:
    from crust.service import Service

    config = Config(
        network_name=network_name,
        listen=("tcp://0.0.0.0:0", "quic://0.0.0.0:0"),
        service_discovery=False,
        port_mapping=False,
        bootstrap_cache=None,
        connect_timeout=timeout,
        hole_punching=False,
        relay=False,
    )
    async with Service(config, identity=Identity.generate()) as svc:
        traversal = svc._traversal
        assert traversal is not None
        for contact in contacts:
            start = time.monotonic()
            try:
                peer = await svc.connect(str(contact))
            except errors.CrustError as exc:
                report.observers.append(
                    ObserverResult(
                        str(contact), "crust", False, error=f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            latency = time.monotonic() - start
            conn = svc._active.get(peer)
            mapped = traversal.observed_by(peer)
            udp: bool | None = contact.scheme == "quic" or None
            mux = traversal._listener_mux()
            if mux is not None:
                loopback = _loopback(contact.host)
                for text in svc._known.get(peer, []):
                    c = Contact.parse(text)
                    if c.scheme != "quic" or _loopback(c.host) != loopback:
                        continue
                    with contextlib.suppress(TimeoutError, OSError):
                        seen = await traversal.echo(mux, (c.host, c.port), timeout=1.0)
                        udp = True
                        mapped = mapped or f"quic://{_fmt(seen)}"
                        break
                else:
                    udp = udp or False
            report.observers.append(
                ObserverResult(str(contact), "crust", conn is not None, latency, mapped, udp)
            )
        for ep in svc.endpoints():
            if ep.external and ep.external not in report.external:
                report.external.append(ep.external)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
