"""NAT-PMP (RFC 6886) messages, sans-IO.

Requests are built from plain values; responses are parsed from the bytes of one datagram.
:func:`parse_response` accepts any bytes and either returns a response or raises
:class:`~crust.errors.ProtocolError`. Nothing here sends, sleeps or reads a clock: the
retransmission schedule and the epoch check take the times they need as arguments.

Wire format (all integers big-endian)::

    external address request   version 0 | opcode 0
    map request                version 0 | opcode 1 (UDP) or 2 (TCP) | reserved u16
                               | internal port u16 | suggested external port u16 | lifetime u32
    external address response  version 0 | 128 + 0 | result u16 | epoch u32 | address (4)
    map response               version 0 | 128 + op | result u16 | epoch u32
                               | internal port u16 | external port u16 | lifetime u32
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from crust.errors import InvalidArgument, ProtocolError

#: The UDP port a NAT-PMP (and PCP) server listens on, on the gateway.
SERVER_PORT = 5351
VERSION = 0
OP_EXTERNAL_ADDRESS = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 0x80
#: Largest datagram we look at (a PCP message is at most 1100 bytes; NAT-PMP ones are 16).
MAX_MESSAGE = 1100
#: Largest lifetime a request may ask for (RFC 6886 recommends 7200 s; the field is 32-bit).
MAX_LIFETIME = 0xFFFFFFFF

_PROTOCOL_OPS = {"udp": OP_MAP_UDP, "tcp": OP_MAP_TCP}
_OP_PROTOCOLS = {OP_MAP_UDP: "udp", OP_MAP_TCP: "tcp"}


class ResultCode(enum.IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def code_name(codes: type[enum.IntEnum], code: int) -> str:
    """A readable name for a protocol's result code (unknown codes are shown as numbers)."""
    try:
        return codes(code).name
    except ValueError:
        return f"result {code}"


def result_name(code: int) -> str:
    """A readable name for a NAT-PMP result code."""
    return code_name(ResultCode, code)


@dataclass(frozen=True, slots=True)
class ExternalAddressResponse:
    result: int
    epoch: int
    """Seconds since the gateway's port-mapping table was (re)initialised."""
    address: str
    """The gateway's external IPv4 address (meaningless unless ``result`` is 0)."""


@dataclass(frozen=True, slots=True)
class MapResponse:
    result: int
    epoch: int
    protocol: str
    """``"udp"`` or ``"tcp"``."""
    internal_port: int
    external_port: int
    lifetime: int
    """Seconds the mapping lives; 0 after a deletion."""


Response = ExternalAddressResponse | MapResponse


def _check_port(name: str, port: int, allow_zero: bool) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise InvalidArgument(f"{name} must be an integer, not {port!r}")
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise InvalidArgument(f"{name} out of range: {port}")


def check_protocol(protocol: str) -> str:
    if protocol not in _PROTOCOL_OPS:
        raise InvalidArgument(f"protocol must be 'udp' or 'tcp', not {protocol!r}")
    return protocol


def external_address_request() -> bytes:
    """Ask the gateway for its external IPv4 address (and its epoch)."""
    return bytes((VERSION, OP_EXTERNAL_ADDRESS))


def map_request(
    protocol: str, internal_port: int, suggested_external_port: int, lifetime: int
) -> bytes:
    """Ask for (or renew) a mapping of ``internal_port``; ``lifetime`` 0 deletes it.

    RFC 6886 §3.4: a deletion sends ``suggested_external_port`` 0 and ``lifetime`` 0;
    ``internal_port`` 0 with lifetime 0 deletes every mapping of this client and protocol.
    """
    op = _PROTOCOL_OPS[check_protocol(protocol)]
    _check_port("internal_port", internal_port, allow_zero=lifetime == 0)
    _check_port("suggested_external_port", suggested_external_port, allow_zero=True)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int):
        raise InvalidArgument(f"lifetime must be an integer, not {lifetime!r}")
    if not 0 <= lifetime <= MAX_LIFETIME:
        raise InvalidArgument(f"lifetime out of range: {lifetime}")
    return struct.pack("!BBHHHI", VERSION, op, 0, internal_port, suggested_external_port, lifetime)


def parse_response(data: bytes) -> Response:
    """Parse one datagram from the gateway's port 5351.

    Raises :class:`ProtocolError` for anything that is not a NAT-PMP response (a PCP
    message, a request, an unknown opcode, a truncated or oversized datagram). A response
    with a non-zero result code may be shorter than a full one (RFC 6886 §3.5 lets the other
    fields be undefined); its missing fields read as zero.
    """
    data = bytes(data)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"NAT-PMP: datagram of {len(data)} bytes is too large")
    if len(data) < 4:
        raise ProtocolError(f"NAT-PMP: datagram of {len(data)} bytes is too short")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise ProtocolError(f"NAT-PMP: version {version} is not 0")
    if not op & RESPONSE_BIT:
        raise ProtocolError("NAT-PMP: a request, not a response")
    op &= ~RESPONSE_BIT
    if op not in (OP_EXTERNAL_ADDRESS, OP_MAP_UDP, OP_MAP_TCP):
        if result != ResultCode.SUCCESS:
            # "unsupported opcode" answers echo our opcode; anything else is not ours
            raise ProtocolError(f"NAT-PMP: opcode {op} refused ({result_name(result)})")
        raise ProtocolError(f"NAT-PMP: unknown opcode {op}")
    full = 12 if op == OP_EXTERNAL_ADDRESS else 16
    if len(data) < full:
        if result == ResultCode.SUCCESS or len(data) not in (4, 8):
            raise ProtocolError(f"NAT-PMP: response of {len(data)} bytes is truncated")
        data = data + bytes(full - len(data))
    epoch = struct.unpack_from("!I", data, 4)[0]
    if op == OP_EXTERNAL_ADDRESS:
        address = str(ipaddress.IPv4Address(data[8:12]))
        return ExternalAddressResponse(result, epoch, address)
    internal, external, lifetime = struct.unpack_from("!HHI", data, 8)
    if result == ResultCode.SUCCESS and lifetime and (internal == 0 or external == 0):
        raise ProtocolError("NAT-PMP: a granted mapping with port 0")
    return MapResponse(result, epoch, _OP_PROTOCOLS[op], internal, external, lifetime)


def epoch_lost_state(prev_epoch: int, prev_time: float, epoch: int, now: float) -> bool:
    """Whether a gateway's epoch shows that it lost its mappings (rebooted) since the
    previous response (RFC 6886 §3.6, RFC 6887 §8.5).

    ``prev_time``/``now`` are the client's clock when the two responses arrived. The server
    clock may run up to 1/16 slower or faster than ours, with two seconds of slack.
    """
    if epoch + 1 < prev_epoch:
        return True
    client_delta = max(0.0, now - prev_time)
    server_delta = epoch - prev_epoch
    if client_delta + 2 < server_delta - server_delta / 16:
        return True
    return server_delta + 2 < client_delta - client_delta / 16


def retransmit_delays(initial: float = 0.25, attempts: int = 4) -> list[float]:
    """How long to wait for an answer after each (re)transmission: ``initial``, doubling.

    RFC 6886 §3.1 uses 250 ms doubling up to nine attempts (about 64 s in all); a client that
    can fall back to another protocol uses fewer attempts.
    """
    if attempts < 1 or initial <= 0:
        raise InvalidArgument("retransmission needs at least one attempt and a positive delay")
    return [initial * (1 << i) for i in range(attempts)]
