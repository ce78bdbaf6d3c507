"""Port mapping on the local gateway: PCP, NAT-PMP and UPnP IGD clients and the
:class:`PortMapper` that keeps a set of mappings alive.

The wire formats live in :mod:`crust.proto.pcp`, :mod:`crust.proto.natpmp` and
:mod:`crust.proto.igd`; this module only moves their bytes over UDP/TCP, waits and retries.

    async with PortMapper([MappingRequest("tcp", 4000), MappingRequest("udp", 4000)],
                          on_granted=print) as mapper:
        ...            # mappings are requested, renewed at half their lifetime
    # leaving the block deletes them

Security: only answers from the gateway are accepted (connected UDP sockets), an SSDP answer
is used only when its description URL points at the address that answered, and the control
URL must be on that same host, so a forged answer cannot make us fetch from a third party.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from crust.errors import ConfigError, PortMappingError, ProtocolError
from crust.proto import igd, natpmp, pcp

log = logging.getLogger("crust.portmap")

METHODS = ("pcp", "natpmp", "upnp")
DEFAULT_LIFETIME = 7200
"""Seconds asked for (RFC 6886 recommends two hours); renewed at half the granted time."""
PERMANENT_REFRESH = 1800.0
"""A permanent UPnP mapping (lease 0) is re-added this often, in case the router rebooted."""
MAX_QUEUED_DATAGRAMS = 64
MAX_DESCRIPTIONS = 4
"""Device descriptions fetched per discovery at most (one per distinct SSDP LOCATION)."""

T = TypeVar("T")


class NoAnswer(PortMappingError, TimeoutError):
    """The gateway did not answer (no server for that protocol, or packets lost)."""


class MappingRefused(PortMappingError):
    """The gateway answered with an error; ``code`` is the protocol's result/error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Unsupported(PortMappingError):
    """The gateway does not speak this protocol (or this version of it)."""


class BehindAnotherNat(PortMappingError):
    """The gateway's external address is private or shared (RFC 6598): a mapping on it would
    not be reachable from the internet."""


# =============================================================================== gateway


def parse_proc_net_route(text: str) -> str | None:
    """The IPv4 default gateway in the text of Linux's ``/proc/net/route``, else None.

    Columns: ``Iface Destination Gateway Flags ...`` with addresses as little-endian hex.
    The default route with the lowest metric wins.
    """
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 7:
            continue
        try:
            dest = int(cols[1], 16)
            gateway = int(cols[2], 16)
            flags = int(cols[3], 16)
            metric = int(cols[6])
        except ValueError:
            continue
        if dest != 0 or not flags & 0x1 or not flags & 0x2 or not 0 < gateway <= 0xFFFFFFFF:
            continue  # not a default route, not up (RTF_UP), or no gateway (RTF_GATEWAY)
        address = str(ipaddress.IPv4Address(gateway.to_bytes(4, "little")))
        if best is None or metric < best[0]:
            best = (metric, address)
    return best[1] if best else None


