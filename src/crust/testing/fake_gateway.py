"""A fake gateway on 127.0.0.1 for port-mapping tests: PCP / NAT-PMP on one UDP port,
SSDP on another UDP port, and an IGD (description + SOAP control) over HTTP.

It decodes requests with its own struct/regex code (not crust's codecs, which only build
requests and parse answers), keeps a mapping table, and records every request so tests can
wait for the ones they expect.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EXTERNAL = "198.51.100.7"
PROTO_NUMBERS = {6: "tcp", 17: "udp"}


@dataclass
class Request:
    kind: str
    """``"pcp-map"``, ``"pcp-announce"``, ``"natpmp-map"``, ``"natpmp-address"``,
    ``"ssdp"`` or the SOAP action name."""
    fields: dict[str, Any] = field(default_factory=dict)


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._changed = asyncio.Event()

    def add(self, req: Request) -> None:
        self.requests.append(req)
        self._changed.set()

    def of(self, kind: str, **match: Any) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.kind == kind and all(r.fields.get(k) == v for k, v in match.items())
        ]

    async def wait(self, kind: str, count: int = 1, timeout: float = 10.0, **match: Any) -> None:
        """Until ``count`` requests of ``kind`` (with these fields) have been seen."""
        async with asyncio.timeout(timeout):
            while len(self.of(kind, **match)) < count:
                self._changed.clear()
                await self._changed.wait()


class PortControl(asyncio.DatagramProtocol):
    """PCP and NAT-PMP on one UDP socket.

    ``mode``: ``"pcp"`` answers both; ``"natpmp"`` answers NAT-PMP and tells PCP clients
    "unsupported version" the way a NAT-PMP-only server does; ``"silent"`` answers nothing.
    """

    def __init__(self, recorder: Recorder, mode: str = "pcp") -> None:
        self.recorder = recorder
        self.mode = mode
        self.transport: asyncio.DatagramTransport | None = None
        self.epoch_base = 0.0
        self.table: dict[tuple[str, int], tuple[int, int]] = {}
        """(protocol, internal port) -> (external port, lifetime)."""
        self.lifetimes: dict[str, int] = {"tcp": 3600, "udp": 3600}
        self.garbage_first = False
        """Send a malformed datagram before every real answer."""
        self.port_offset = 0
        """External port = internal + offset."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.epoch_base = asyncio.get_running_loop().time() - 1000  # up for a while

    def epoch(self) -> int:
        return int(asyncio.get_running_loop().time() - self.epoch_base)

    def reboot(self) -> None:
        """Forget every mapping and restart the epoch."""
        self.table.clear()
        self.epoch_base = asyncio.get_running_loop().time()

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        if self.garbage_first:
            self.transport.sendto(b"\x02\x81garbage", addr)
        self.transport.sendto(data, addr)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.mode == "silent" or len(data) < 2:
            return
        if data[0] == 2:
            self._pcp(data, addr)
        elif data[0] == 0:
            self._natpmp(data, addr)

    def _grant(self, protocol: str, internal: int, lifetime: int) -> tuple[int, int]:
        if lifetime == 0:
            self.table.pop((protocol, internal), None)
            return 0, 0
        granted = min(lifetime, self.lifetimes[protocol])
        external = self.table.get((protocol, internal), (internal + self.port_offset, 0))[0]
        self.table[(protocol, internal)] = (external, granted)
        return external, granted

    def _pcp(self, data: bytes, addr: Any) -> None:
        if self.mode != "pcp":
            # a NAT-PMP-only server: version 0, "unsupported version"
            self.send(struct.pack("!BBHI", 0, 0x80 | data[1], 1, self.epoch()), addr)
            return
        _version, opcode, _r, lifetime = struct.unpack_from("!BBHI", data)
        client = data[8:24]
        if opcode == 0:
            self.recorder.add(Request("pcp-announce", {"client": client}))
            head = struct.pack("!BBBBII", 2, 0x80, 0, 0, 0, self.epoch()) + bytes(12)
            self.send(head, addr)
            return
        nonce = data[24:36]
        proto_number, internal, suggested = struct.unpack_from("!B3xHH", data, 36)
        protocol = PROTO_NUMBERS[proto_number]
        self.recorder.add(
            Request(
                "pcp-map",
                {
                    "nonce": nonce,
                    "protocol": protocol,
                    "internal": internal,
                    "suggested": suggested,
                    "lifetime": lifetime,
                    "client": client,
                    "source": addr[0],
                },
            )
        )
        external, granted = self._grant(protocol, internal, lifetime)
        head = struct.pack("!BBBBII", 2, 0x81, 0, 0, granted, self.epoch()) + bytes(12)
        ext_addr = bytes(10) + b"\xff\xff" + bytes(int(x) for x in EXTERNAL.split("."))
        body = nonce + struct.pack("!B3xHH", proto_number, internal, external) + ext_addr
        self.send(head + body, addr)

    def _natpmp(self, data: bytes, addr: Any) -> None:
        op = data[1]
        if op == 0:
            self.recorder.add(Request("natpmp-address"))
            ext = bytes(int(x) for x in EXTERNAL.split("."))
            self.send(struct.pack("!BBHI", 0, 128, 0, self.epoch()) + ext, addr)
            return
        _v, _op, _r, internal, suggested, lifetime = struct.unpack("!BBHHHI", data[:12])
        protocol = "udp" if op == 1 else "tcp"
        self.recorder.add(
            Request(
                "natpmp-map",
                {
                    "protocol": protocol,
                    "internal": internal,
                    "suggested": suggested,
                    "lifetime": lifetime,
                },
            )
        )
        external, granted = self._grant(protocol, internal, lifetime)
        answer = struct.pack("!BBHIHHI", 0, 128 + op, 0, self.epoch(), internal, external, granted)
        self.send(answer, addr)


DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
<deviceList><device><deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
<serviceList><service>
<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<controlURL>/control/wanip</controlURL>
</service></serviceList></device></deviceList></device></deviceList></device></root>
"""


class Igd:
    """SSDP responder + HTTP server for the description and the SOAP control URL."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.table: dict[tuple[str, int], dict[str, str]] = {}
        """(protocol, external port) -> the AddPortMapping arguments."""
        self.conflicts: set[int] = set()
        """External ports AddPortMapping refuses with 718 ConflictInMappingEntry."""
        self.only_permanent = False
        self.location_host = "127.0.0.1"
        self.http_port = 0
        self.ssdp_port = 0
        self._server: asyncio.Server | None = None
        self._ssdp: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.http_port = self._server.sockets[0].getsockname()[1]
        igd = self

        class Ssdp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not data.startswith(b"M-SEARCH"):
                    return
                st = re.search(rb"\r\nST: *([^\r]*)", data)
                igd.recorder.add(Request("ssdp", {"st": st.group(1).decode() if st else ""}))
                answer = (
                    "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
                    f"ST: {st.group(1).decode() if st else ''}\r\nUSN: uuid:fake\r\n"
                    f"LOCATION: http://{igd.location_host}:{igd.http_port}/desc.xml\r\n\r\n"
                )
                self.transport.sendto(answer.encode(), addr)  # type: ignore[attr-defined]

        transport, _ = await loop.create_datagram_endpoint(Ssdp, local_addr=("127.0.0.1", 0))
        self._ssdp = transport
        self.ssdp_port = transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._ssdp is not None:
            self._ssdp.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            status, text = self._handle(head, body)
            payload = text.encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        finally:
            writer.close()

    def _handle(self, head: bytes, body: bytes) -> tuple[int, str]:
        if head.startswith(b"GET /desc.xml"):
            return 200, DESCRIPTION
        action_match = re.search(rb'(?i)soapaction: *"[^#]*#(\w+)"', head)
        if not action_match:
            return 404, ""
        action = action_match.group(1).decode()
        args = {k.decode(): v.decode() for k, v in re.findall(rb"<(New\w+)>([^<]*)</", body)}
        self.recorder.add(Request(action, dict(args)))
        if action == "GetExternalIPAddress":
            return self._ok(action, {"NewExternalIPAddress": EXTERNAL})
        if action == "AddPortMapping":
            port = int(args["NewExternalPort"])
            if port in self.conflicts:
                return self._fault(718, "ConflictInMappingEntry")
            if self.only_permanent and args["NewLeaseDuration"] != "0":
                return self._fault(725, "OnlyPermanentLeasesSupported")
            self.table[(args["NewProtocol"].lower(), port)] = args
            return self._ok(action, {})
        if action == "DeletePortMapping":
            key = (args["NewProtocol"].lower(), int(args["NewExternalPort"]))
            if self.table.pop(key, None) is None:
                return self._fault(714, "NoSuchEntryInArray")
            return self._ok(action, {})
        if action == "GetGenericPortMappingEntry":
            index = int(args["NewPortMappingIndex"])
            entries = list(self.table.values())
            if index >= len(entries):
                return self._fault(713, "SpecifiedArrayIndexInvalid")
            e = entries[index]
            out = {k: e[k] for k in e if k != "NewLeaseDuration"}
            out["NewLeaseDuration"] = e["NewLeaseDuration"]
            return self._ok(action, out)
        return self._fault(401, "Invalid Action")

    @staticmethod
    def _ok(action: str, values: dict[str, str]) -> tuple[int, str]:
        inner = "".join(f"<{k}>{v}</{k}>" for k, v in values.items())
        return 200, (
            '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            f'<s:Body><u:{action}Response xmlns:u="urn:schemas-upnp-org:service:WANIPConnection:1">'
            f"{inner}</u:{action}Response></s:Body></s:Envelope>"
        )

    @staticmethod
    def _fault(code: int, text: str) -> tuple[int, str]:
        return 500, (
            '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
            "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
            '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
            f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
            "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
        )


class FakeGateway:
    """Everything together; ``kwargs()`` are the PortMapper options that point at it."""

    def __init__(self, mode: str = "pcp") -> None:
        self.recorder = Recorder()
        self.control = PortControl(self.recorder, mode)
        self.igd = Igd(self.recorder)
        self.udp_port = 0
        self._udp: asyncio.DatagramTransport | None = None

    async def __aenter__(self) -> FakeGateway:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.control, local_addr=("127.0.0.1", 0)
        )
        self._udp = transport
        self.udp_port = transport.get_extra_info("sockname")[1]
        await self.igd.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._udp is not None:
            self._udp.close()
        self.igd.close()

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gateway": "127.0.0.1",
            "server_port": self.udp_port,
            "ssdp_targets": [("127.0.0.1", self.igd.ssdp_port)],
            "request_delays": [0.2, 0.4],
            "upnp_timeout": 2.0,
        }
        out.update(overrides)
        return out


def closed_udp_port() -> int:
    """A loopback UDP port nobody listens on (ICMP port unreachable answers there)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


Callback = Callable[..., None]
