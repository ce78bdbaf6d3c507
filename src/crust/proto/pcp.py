"""Port Control Protocol (RFC 6887) MAP and ANNOUNCE messages, sans-IO.

Addresses travel as 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6 (``::ffff:a.b.c.d``).
The 12-byte mapping nonce is passed in by the caller (this module draws no randomness).
:func:`parse_response` accepts any bytes and returns a :class:`Response` or raises
:class:`~crust.errors.ProtocolError`.

Wire format (big-endian)::

    request   version 2 | R=0,opcode | reserved u16 | requested lifetime u32
              | client address (16) | opcode payload | options
    response  version 2 | R=1,opcode | reserved u8 | result u8 | lifetime u32 | epoch u32
              | reserved (12) | opcode payload | options
    MAP       nonce (12) | protocol u8 | reserved (3) | internal port u16
              | (suggested | assigned) external port u16 | (suggested | assigned) address (16)
    option    code u8 | reserved u8 | length u16 | data, padded to a multiple of 4
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from crust.errors import InvalidArgument, ProtocolError
from crust.proto.natpmp import SERVER_PORT, check_protocol, code_name

__all__ = [
    "MAX_MESSAGE",
    "SERVER_PORT",
    "VERSION",
    "MapResult",
    "Opcode",
    "Option",
    "Response",
    "ResultCode",
    "address_from_bytes",
    "address_to_bytes",
    "announce_request",
    "map_request",
    "parse_response",
    "result_name",
]

VERSION = 2
MAX_MESSAGE = 1100
HEADER_SIZE = 24
MAP_SIZE = 36
NONCE_SIZE = 12
MAX_OPTIONS = 32
MAX_LIFETIME = 0xFFFFFFFF
RESPONSE_BIT = 0x80

IPPROTO_TCP = 6
IPPROTO_UDP = 17
_PROTOCOL_NUMBERS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
_NUMBER_PROTOCOLS = {v: k for k, v in _PROTOCOL_NUMBERS.items()}


class Opcode(enum.IntEnum):
    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def result_name(code: int) -> str:
    """A readable name for a PCP result code."""
    return code_name(ResultCode, code)


@dataclass(frozen=True, slots=True)
class Option:
    code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MapResult:
    """The MAP payload of a response."""

    nonce: bytes
    protocol: str | int
    """``"tcp"``, ``"udp"``, ``"all"`` (protocol 0) or the raw protocol number."""
    internal_port: int
    external_port: int
    external_address: str
    """IPv4 in dotted form when IPv4-mapped, else IPv6."""


@dataclass(frozen=True, slots=True)
class Response:
    version: int
    """2 for a PCP response. 0 when a NAT-PMP-only server answered (``result`` is then
    ``UNSUPP_VERSION``); another value is the version a PCP server offers instead."""
    opcode: int
    result: int
    lifetime: int
    """Seconds the mapping lives (success) or how long the error is expected to last."""
    epoch: int
    map: MapResult | None
    options: tuple[Option, ...] = ()


def address_to_bytes(address: str) -> bytes:
    """16 bytes for an address: IPv6 as is, IPv4 as ``::ffff:a.b.c.d``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {address!r}") from exc
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def address_from_bytes(raw: bytes) -> str:
    """The text form of a 16-byte address (IPv4-mapped addresses become dotted IPv4)."""
    if len(raw) != 16:
        raise ProtocolError(f"PCP: an address is 16 bytes, not {len(raw)}")
    ip = ipaddress.IPv6Address(raw)
    mapped = ip.ipv4_mapped
    return str(mapped) if mapped is not None else str(ip)


def _header(opcode: int, lifetime: int, client_address: str) -> bytes:
    if isinstance(lifetime, bool) or not isinstance(lifetime, int):
        raise InvalidArgument(f"lifetime must be an integer, not {lifetime!r}")
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise InvalidArgument(f"lifetime out of range: {lifetime}")
    return struct.pack("!BBHI", VERSION, opcode, 0, lifetime) + address_to_bytes(client_address)


def announce_request(client_address: str) -> bytes:
    """An ANNOUNCE request: learns whether a PCP server is there and its epoch."""
    return _header(Opcode.ANNOUNCE, 0, client_address)


