"""PortMapper against a fake gateway on 127.0.0.1: protocol choice and fallback, renewal at
half the lifetime, re-mapping after a gateway reboot (epoch), deletion on close, UPnP
conflicts, errors; and the Service's side of it (gated by ``Config.port_mapping``)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

import crust
import crust.service
from crust.aio.portmap import (
    GrantedMapping,
    IgdClient,
    MappingRequest,
    NatPmpClient,
    PcpClient,
    PortMapper,
    default_gateway,
    is_private_external,
    parse_proc_net_route,
)
from crust.errors import ConfigError, PortMappingError
from crust.events import PortMappingGranted
from crust.service import Service
from crust.testing.fake_gateway import EXTERNAL, FakeGateway, closed_udp_port

TCP = MappingRequest("tcp", 40000)
UDP = MappingRequest("udp", 40001)
WAIT = 10.0


class Granted:
    """Collects on_granted / on_error callbacks; lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[GrantedMapping] = []
        self.errors: list[PortMappingError] = []
        self.lost: list[GrantedMapping] = []
        self._event = asyncio.Event()

    def granted(self, m: GrantedMapping) -> None:
        self.items.append(m)
        self._event.set()

    def error(self, e: PortMappingError) -> None:
        self.errors.append(e)
        self._event.set()

    def gone(self, m: GrantedMapping, e: PortMappingError) -> None:
        self.lost.append(m)
        self._event.set()

    async def wait(self, count: int = 1, errors: int = 0, lost: int = 0) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.items) < count or len(self.errors) < errors or len(self.lost) < lost:
                self._event.clear()
                await self._event.wait()

    def mapper(self, requests: list[MappingRequest], **kwargs: Any) -> PortMapper:
        return PortMapper(
            requests, on_granted=self.granted, on_error=self.error, on_lost=self.gone, **kwargs
        )


async def test_pcp_maps_renews_and_deletes() -> None:
    async with FakeGateway("pcp") as gw:
        gw.control.lifetimes["tcp"] = 2  # renewed after 1 s
        got = Granted()
        async with got.mapper([TCP, UDP], **gw.kwargs()) as mapper:
            await got.wait(2)
            assert {(m.method, m.protocol, m.external) for m in got.items} == {
                ("pcp", "tcp", (EXTERNAL, 40000)),
                ("pcp", "udp", (EXTERNAL, 40001)),
            }
            assert {m.internal for m in got.items} == {("127.0.0.1", 40000), ("127.0.0.1", 40001)}
            assert {m.lifetime for m in got.items} == {2.0, 3600.0}
            assert mapper.method == "pcp"
            first = gw.recorder.of("pcp-map", protocol="tcp")[0].fields
            # the client address in the request is the one the request came from
            assert first["client"] == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
            assert first["lifetime"] == 7200 and first["suggested"] == 40000
            # renewed (same nonce) before the 2 s lifetime ran out, and again
            await gw.recorder.wait("pcp-map", 3, protocol="tcp")
            renewals = gw.recorder.of("pcp-map", protocol="tcp")
            assert {r.fields["nonce"] for r in renewals} == {first["nonce"]}
            # a renewal that grants the same endpoint reports nothing new
            assert len(got.items) == 2
            udp_nonce = gw.recorder.of("pcp-map", protocol="udp")[0].fields["nonce"]
            assert udp_nonce != first["nonce"]
        # closed: both deleted with their own nonce
        deletes = gw.recorder.of("pcp-map", lifetime=0)
        assert {(d.fields["protocol"], d.fields["nonce"]) for d in deletes} == {
            ("tcp", first["nonce"]),
            ("udp", udp_nonce),
        }
        assert gw.control.table == {}
        assert mapper.mappings() == []


async def test_natpmp_when_the_gateway_has_no_pcp() -> None:
    async with FakeGateway("natpmp") as gw:
        gw.control.lifetimes["udp"] = 2
        gw.control.port_offset = 1000  # the gateway picks other external ports
        got = Granted()
        async with got.mapper([TCP, UDP], **gw.kwargs()) as mapper:
            await got.wait(2)
            assert {(m.method, m.protocol, m.external) for m in got.items} == {
                ("natpmp", "tcp", (EXTERNAL, 41000)),
                ("natpmp", "udp", (EXTERNAL, 41001)),
            }
            assert mapper.method == "natpmp"
            await gw.recorder.wait("natpmp-map", 2, protocol="udp", lifetime=7200)
            # the renewal asks for the external port it was given
            assert gw.recorder.of("natpmp-map", protocol="udp")[1].fields["suggested"] == 41001
        assert {
            (r.fields["protocol"], r.fields["internal"])
            for r in gw.recorder.of("natpmp-map", lifetime=0)
        } == {("tcp", 40000), ("udp", 40001)}
        assert gw.control.table == {}