def default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this host (Linux), or None when unknown."""
    try:
        with open(route_file, encoding="ascii", errors="replace") as f:
            return parse_proc_net_route(f.read(1 << 20))
    except OSError:
        return None


def local_address_towards(remote: str, port: int = natpmp.SERVER_PORT) -> str:
    """The local IPv4 address the kernel would use to reach ``remote`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((remote, port))
            return str(s.getsockname()[0])
    except OSError as exc:
        raise PortMappingError(f"no route to the gateway {remote}: {exc}") from exc


def is_private_external(address: str) -> bool:
    """True for external addresses that mean another NAT is upstream: private, shared
    (100.64.0.0/10), loopback, link-local or unspecified. Other reserved ranges (such as the
    198.18.0.0/15 benchmarking range of the test lab) count as public."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    if isinstance(ip, ipaddress.IPv4Address):
        return any(
            ip in ipaddress.IPv4Network(net)
            for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
        )
    return ip in ipaddress.IPv6Network("fc00::/7")


# =============================================================================== UDP


class _UdpChannel(asyncio.DatagramProtocol):
    """A connected UDP socket whose datagrams (or ICMP errors) land in a bounded queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Exception | None]] = asyncio.Queue(
            MAX_QUEUED_DATAGRAMS
        )
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.queue.full():
            self.queue.put_nowait((data, None))

    def error_received(self, exc: Exception) -> None:
        if not self.queue.full():
            self.queue.put_nowait((b"", exc))


class _UdpClient:
    """Request/response over one connected UDP socket, one exchange at a time."""

    name = "udp"

    def __init__(
        self, gateway: str, port: int, delays: Sequence[float], local_address: str | None = None
    ) -> None:
        self.gateway = gateway
        self.port = port
        self.delays = list(delays)
        self._local = local_address
        self._channel: _UdpChannel | None = None
        self._lock = asyncio.Lock()
        self.malformed = 0
        """Datagrams from the gateway that did not parse (counted, then ignored)."""

    async def open(self) -> None:
        if self._channel is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            _, channel = await loop.create_datagram_endpoint(
                _UdpChannel,
                remote_addr=(self.gateway, self.port),
                local_addr=(self._local, 0) if self._local else None,
            )
        except OSError as exc:
            raise PortMappingError(f"{self.name}: cannot reach {self.gateway}: {exc}") from exc
        self._channel = channel

    @property
    def local_address(self) -> str:
        assert self._channel is not None and self._channel.transport is not None
        return str(self._channel.transport.get_extra_info("sockname")[0])

    def close(self) -> None:
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        self._channel = None

    async def exchange(
        self, payload: bytes, accept: Callable[[bytes], T | None], delays: Sequence[float] = ()
    ) -> T:
        """Send ``payload`` (again after each delay) until ``accept`` returns non-None for a
        datagram. ``accept`` may raise ProtocolError for garbage (counted and skipped)."""
        await self.open()
        channel = self._channel
        assert channel is not None and channel.transport is not None
        loop = asyncio.get_running_loop()
        async with self._lock:
            while not channel.queue.empty():
                channel.queue.get_nowait()  # stale answers of an earlier exchange
            for delay in delays or self.delays:
                channel.transport.sendto(payload)
                deadline = loop.time() + delay
                while (remaining := deadline - loop.time()) > 0:
                    try:
                        async with asyncio.timeout(remaining):
                            data, err = await channel.queue.get()
                    except TimeoutError:
                        break
                    if err is not None:
                        if isinstance(err, ConnectionRefusedError):
                            raise NoAnswer(
                                f"{self.name}: {self.gateway}:{self.port} refused (no server)"
                            ) from err
                        continue
                    try:
                        result = accept(data)
                    except ProtocolError as exc:
                        self.malformed += 1
                        log.debug("%s: ignored a datagram from the gateway: %s", self.name, exc)
                        continue
                    if result is not None:
                        return result
        raise NoAnswer(f"{self.name}: no answer from {self.gateway}:{self.port}")


# =============================================================================== NAT-PMP


class _EpochClient(_UdpClient):
    """A NAT-PMP or PCP client: both protocols report the gateway's epoch (seconds since
    its mappings were last lost), which tells when to map everything again."""

    def __init__(
        self, gateway: str, *, port: int = 5351, delays: Sequence[float] | None = None
    ) -> None:
        super().__init__(gateway, port, delays or natpmp.retransmit_delays(0.25, 4))
        self.last_epoch: tuple[int, float] | None = None
        self.state_lost = False
        """Set when an epoch showed that the gateway lost its mappings (cleared by the user)."""

    def _epoch(self, epoch: int) -> None:
        now = asyncio.get_running_loop().time()
        if self.last_epoch is not None and natpmp.epoch_lost_state(
            self.last_epoch[0], self.last_epoch[1], epoch, now
        ):
            self.state_lost = True
        self.last_epoch = (epoch, now)


class NatPmpClient(_EpochClient):
    """NAT-PMP (RFC 6886) requests to ``gateway``:5351."""

    name = "natpmp"

    def __init__(
        self,
        gateway: str,
        *,
        port: int = natpmp.SERVER_PORT,
        delays: Sequence[float] | None = None,
    ) -> None:
        super().__init__(gateway, port=port, delays=delays)

    async def external_address(self) -> str:
        def accept(data: bytes) -> natpmp.ExternalAddressResponse | None:
            r = natpmp.parse_response(data)
            return r if isinstance(r, natpmp.ExternalAddressResponse) else None

        r = await self.exchange(natpmp.external_address_request(), accept)
        if r.result != natpmp.ResultCode.SUCCESS:
            cls = Unsupported if r.result == natpmp.ResultCode.UNSUPPORTED_VERSION else None
            raise (cls or MappingRefused)(
                f"natpmp: external address refused: {natpmp.result_name(r.result)}"
            )
        self._epoch(r.epoch)
        return r.address

    async def map(
        self,
        protocol: str,
        internal_port: int,
        external_port: int,
        lifetime: int,
        delays: Sequence[float] = (),
    ) -> natpmp.MapResponse:
        """Create, renew (``lifetime`` > 0) or delete (0) a mapping."""
        request = natpmp.map_request(protocol, internal_port, external_port, lifetime)

        def accept(data: bytes) -> natpmp.MapResponse | None:
            r = natpmp.parse_response(data)
            if not isinstance(r, natpmp.MapResponse) or r.protocol != protocol:
                return None
            if r.result == natpmp.ResultCode.SUCCESS and r.internal_port != internal_port:
                return None
            return r

        r = await self.exchange(request, accept, delays)
        if r.result != natpmp.ResultCode.SUCCESS:
            raise MappingRefused(
                f"natpmp: {protocol} {internal_port} refused: {natpmp.result_name(r.result)}",
                r.result,
            )
        self._epoch(r.epoch)
        return r


# =============================================================================== PCP


@dataclass(frozen=True, slots=True)
class PcpGrant:
    result: pcp.MapResult
    lifetime: int
    epoch: int


class PcpClient(_EpochClient):
    """PCP (RFC 6887) MAP requests to ``gateway``:5351."""

    name = "pcp"

    def __init__(
        self,
        gateway: str,
        *,
        port: int = pcp.SERVER_PORT,
        delays: Sequence[float] | None = None,
    ) -> None:
        super().__init__(gateway, port=port, delays=delays)

    @staticmethod
    def _check(r: pcp.Response, what: str) -> None:
        if r.version != pcp.VERSION:
            raise Unsupported(f"pcp: the gateway speaks version {r.version}, not 2")
        if r.result != pcp.ResultCode.SUCCESS:
            raise MappingRefused(f"pcp: {what} refused: {pcp.result_name(r.result)}", r.result)

    async def announce(self) -> int:
        """Ask whether a PCP server is there; returns its epoch."""
        await self.open()
        request = pcp.announce_request(self.local_address)

        def accept(data: bytes) -> pcp.Response | None:
            r = pcp.parse_response(data)
            return r if r.opcode == pcp.Opcode.ANNOUNCE else None

        r = await self.exchange(request, accept)
        self._check(r, "ANNOUNCE")
        self._epoch(r.epoch)
        return r.epoch

    async def map(
        self,
        nonce: bytes,
        protocol: str,
        internal_port: int,
        lifetime: int,
        external_port: int = 0,
        external_address: str | None = None,
        delays: Sequence[float] = (),
    ) -> PcpGrant:
        """Create, renew (same nonce) or delete (``lifetime`` 0) a mapping."""
        await self.open()
        request = pcp.map_request(
            nonce,
            protocol,
            internal_port,
            self.local_address,
            lifetime,
            external_port,
            external_address,
        )

        def accept(data: bytes) -> pcp.Response | None:
            r = pcp.parse_response(data)
            if r.version != pcp.VERSION:
                return r  # version negotiation: let _check report it
            if r.opcode != pcp.Opcode.MAP:
                return None
            m = r.map
            if m is None:
                return r if r.result != pcp.ResultCode.SUCCESS else None
            if m.nonce != nonce or m.protocol != protocol or m.internal_port != internal_port:
                return None  # not the answer to this request (RFC 6887 §11.3)
            return r

        r = await self.exchange(request, accept, delays)
        self._check(r, f"MAP {protocol} {internal_port}")
        self._epoch(r.epoch)
        assert r.map is not None
        return PcpGrant(r.map, r.lifetime, r.epoch)


# =============================================================================== UPnP IGD


async def _http_exchange(url: igd.HttpUrl, request: bytes, timeout: float) -> igd.HttpResponse:
    """One HTTP request over a fresh TCP connection; the answer is bounded in size."""
    parser = igd.HttpResponseParser()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(url.host, url.port)
            writer.write(request)
            await writer.drain()
            while not parser.done:
                chunk = await reader.read(65536)
                if not chunk:
                    parser.feed_eof()
                    break
                parser.feed(chunk)
    except TimeoutError as exc:
        raise NoAnswer(f"upnp: {url} did not answer within {timeout} s") from exc
    except OSError as exc:
        raise PortMappingError(f"upnp: {url}: {exc}") from exc
    except ProtocolError as exc:
        raise PortMappingError(f"upnp: {url}: {exc}") from exc
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return parser.response()


class _SsdpChannel(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(MAX_QUEUED_DATAGRAMS)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.queue.full():
            self.queue.put_nowait((data, str(addr[0])))


class IgdClient:
    """SOAP calls to a UPnP Internet Gateway Device's WAN connection service."""

    name = "upnp"

    def __init__(
        self,
        service: igd.IgdService,
        *,
        local_address: str,
        timeout: float = 5.0,
        location: str = "",
    ) -> None:
        self.service = service
        self.local_address = local_address
        self.timeout = timeout
        self.location = location

    @classmethod
    async def discover(
        cls,
        gateway: str | None,
        *,
        targets: Sequence[tuple[str, int]] | None = None,
        timeout: float = 3.0,
        mx: int = 2,
    ) -> IgdClient:
        """Find the gateway's IGD with SSDP ``M-SEARCH``es sent to ``targets`` (default: the
        gateway's port 1900 and the SSDP multicast group) and read its description."""
        if targets is None:
            targets = [(igd.SSDP_ADDRESS, igd.SSDP_PORT)]
            if gateway is not None:
                targets.insert(0, (gateway, igd.SSDP_PORT))
        if not targets:
            raise ConfigError("no SSDP target", "ssdp_targets")
        local = local_address_towards(gateway or targets[0][0], igd.SSDP_PORT)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local, 0))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(local))
            transport, channel = await loop.create_datagram_endpoint(_SsdpChannel, sock=sock)
        except OSError as exc:
            sock.close()
            raise PortMappingError(f"upnp: cannot open an SSDP socket: {exc}") from exc
        errors: list[str] = []
        tried: set[str] = set()

        def note(error: str) -> None:
            if len(errors) < 4:
                errors.append(error)

        try:
            for st in igd.SEARCH_TARGETS:
                for target in targets:
                    with contextlib.suppress(OSError):
                        transport.sendto(igd.msearch_request(st, mx), target)
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        data, source = await channel.queue.get()
                except TimeoutError:
                    break
                try:
                    answer = igd.parse_ssdp_response(data)
                    location = igd.parse_http_url(answer.location)
                except ProtocolError as exc:
                    log.debug("upnp: ignored an SSDP datagram from %s: %s", source, exc)
                    continue
                if location.host != source:
                    note(f"{source} announced a description on {location.host}")
                    continue
                if gateway is not None and source != gateway and (gateway, 1900) in targets:
                    # prefer the default gateway; another IGD on the LAN maps nothing for us
                    note(f"{source} is not the gateway {gateway}")
                    continue
                if str(location) in tried or len(tried) >= MAX_DESCRIPTIONS:
                    continue
                tried.add(str(location))
                try:
                    return await cls._from_location(location, local, timeout)
                except PortMappingError as exc:
                    note(str(exc))
        finally:
            transport.close()
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise NoAnswer(f"upnp: no Internet Gateway Device answered{detail}")

    @classmethod
    async def _from_location(cls, location: igd.HttpUrl, local: str, timeout: float) -> IgdClient:
        response = await _http_exchange(location, igd.http_request("GET", location), timeout)
        if response.status != 200:
            raise PortMappingError(f"upnp: {location} answered HTTP {response.status}")
        try:
            services = igd.parse_device_description(response.body, str(location))
        except ProtocolError as exc:
            raise PortMappingError(f"upnp: {location}: {exc}") from exc
        for service in services:
            if service.control_url.host == location.host:
                return cls(service, local_address=local, timeout=timeout, location=str(location))
        raise PortMappingError(f"upnp: {location}: control URL on another host")

    async def call(self, request: bytes, action: str) -> igd.SoapResult:
        response = await _http_exchange(self.service.control_url, request, self.timeout)
        try:
            outcome = igd.parse_soap_response(response.status, response.body, action)
        except ProtocolError as exc:
            raise PortMappingError(f"upnp: {action}: {exc}") from exc
        if isinstance(outcome, igd.SoapFault):
            raise MappingRefused(
                f"upnp: {action} failed: {outcome.code} {outcome.description}", outcome.code
            )
        return outcome

    async def external_ip(self) -> str:
        svc = self.service
        result = await self.call(
            igd.get_external_ip_address(svc.control_url, svc.service_type), "GetExternalIPAddress"
        )
        try:
            return igd.external_ip_from(result)
        except ProtocolError as exc:
            raise PortMappingError(str(exc)) from exc

    async def add_port_mapping(
        self,
        protocol: str,
        external_port: int,
        internal_port: int,
        lease_duration: int,
        description: str = "crust",
    ) -> None:
        svc = self.service
        request = igd.add_port_mapping(
            svc.control_url,
            svc.service_type,
            external_port=external_port,
            protocol=protocol,
            internal_port=internal_port,
            internal_client=self.local_address,
            description=description,
            lease_duration=lease_duration,
        )
        await self.call(request, "AddPortMapping")

    async def delete_port_mapping(self, protocol: str, external_port: int) -> None:
        svc = self.service
        request = igd.delete_port_mapping(
            svc.control_url, svc.service_type, external_port=external_port, protocol=protocol
        )
        await self.call(request, "DeletePortMapping")

    async def port_mapping_entry(self, index: int) -> igd.PortMappingEntry | None:
        """Entry ``index`` of the gateway's table, None past its end."""
        svc = self.service
        request = igd.get_generic_port_mapping_entry(svc.control_url, svc.service_type, index)
        try:
            result = await self.call(request, "GetGenericPortMappingEntry")
        except MappingRefused as exc:
            if exc.code in (igd.ERR_INDEX_INVALID, igd.ERR_NO_SUCH_ENTRY, igd.ERR_INVALID_ARGS):
                return None
            raise
        try:
            return igd.port_mapping_entry_from(result)
        except ProtocolError as exc:
            raise PortMappingError(str(exc)) from exc

    async def port_mappings(self, limit: int = 256) -> list[igd.PortMappingEntry]:
        """The gateway's whole table (at most ``limit`` entries)."""
        out: list[igd.PortMappingEntry] = []
        for index in range(limit):
            entry = await self.port_mapping_entry(index)
            if entry is None:
                break
            out.append(entry)
        return out


# =============================================================================== PortMapper


@dataclass(frozen=True, slots=True)
class MappingRequest:
    """A port to map: ``protocol`` ``"tcp"``/``"udp"``, the local ``internal_port``, and
    the external port to suggest (0: the same as the internal one)."""

    protocol: str
    internal_port: int
    external_port: int = 0


@dataclass(frozen=True, slots=True)
class GrantedMapping:
    method: str
    """``"pcp"``, ``"natpmp"`` or ``"upnp"``."""
    protocol: str
    """``"tcp"`` or ``"udp"``."""
    internal: tuple[str, int]
    external: tuple[str, int]
    lifetime: float
    """Seconds granted; 0 for a permanent UPnP mapping."""


@dataclass(slots=True)
class _Held:
    request: MappingRequest
    granted: GrantedMapping
    renew_at: float
    nonce: bytes = b""


Client = PcpClient | NatPmpClient | IgdClient


class PortMapper:
    """Keeps mappings of local ports on the gateway: tries PCP, then NAT-PMP, then UPnP IGD;
    renews at half the granted lifetime; deletes them on close.

    An ``async with`` resource: entering starts one background task (in the mapper's own
    TaskGroup) and returns at once; ``on_granted`` is called for every new or changed
    mapping, ``on_lost`` when a mapping could not be renewed (it is requested again later),
    ``on_error`` for every failed round. Leaving the block (or :meth:`aclose`) stops the task
    and deletes the mappings (bounded by ``close_timeout``).
    """

    def __init__(
        self,
        requests: Sequence[MappingRequest],
        *,
        gateway: str | None = None,
        methods: Sequence[str] = METHODS,
        lifetime: int = DEFAULT_LIFETIME,
        on_granted: Callable[[GrantedMapping], None] | None = None,
        on_error: Callable[[PortMappingError], None] | None = None,
        on_lost: Callable[[GrantedMapping, PortMappingError], None] | None = None,
        description: str = "crust",
        server_port: int = natpmp.SERVER_PORT,
        ssdp_targets: Sequence[tuple[str, int]] | None = None,
        request_delays: Sequence[float] | None = None,
        upnp_timeout: float = 3.0,
        retry_interval: float = 60.0,
        max_retry_interval: float = 1800.0,
        min_renew_interval: float = 1.0,
        close_timeout: float = 3.0,
        route_file: str = "/proc/net/route",
        nonce: Callable[[int], bytes] = secrets.token_bytes,
        rng: random.Random | None = None,
    ) -> None:
        if not requests:
            raise ConfigError("nothing to map", "requests")
        for r in requests:
            if not isinstance(r, MappingRequest) or r.protocol not in ("tcp", "udp"):
                raise ConfigError(f"not a tcp or udp MappingRequest: {r!r}", "requests")
            ports = (r.internal_port, r.external_port)
            if not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
                raise ConfigError(f"ports must be integers in {r}", "requests")
            if not 1 <= r.internal_port <= 65535 or not 0 <= r.external_port <= 65535:
                raise ConfigError(f"port out of range in {r}", "requests")
        if (
            not isinstance(description, str)
            or len(description) > igd.MAX_DESCRIPTION
            or not description.isprintable()
        ):
            raise ConfigError(
                f"must be printable text of at most {igd.MAX_DESCRIPTION} characters",
                "description",
            )
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"methods must be among {', '.join(METHODS)}", "methods")
        if not 1 <= lifetime <= 0xFFFFFFFF:
            raise ConfigError("must be 1 second or more", "lifetime")
        if gateway is not None:
            try:
                ipaddress.IPv4Address(gateway)
            except ValueError as exc:
                raise ConfigError(f"not an IPv4 address: {gateway!r}", "gateway") from exc
        for name, value in (
            ("retry_interval", retry_interval),
            ("max_retry_interval", max_retry_interval),
            ("min_renew_interval", min_renew_interval),
            ("close_timeout", close_timeout),
            ("upnp_timeout", upnp_timeout),
        ):
            if not value > 0:
                raise ConfigError("must be positive", name)
        self.requests = list(dict.fromkeys(requests))
        self.gateway = gateway
        self.methods = tuple(methods)
        self.lifetime = lifetime
        self.on_granted = on_granted
        self.on_error = on_error
        self.on_lost = on_lost
        self.description = description
        self.server_port = server_port
        self.ssdp_targets = ssdp_targets
        self.request_delays = list(request_delays) if request_delays else None
        self.upnp_timeout = upnp_timeout
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.min_renew_interval = min_renew_interval
        self.close_timeout = close_timeout
        self.route_file = route_file
        self._nonce = nonce
        self._rng = rng or random.SystemRandom()
        self._held: dict[MappingRequest, _Held] = {}
        self._client: Client | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self.last_error: PortMappingError | None = None
        self.rounds = 0
        """Completed attempts to establish or renew mappings (for tests and diagnostics)."""
        self.round_done = asyncio.Event()
        """Set after every round; clear it to wait for the next one."""

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> PortMapper:
        if self._tg is not None or self._closed:
            raise PortMappingError("a PortMapper starts once")
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop renewing and delete every mapping (each method's delete, bounded in time)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        if self._tg is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._tg.__aexit__(None, None, None)
        try:
            async with asyncio.timeout(self.close_timeout):
                await self._delete_all()
        except TimeoutError:
            log.info("port mapping: deleting mappings timed out; they expire by themselves")
        finally:
            self._close_client()
            self._held.clear()

    def mappings(self) -> list[GrantedMapping]:
        """The mappings currently held."""
        return [h.granted for h in self._held.values()]

    @property
    def method(self) -> str | None:
        """The protocol in use, once one answered."""
        return self._client.name if self._client is not None else None

    def renew_now(self) -> None:
        """Renew every mapping at once (e.g. after a network change)."""
        for held in self._held.values():
            held.renew_at = 0.0
        self._wake.set()

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        backoff = self.retry_interval
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._round()
                backoff = self.retry_interval
                self.last_error = None
            except PortMappingError as exc:
                self.last_error = exc
                log.info("port mapping: %s", exc)
                if self.on_error is not None:
                    self.on_error(exc)
            except Exception:  # a bug must not kill the owner's task group
                log.exception("port mapping round failed")
            self.rounds += 1
            self.round_done.set()
            now = loop.time()
            wake = [h.renew_at for h in self._held.values()]
            if len(self._held) < len(self.requests):
                wake.append(now + backoff)
                if self.last_error is not None:
                    backoff = min(backoff * 2, self.max_retry_interval)
            delay = max(0.0, min(wake) - now) if wake else backoff
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._client
        if isinstance(client, PcpClient | NatPmpClient) and client.state_lost:
            log.info("port mapping: the gateway lost its state (epoch); mapping again")
            client.state_lost = False
            for held in self._held.values():
                held.renew_at = 0.0
        errors: list[PortMappingError] = []
        for held in list(self._held.values()):
            if held.renew_at <= loop.time():
                try:
                    await self._renew(held)
                except PortMappingError as exc:
                    log.info("port mapping: renewing %s failed: %s", held.request, exc)
                    del self._held[held.request]
                    errors.append(exc)
                    if self.on_lost is not None:
                        self.on_lost(held.granted, exc)
        missing = [r for r in self.requests if r not in self._held]
        if missing:
            await self._establish(missing)
        if errors:
            raise errors[0]

    def _gateway(self) -> str:
        gateway = self.gateway or default_gateway(self.route_file)
        if gateway is None:
            raise PortMappingError("no default gateway (and none configured)")
        return gateway

    def _close_client(self) -> None:
        client = self._client
        if isinstance(client, _UdpClient):
            client.close()
        self._client = None

    async def _establish(self, missing: list[MappingRequest]) -> None:
        """Map ``missing`` with the protocol in use, or find one that answers."""
        failures: list[str] = []
        if self._client is not None:
            try:
                if await self._map_all(self._client, missing):
                    return
            except (NoAnswer, Unsupported) as exc:
                failures.append(str(exc))
                if self._held:
                    raise
            self._close_client()
        gateway = self._gateway()
        for method in self.methods:
            try:
                client = await self._open(method, gateway)
            except BehindAnotherNat:
                raise
            except PortMappingError as exc:
                failures.append(str(exc))
                continue
            try:
                if await self._map_all(client, missing):
                    self._client = client
                    return
                failures.append(f"{method}: no mapping granted")
            except BehindAnotherNat:
                if isinstance(client, _UdpClient):
                    client.close()
                raise
            except PortMappingError as exc:
                failures.append(str(exc))
            if isinstance(client, _UdpClient):
                client.close()
        raise PortMappingError("no port mapping: " + "; ".join(failures))

    async def _open(self, method: str, gateway: str) -> Client:
        delays = self.request_delays
        if method == "pcp":
            pcp_client = PcpClient(gateway, port=self.server_port, delays=delays)
            await pcp_client.open()
            return pcp_client
        if method == "natpmp":
            nat_client = NatPmpClient(gateway, port=self.server_port, delays=delays)
            try:
                external = await nat_client.external_address()
            except BaseException:
                nat_client.close()
                raise
            if is_private_external(external):
                nat_client.close()
                raise BehindAnotherNat(f"natpmp: the gateway's external address is {external}")
            return nat_client
        client = await IgdClient.discover(
            gateway, targets=self.ssdp_targets, timeout=self.upnp_timeout
        )
        external = await client.external_ip()
        if is_private_external(external):
            raise BehindAnotherNat(f"upnp: the gateway's external address is {external}")
        return client

    async def _map_all(self, client: Client, missing: list[MappingRequest]) -> bool:
        """Map each request; True if at least one is granted. NoAnswer or Unsupported before
        any grant propagates (this protocol is not there); other errors are reported."""
        granted = 0
        errors: list[PortMappingError] = []
        for request in missing:
            try:
                held = await self._map(client, request)
            except (NoAnswer, Unsupported, BehindAnotherNat) as exc:
                if granted == 0:
                    raise  # this protocol is not there (or useless): try the next one
                errors.append(exc)
                continue
            except PortMappingError as exc:
                errors.append(exc)
                log.info("port mapping: %s", exc)
                continue
            granted += 1
            self._granted(held)
        if errors and not granted:
            raise errors[0]
        if errors and self.on_error is not None:
            for err in errors:
                self.on_error(err)
        return granted > 0

    def _granted(self, held: _Held) -> None:
        old = self._held.get(held.request)
        self._held[held.request] = held
        changed = old is None or old.granted.external != held.granted.external
        if changed:
            log.info(
                "port mapping: %s %s:%d -> %s:%d via %s (%ds)",
                held.granted.protocol,
                *held.granted.internal,
                *held.granted.external,
                held.granted.method,
                held.granted.lifetime,
            )
            if self.on_granted is not None:
                self.on_granted(held.granted)

    def _renew_at(self, lifetime: float) -> float:
        now = asyncio.get_running_loop().time()
        if lifetime <= 0:
            return now + PERMANENT_REFRESH
        return now + max(self.min_renew_interval, lifetime / 2)

    async def _map(
        self, client: Client, request: MappingRequest, previous: _Held | None = None
    ) -> _Held:
        suggested = request.external_port or request.internal_port
        if isinstance(client, PcpClient):
            nonce = previous.nonce if previous else self._nonce(pcp.NONCE_SIZE)
            ext_port = previous.granted.external[1] if previous else suggested
            ext_addr = previous.granted.external[0] if previous else None
            grant = await client.map(
                nonce, request.protocol, request.internal_port, self.lifetime, ext_port, ext_addr
            )
            external = (grant.result.external_address, grant.result.external_port)
            if is_private_external(external[0]):
                with contextlib.suppress(PortMappingError):
                    await client.map(nonce, request.protocol, request.internal_port, 0)
                raise BehindAnotherNat(f"pcp: the gateway's external address is {external[0]}")
            mapping = GrantedMapping(
                "pcp",
                request.protocol,
                (client.local_address, request.internal_port),
                external,
                float(grant.lifetime),
            )
            return _Held(request, mapping, self._renew_at(grant.lifetime), nonce)
        if isinstance(client, NatPmpClient):
            ext_port = previous.granted.external[1] if previous else suggested
            r = await client.map(request.protocol, request.internal_port, ext_port, self.lifetime)
            address = await client.external_address()  # it may have changed since
            if is_private_external(address):
                raise BehindAnotherNat(f"natpmp: the gateway's external address is {address}")
            mapping = GrantedMapping(
                "natpmp",
                request.protocol,
                (client.local_address, request.internal_port),
                (address, r.external_port),
                float(r.lifetime),
            )
            return _Held(request, mapping, self._renew_at(r.lifetime), b"")
        return await self._map_upnp(client, request, previous, suggested)

    async def _map_upnp(
        self, client: IgdClient, request: MappingRequest, previous: _Held | None, suggested: int
    ) -> _Held:
        lease = int(previous.granted.lifetime) if previous else self.lifetime
        port = previous.granted.external[1] if previous else suggested
        for attempt in range(6):
            try:
                await client.add_port_mapping(
                    request.protocol, port, request.internal_port, lease, self.description
                )
                break
            except MappingRefused as exc:
                if exc.code == igd.ERR_ONLY_PERMANENT_LEASES and lease != 0:
                    lease = 0
                elif (
                    exc.code
                    in (
                        igd.ERR_CONFLICT,
                        igd.ERR_CONFLICT_WITH_OTHER_MECHANISMS,
                    )
                    and attempt < 5
                    and previous is None
                ):
                    port = self._rng.randint(1024, 65535)
                elif exc.code == igd.ERR_SAME_PORT_VALUES_REQUIRED and port != (
                    request.internal_port
                ):
                    port = request.internal_port
                else:
                    raise
        else:
            raise PortMappingError("upnp: no free external port")
        address = await client.external_ip()
        if is_private_external(address):
            with contextlib.suppress(PortMappingError):
                await client.delete_port_mapping(request.protocol, port)
            raise BehindAnotherNat(f"upnp: the gateway's external address is {address}")
        mapping = GrantedMapping(
            "upnp",
            request.protocol,
            (client.local_address, request.internal_port),
            (address, port),
            float(lease),
        )
        return _Held(request, mapping, self._renew_at(lease))

    async def _renew(self, held: _Held) -> None:
        client = self._client
        if client is None:
            raise PortMappingError("no port mapping client")
        self._granted(await self._map(client, held.request, held))

    # ------------------------------------------------------------------ deletion

    async def _delete_all(self) -> None:
        client = self._client
        if client is None:
            return
        quick = [0.25, 0.5, 1.0]
        for held in list(self._held.values()):
            g = held.granted
            try:
                if isinstance(client, PcpClient):
                    await client.map(
                        held.nonce,
                        g.protocol,
                        g.internal[1],
                        0,
                        g.external[1],
                        g.external[0],
                        quick,
                    )
                elif isinstance(client, NatPmpClient):
                    await client.map(g.protocol, g.internal[1], 0, 0, quick)
                else:
                    await client.delete_port_mapping(g.protocol, g.external[1])
                log.info("port mapping: deleted %s %s:%d", g.protocol, *g.external)
            except PortMappingError as exc:
                log.info("port mapping: deleting %s %s failed: %s", g.protocol, g.external, exc)
            del self._held[held.request]