def map_request(
    nonce: bytes,
    protocol: str,
    internal_port: int,
    client_address: str,
    lifetime: int,
    suggested_external_port: int = 0,
    suggested_external_address: str | None = None,
) -> bytes:
    """A MAP request for ``protocol`` (``"tcp"``/``"udp"``) ``internal_port``.

    ``client_address`` must be the source address the request is sent from (the server
    checks it). ``lifetime`` 0 deletes the mapping; a renewal or deletion must reuse the
    nonce of the request that created it. Without a suggested external address the
    all-zeros address of the client's family is sent (RFC 6887 §11.1).
    """
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise InvalidArgument("the PCP nonce is 12 bytes")
    number = _PROTOCOL_NUMBERS[check_protocol(protocol)]
    for name, port, zero_ok in (
        ("internal_port", internal_port, False),
        ("suggested_external_port", suggested_external_port, True),
    ):
        if isinstance(port, bool) or not isinstance(port, int):
            raise InvalidArgument(f"{name} must be an integer, not {port!r}")
        if not (0 if zero_ok else 1) <= port <= 65535:
            raise InvalidArgument(f"{name} out of range: {port}")
    if suggested_external_address is None:
        v6 = ipaddress.ip_address(_checked(client_address)).version == 6
        suggested_external_address = "::" if v6 else "0.0.0.0"
    payload = (
        nonce
        + struct.pack("!B3xHH", number, internal_port, suggested_external_port)
        + address_to_bytes(suggested_external_address)
    )
    return _header(Opcode.MAP, lifetime, client_address) + payload


def _checked(address: str) -> str:
    try:
        ipaddress.ip_address(address)
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {address!r}") from exc
    return address


def _parse_options(data: bytes, pos: int) -> tuple[Option, ...]:
    options: list[Option] = []
    while pos < len(data):
        if len(options) >= MAX_OPTIONS:
            raise ProtocolError(f"PCP: more than {MAX_OPTIONS} options")
        if pos + 4 > len(data):
            raise ProtocolError("PCP: truncated option header")
        code, _reserved, length = struct.unpack_from("!BBH", data, pos)
        pos += 4
        end = pos + length
        if end > len(data):
            raise ProtocolError(f"PCP: option {code} of {length} bytes is truncated")
        options.append(Option(code, data[pos:end]))
        pos = end + (-length % 4)
    if pos > len(data):
        raise ProtocolError("PCP: option padding is truncated")
    return tuple(options)


def parse_response(data: bytes) -> Response:
    """Parse one datagram from the server's port 5351.

    A NAT-PMP answer (version 0, sent by a server without PCP) is returned as a response
    with ``version`` 0 and result ``UNSUPP_VERSION`` so that the caller can fall back.
    """
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"PCP: datagram of {len(data)} bytes is too large")
    if len(data) < 4:
        raise ProtocolError(f"PCP: datagram of {len(data)} bytes is too short")
    version, op = data[0], data[1]
    if not op & RESPONSE_BIT:
        raise ProtocolError("PCP: a request, not a response")
    op &= ~RESPONSE_BIT
    if version == 0:
        # NAT-PMP: version 0 | 128 + op | result u16 (| epoch u32)
        epoch = struct.unpack_from("!I", data, 4)[0] if len(data) >= 8 else 0
        return Response(0, op, ResultCode.UNSUPP_VERSION, 0, epoch, None)
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"PCP: response of {len(data)} bytes is shorter than its header")
    if len(data) % 4:
        raise ProtocolError(f"PCP: length {len(data)} is not a multiple of 4")
    result, lifetime, epoch = struct.unpack_from("!xxxBII", data)
    if version != VERSION:
        if result != ResultCode.UNSUPP_VERSION:
            raise ProtocolError(f"PCP: version {version} response")
        return Response(version, op, result, lifetime, epoch, None)
    pos = HEADER_SIZE
    mapping: MapResult | None = None
    if op == Opcode.MAP:
        if len(data) < HEADER_SIZE + MAP_SIZE:
            if result == ResultCode.SUCCESS:
                raise ProtocolError("PCP: MAP response without its payload")
            return Response(version, op, result, lifetime, epoch, None)
        nonce = data[pos : pos + NONCE_SIZE]
        number, internal, external = struct.unpack_from("!B3xHH", data, pos + NONCE_SIZE)
        address = address_from_bytes(data[pos + 20 : pos + MAP_SIZE])
        protocol: str | int = "all" if number == 0 else _NUMBER_PROTOCOLS.get(number, number)
        granted = result == ResultCode.SUCCESS and lifetime != 0 and number != 0
        if granted and (internal == 0 or external == 0):
            raise ProtocolError("PCP: a granted mapping with port 0")
        mapping = MapResult(nonce, protocol, internal, external, address)
        pos += MAP_SIZE
    elif op == Opcode.ANNOUNCE:
        pass
    elif op == Opcode.PEER:
        # we never send PEER; skip its payload (56 bytes) if it is there
        pos = min(len(data), pos + 56)
    else:
        if result == ResultCode.SUCCESS:
            raise ProtocolError(f"PCP: unknown opcode {op}")
        return Response(version, op, result, lifetime, epoch, None)
    options = _parse_options(data, pos)
    return Response(version, op, result, lifetime, epoch, mapping, options)