async def test_upnp_when_nothing_answers_on_5351() -> None:
    async with FakeGateway("silent") as gw:
        gw.igd.conflicts.add(40000)  # someone else has TCP 40000: another port is chosen
        rng = random.Random(7)
        expected_port = random.Random(7).randint(1024, 65535)
        got = Granted()
        kwargs = gw.kwargs(server_port=closed_udp_port(), rng=rng)
        async with got.mapper([TCP, UDP], **kwargs) as mapper:
            await got.wait(2)
            assert {(m.method, m.protocol, m.external, m.lifetime) for m in got.items} == {
                ("upnp", "tcp", (EXTERNAL, expected_port), 7200.0),
                ("upnp", "udp", (EXTERNAL, 40001), 7200.0),
            }
            assert mapper.method == "upnp"
            add = gw.recorder.of("AddPortMapping", NewExternalPort="40001")[0].fields
            assert add["NewInternalClient"] == "127.0.0.1" and add["NewProtocol"] == "UDP"
            assert add["NewInternalPort"] == "40001" and add["NewLeaseDuration"] == "7200"
            # our GetGenericPortMappingEntry reads the same table
            client = await IgdClient.discover(
                "127.0.0.1", targets=[("127.0.0.1", gw.igd.ssdp_port)], timeout=2.0
            )
            entries = await client.port_mappings()
            assert {(e.protocol, e.external_port, e.internal_port) for e in entries} == {
                ("tcp", expected_port, 40000),
                ("udp", 40001, 40001),
            }
        assert gw.igd.table == {}
        deleted = {
            (d.fields["NewProtocol"], d.fields["NewExternalPort"])
            for d in gw.recorder.of("DeletePortMapping")
        }
        assert deleted == {("TCP", str(expected_port)), ("UDP", "40001")}


async def test_upnp_permanent_leases_only() -> None:
    async with FakeGateway("silent") as gw:
        gw.igd.only_permanent = True
        got = Granted()
        async with got.mapper([UDP], **gw.kwargs(server_port=closed_udp_port())):
            await got.wait(1)
            assert got.items[0].lifetime == 0.0
            leases = [r.fields["NewLeaseDuration"] for r in gw.recorder.of("AddPortMapping")]
            assert leases == ["7200", "0"]
        assert gw.igd.table == {}


async def test_a_description_on_another_host_is_not_fetched() -> None:
    async with FakeGateway("silent") as gw:
        gw.igd.location_host = "127.0.0.2"  # the answer points somewhere else
        got = Granted()
        kwargs = gw.kwargs(server_port=closed_udp_port(), upnp_timeout=0.5)
        async with got.mapper([UDP], **kwargs) as mapper:
            await got.wait(0, errors=1)
            assert "announced a description on 127.0.0.2" in str(got.errors[0])
            assert mapper.mappings() == []
        assert gw.recorder.of("GetExternalIPAddress") == []


async def test_remaps_everything_when_the_gateway_lost_its_state() -> None:
    async with FakeGateway("pcp") as gw:
        gw.control.lifetimes["tcp"] = 2  # renewed every second
        got = Granted()
        async with got.mapper([TCP, UDP], **gw.kwargs()):
            await got.wait(2)
            await gw.recorder.wait("pcp-map", 2, protocol="tcp")
            udp_before = len(gw.recorder.of("pcp-map", protocol="udp"))
            gw.control.reboot()
            # the next TCP renewal sees the epoch restart: UDP (due in 30 min) is redone now
            await gw.recorder.wait("pcp-map", udp_before + 1, protocol="udp")
            assert set(gw.control.table) == {("tcp", 40000), ("udp", 40001)}


async def test_a_mapping_that_cannot_be_renewed_is_reported_lost() -> None:
    async with FakeGateway("pcp") as gw:
        gw.control.lifetimes["tcp"] = 2
        got = Granted()
        async with got.mapper([TCP, UDP], **gw.kwargs(retry_interval=0.5)) as mapper:
            await got.wait(2)
            gw.control.mode = "silent"  # the gateway stops answering
            await got.wait(2, lost=1, errors=1)  # renewal failed, and mapping it again too
            assert [(m.protocol, m.internal[1]) for m in got.lost] == [("tcp", 40000)]
            assert [m.protocol for m in mapper.mappings()] == ["udp"]
            gw.control.mode = "pcp"  # back: the lost mapping is requested again
            await got.wait(3)
            assert got.items[-1].protocol == "tcp"


async def test_garbage_from_the_gateway_is_ignored() -> None:
    async with FakeGateway("pcp") as gw:
        gw.control.garbage_first = True
        got = Granted()
        async with got.mapper([UDP], **gw.kwargs()):
            await got.wait(1)
        assert got.errors == []


async def test_nothing_answers() -> None:
    async with FakeGateway("silent") as gw:
        got = Granted()
        kwargs = gw.kwargs(
            server_port=closed_udp_port(),
            ssdp_targets=[("127.0.0.1", closed_udp_port())],
            upnp_timeout=0.5,
        )
        async with got.mapper([TCP], **kwargs) as mapper:
            await got.wait(0, errors=1)
            message = str(got.errors[0])
            assert "pcp" in message and "natpmp" in message and "upnp" in message
            assert mapper.mappings() == [] and mapper.last_error is got.errors[0]


async def test_clients_directly() -> None:
    async with FakeGateway("pcp") as gw:
        nat = NatPmpClient("127.0.0.1", port=gw.udp_port, delays=[0.5])
        assert await nat.external_address() == EXTERNAL
        r = await nat.map("tcp", 5000, 5000, 60)
        assert (r.internal_port, r.external_port, r.lifetime) == (5000, 5000, 60)
        nat.close()
        client = PcpClient("127.0.0.1", port=gw.udp_port, delays=[0.5])
        assert await client.announce() >= 0
        grant = await client.map(bytes(12), "udp", 5001, 60)
        assert grant.result.external_address == EXTERNAL and grant.lifetime == 60
        client.close()
    nobody = NatPmpClient("127.0.0.1", port=closed_udp_port(), delays=[0.5])
    try:
        with pytest.raises(PortMappingError):
            await nobody.external_address()
    finally:
        nobody.close()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        PortMapper([])
    assert err.value.field == "requests"
    for kwargs, name in (
        ({"methods": ["smtp"]}, "methods"),
        ({"lifetime": 0}, "lifetime"),
        ({"gateway": "router.local"}, "gateway"),
        ({"retry_interval": 0}, "retry_interval"),
        ({"description": "line\nbreak"}, "description"),
        ({"description": "x" * 300}, "description"),
    ):
        with pytest.raises(ConfigError) as err:
            PortMapper([TCP], **kwargs)
        assert err.value.field == name
    with pytest.raises(ConfigError):
        PortMapper([MappingRequest("sctp", 1)])
    with pytest.raises(ConfigError):
        PortMapper([MappingRequest("tcp", "80")])  # type: ignore[arg-type]


def test_default_gateway_from_proc_net_route(tmp_path: Any) -> None:
    text = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t0000010A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "eth1\t00000000\t0100A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t0100010A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "bad line\n"
    )
    assert parse_proc_net_route(text) == "10.1.0.1"
    assert parse_proc_net_route(text.replace("0003", "0001")) is None  # no RTF_GATEWAY
    route = tmp_path / "route"
    route.write_text(text)
    assert default_gateway(str(route)) == "10.1.0.1"
    assert default_gateway(str(tmp_path / "missing")) is None


def test_private_external_addresses() -> None:
    for address in ("10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "127.0.0.1", "0.0.0.0"):
        assert is_private_external(address)
    for address in ("198.18.0.10", "198.51.100.7", "8.8.8.8", "2001:db8::1"):
        assert not is_private_external(address)


# --------------------------------------------------------------------------- the Service


async def test_service_starts_port_mapping_only_when_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Service] = []
    original = Service._start_port_mapping

    async def spy(self: Service) -> None:
        calls.append(self)
        await original(self)

    monkeypatch.setattr(Service, "_start_port_mapping", spy)
    constructed: list[object] = []
    monkeypatch.setattr(crust.service, "PortMapper", lambda *a, **k: constructed.append(a))
    async with Service(crust.Config.for_testing()) as svc:
        assert calls == []  # for_testing: port_mapping is off
    async with Service(crust.Config.for_testing(port_mapping=True)) as svc:
        assert calls == [svc]
    # loopback listeners are never mapped: no PortMapper, nothing sent to any gateway
    assert constructed == []


async def test_service_reports_a_granted_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the service does with a mapping (the mapping itself is tested in the lab)."""
    async with Service(crust.Config.for_testing()) as svc:
        local = svc.endpoints()[0].local
        port = int(local.rsplit(":", 1)[1])
        events = svc.events()
        svc._on_port_mapped(
            GrantedMapping("pcp", "tcp", ("10.1.0.2", port), ("198.51.100.7", 4444), 7200.0)
        )
        assert svc.endpoints()[0].external == "tcp://198.51.100.7:4444"
        assert svc.contacts()[0] == f"tcp://198.51.100.7:4444#{svc.peer_id}"
        async with asyncio.timeout(WAIT):
            async for event in events:
                if isinstance(event, PortMappingGranted):
                    break
        assert event == PortMappingGranted(
            "pcp", f"tcp://10.1.0.2:{port}", "tcp://198.51.100.7:4444", 7200.0
        )
        # the mapping is lost: its external contact is no longer announced
        svc._on_port_unmapped(
            GrantedMapping("pcp", "tcp", ("10.1.0.2", port), ("198.51.100.7", 4444), 7200.0),
            PortMappingError("gone"),
        )
        assert svc.endpoints()[0].external is None
        assert not any("198.51.100.7" in c for c in svc.contacts())
        svc._on_port_mapped(
            GrantedMapping("pcp", "tcp", ("10.1.0.2", port), ("198.51.100.7", 4444), 7200.0)
        )
        # a loopback connection to the mapped port did not come through the mapping
        async with Service(crust.Config.for_testing()) as other:
            await other.connect(svc.contacts()[-1])
            assert svc.connection(other.peer_id).path == "direct"
