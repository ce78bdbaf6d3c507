"""Sans-IO STUN (RFC 8489) with the NAT behaviour discovery attributes of RFC 5780.

Three parts, none of which touches a socket, a clock or a random source:

* the **codec** -- :func:`parse` / :func:`encode` of :class:`StunMessage`, :func:`is_stun`;
* :class:`BindingTransaction` -- one client Binding transaction with RFC 8489 retransmission
  (RTO doubling, ``Rc`` transmissions, ``Rm`` x RTO final wait); ``now`` comes in, the
  transaction id comes in (the caller draws it from its random source);
* :class:`StunResponder` -- answers Binding requests (XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN,
  OTHER-ADDRESS, CHANGE-REQUEST, RESPONSE-PORT, PADDING) and rejects everything else as the
  RFCs ask, with a token-bucket limit on the answers it produces.

Every input is untrusted: :func:`parse` accepts at most :data:`MAX_MESSAGE_SIZE` bytes and
raises only :class:`~crust.errors.ProtocolError`.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
import zlib
from dataclasses import dataclass, field, replace
from enum import IntEnum

from crust.errors import CrustError, InvalidArgument, ProtocolError

Address = tuple[str, int]

MAGIC_COOKIE = 0x2112A442
COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12
MAX_MESSAGE_SIZE = 1280
"""The largest STUN message crust parses or builds (RFC 8489 asks for <= the path MTU; 548
bytes is the IPv4 minimum every agent must accept, 1280 the IPv6 minimum MTU)."""
FINGERPRINT_XOR = 0x5354554E
MAX_TEXT_BYTES = 763
"""SOFTWARE and the ERROR-CODE reason: fewer than 128 characters, at most 763 bytes."""
MAX_USERNAME_BYTES = 513

# Message classes (the two C bits of the message type).


class StunClass(IntEnum):
    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


BINDING = 0x001
"""The only method crust implements (RFC 8489 defines no other)."""


class Attr(IntEnum):
    """Attribute types crust understands (RFC 8489 and RFC 5780)."""

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    PADDING = 0x0026
    RESPONSE_PORT = 0x0027
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


KNOWN_ATTRIBUTES = frozenset(int(a) for a in Attr)

# Error codes used by crust (RFC 8489 section 14.8).
TRY_ALTERNATE = 300
BAD_REQUEST = 400
UNAUTHENTICATED = 401
UNKNOWN_ATTRIBUTE = 420
SERVER_ERROR = 500
REASONS = {
    TRY_ALTERNATE: "Try Alternate",
    BAD_REQUEST: "Bad Request",
    UNAUTHENTICATED: "Unauthenticated",
    UNKNOWN_ATTRIBUTE: "Unknown Attribute",
    SERVER_ERROR: "Server Error",
}

_FAMILY_V4 = 0x01
_FAMILY_V6 = 0x02
_CHANGE_IP = 0x04
_CHANGE_PORT = 0x02


class StunErrorResponse(ProtocolError):
    """The server answered a request with an error response (``code``, ``reason``)."""

    def __init__(self, code: int, reason: str, unknown_attributes: tuple[int, ...] = ()) -> None:
        text = f"STUN error {code} {reason}".rstrip()
        if unknown_attributes:
            text += " (unknown attributes: " + ", ".join(f"0x{a:04x}" for a in unknown_attributes)
            text += ")"
        super().__init__(text)
        self.code = code
        self.reason = reason
        self.unknown_attributes = unknown_attributes


class StunTimeout(CrustError, TimeoutError):
    """No STUN response arrived in time (after every retransmission)."""


# --------------------------------------------------------------------------------------------
# Message model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorCode:
    """The ERROR-CODE attribute: ``code`` 300..699 and a reason phrase."""

    code: int
    reason: str = ""


@dataclass(frozen=True)
class ChangeRequest:
    """RFC 5780 CHANGE-REQUEST: ask the server to answer from another IP and/or port."""

    change_ip: bool = False
    change_port: bool = False


@dataclass(frozen=True)
class StunMessage:
    """One STUN message.  Absent attributes are ``None``.

    On :func:`encode`, ``fingerprint=True`` appends a FINGERPRINT.  On :func:`parse`,
    ``fingerprint`` tells that a (valid) FINGERPRINT was present, ``unknown_required`` lists the
    comprehension-required attributes (type < 0x8000) crust does not understand, and
    ``integrity`` names the message-integrity attribute present (``"sha1"``, ``"sha256"``);
    check it with :meth:`check_integrity`.
    """

    cls: StunClass
    transaction_id: bytes
    method: int = BINDING
    mapped_address: Address | None = None
    xor_mapped_address: Address | None = None
    response_origin: Address | None = None
    other_address: Address | None = None
    change_request: ChangeRequest | None = None
    response_port: int | None = None
    padding: int | None = None
    """Length of the PADDING attribute (its content is zeros on encode, ignored on parse)."""
    software: str | None = None
    username: str | None = None
    error: ErrorCode | None = None
    unknown_attributes: tuple[int, ...] | None = None
    fingerprint: bool = False
    unknown_required: tuple[int, ...] = ()
    integrity: str | None = None
    _integrity_input: bytes = field(default=b"", compare=False, repr=False)
    _integrity_mac: bytes = field(default=b"", compare=False, repr=False)

    @property
    def mapped(self) -> Address | None:
        """XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS (old servers)."""
        return self.xor_mapped_address or self.mapped_address

    def check_integrity(self, key: bytes) -> bool:
        """True if the parsed message carried a MESSAGE-INTEGRITY(-SHA256) valid for ``key``."""
        if self.integrity is None:
            return False
        digest = "sha256" if self.integrity == "sha256" else "sha1"
        mac = hmac.new(key, self._integrity_input, digest).digest()[: len(self._integrity_mac)]
        return hmac.compare_digest(mac, self._integrity_mac)


def request(
    transaction_id: bytes,
    *,
    change_request: ChangeRequest | None = None,
    response_port: int | None = None,
    padding: int | None = None,
    software: str | None = None,
    username: str | None = None,
) -> StunMessage:
    """A Binding request (with FINGERPRINT)."""
    return StunMessage(
        StunClass.REQUEST,
        transaction_id,
        change_request=change_request,
        response_port=response_port,
        padding=padding,
        software=software,
        username=username,
        fingerprint=True,
    )


# --------------------------------------------------------------------------------------------
# Message type
# --------------------------------------------------------------------------------------------


def encode_type(method: int, cls: StunClass | int) -> int:
    """The 14-bit message type: method bits M0..M11 interleaved with the class bits C0, C1."""
    if not 0 <= method <= 0xFFF:
        raise InvalidArgument(f"STUN method {method} is not a 12-bit value")
    c = int(cls)
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
    )


def decode_type(message_type: int) -> tuple[int, StunClass]:
    method = (
        (message_type & 0x000F) | ((message_type >> 1) & 0x0070) | ((message_type >> 2) & 0x0F80)
    )
    cls = ((message_type >> 4) & 1) | ((message_type >> 7) & 2)
    return method, StunClass(cls)


# --------------------------------------------------------------------------------------------
# Quick check
# --------------------------------------------------------------------------------------------


def is_stun(datagram: bytes | bytearray | memoryview) -> bool:
    """Cheap test whether a datagram can be a STUN message (RFC 5389+ header).

    The two top bits are zero (QUIC packets always have 0x40 or 0x80 set), the magic cookie
    is in place and the length field matches the datagram and is a multiple of 4.
    """
    n = len(datagram)
    if n < HEADER_SIZE or n > MAX_MESSAGE_SIZE or datagram[0] & 0xC0:
        return False
    if bytes(datagram[4:8]) != COOKIE_BYTES:
        return False
    length = (datagram[2] << 8) | datagram[3]
    return length == n - HEADER_SIZE and length % 4 == 0


# --------------------------------------------------------------------------------------------
# Attribute values
# --------------------------------------------------------------------------------------------


def _xor_pad(transaction_id: bytes) -> bytes:
    return COOKIE_BYTES + transaction_id


def _pack_address(addr: Address, xor: bytes | None) -> bytes:
    host, port = addr
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError as exc:
        raise InvalidArgument(f"not an IP address: {host!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise InvalidArgument(f"port out of range: {port}")
    family = _FAMILY_V4 if ip.version == 4 else _FAMILY_V6
    raw = port.to_bytes(2, "big") + ip.packed
    if xor is not None:
        raw = bytes(a ^ b for a, b in zip(raw, xor[:2] + xor, strict=False))
    return bytes((0, family)) + raw


def _unpack_address(value: bytes, xor: bytes | None, name: str) -> Address:
    if len(value) == 8:
        family, size = _FAMILY_V4, 4
    elif len(value) == 20:
        family, size = _FAMILY_V6, 16
    else:
        raise ProtocolError(f"STUN {name}: bad length {len(value)}")
    if value[1] != family:
        raise ProtocolError(f"STUN {name}: family {value[1]} does not match length {len(value)}")
    raw = value[2:]
    if xor is not None:
        raw = bytes(a ^ b for a, b in zip(raw, xor[:2] + xor, strict=False))
    port = int.from_bytes(raw[:2], "big")
    packed = raw[2 : 2 + size]
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
        ipaddress.IPv4Address(packed) if size == 4 else ipaddress.IPv6Address(packed)
    )
    return str(ip), port


def _text(value: bytes, name: str, limit: int, strict: bool) -> str:
    if len(value) > limit:
        raise ProtocolError(f"STUN {name}: {len(value)} bytes, at most {limit}")
    try:
        return value.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"STUN {name} is not UTF-8") from exc


def _crc(data: bytes) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _with_length(data: bytes | bytearray, length: int) -> bytes:
    """``data`` (a message prefix) with its header length field set to ``length``."""
    return bytes(data[:2]) + length.to_bytes(2, "big") + bytes(data[4:])


# --------------------------------------------------------------------------------------------
# Parse
# --------------------------------------------------------------------------------------------


def parse(data: bytes | bytearray | memoryview) -> StunMessage:
    """Parse one STUN message; raises only :class:`~crust.errors.ProtocolError`.

    Checks the header (zero top bits, magic cookie, length), every attribute's length and
    padding, the values of the attributes crust understands, FINGERPRINT (must be last and
    correct) and the placement of MESSAGE-INTEGRITY(-SHA256) (what follows them is ignored,
    except FINGERPRINT, as RFC 8489 section 14 requires).
    """
    buf = bytes(data)
    n = len(buf)
    if n < HEADER_SIZE:
        raise ProtocolError(f"STUN message too short ({n} bytes)")
    if n > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"STUN message too long ({n} > {MAX_MESSAGE_SIZE} bytes)")
    message_type, length = struct.unpack_from("!HH", buf, 0)
    if message_type & 0xC000:
        raise ProtocolError("not a STUN message (top bits set)")
    if buf[4:8] != COOKIE_BYTES:
        raise ProtocolError("STUN message without the magic cookie (RFC 3489 is not supported)")
    if length % 4 or length != n - HEADER_SIZE:
        raise ProtocolError(f"STUN length field {length} does not fit {n - HEADER_SIZE} bytes")
    method, cls = decode_type(message_type)
    txid = buf[8:HEADER_SIZE]
    xor = _xor_pad(txid)

    fields: dict[str, object] = {}
    unknown: list[int] = []
    seen: set[int] = set()
    integrity: str | None = None
    integrity_input = b""
    integrity_mac = b""
    fingerprint = False
    pos = HEADER_SIZE
    while pos < n:
        if fingerprint:
            raise ProtocolError("STUN attribute after FINGERPRINT")
        if n - pos < 4:
            raise ProtocolError("truncated STUN attribute header")
        atype, alen = struct.unpack_from("!HH", buf, pos)
        start = pos + 4
        end = start + alen
        padded = start + ((alen + 3) & ~3)
        if padded > n:
            raise ProtocolError(f"STUN attribute 0x{atype:04x} overruns the message")
        value = buf[start:end]
        attr_start = pos
        pos = padded
        if atype == Attr.FINGERPRINT:
            if alen != 4:
                raise ProtocolError("STUN FINGERPRINT must be 4 bytes")
            if pos != n:
                raise ProtocolError("STUN FINGERPRINT is not the last attribute")
            expected = _crc(_with_length(buf[:attr_start], attr_start + 8 - HEADER_SIZE))
            if int.from_bytes(value, "big") != expected:
                raise ProtocolError("STUN FINGERPRINT mismatch")
            fingerprint = True
            continue
        if integrity == "sha256" or (
            integrity == "sha1" and atype != Attr.MESSAGE_INTEGRITY_SHA256
        ):
            continue  # not covered by the integrity check: ignored (RFC 8489 section 14.5/14.6)
        if atype in seen:
            continue  # only the first occurrence counts
        seen.add(atype)
        if atype == Attr.MESSAGE_INTEGRITY or atype == Attr.MESSAGE_INTEGRITY_SHA256:
            if atype == Attr.MESSAGE_INTEGRITY:
                if alen != 20:
                    raise ProtocolError("STUN MESSAGE-INTEGRITY must be 20 bytes")
                kind = "sha1"
            else:
                if alen < 16 or alen > 32 or alen % 4:
                    raise ProtocolError("STUN MESSAGE-INTEGRITY-SHA256 must be 16..32 bytes")
                kind = "sha256"
            if integrity is None or kind == "sha256":
                integrity = kind
                integrity_input = _with_length(
                    buf[:attr_start], attr_start + 4 + alen - HEADER_SIZE
                )
                integrity_mac = value
            continue
        if atype not in KNOWN_ATTRIBUTES:
            if atype < 0x8000:
                unknown.append(atype)
            continue
        _parse_known(Attr(atype), value, xor, fields)

    return StunMessage(
        cls=cls,
        transaction_id=txid,
        method=method,
        fingerprint=fingerprint,
        unknown_required=tuple(unknown),
        integrity=integrity,
        _integrity_input=integrity_input,
        _integrity_mac=integrity_mac,
        **fields,  # type: ignore[arg-type]
    )


def _parse_known(atype: Attr, value: bytes, xor: bytes, out: dict[str, object]) -> None:
    if atype == Attr.MAPPED_ADDRESS:
        out["mapped_address"] = _unpack_address(value, None, "MAPPED-ADDRESS")
    elif atype == Attr.XOR_MAPPED_ADDRESS:
        out["xor_mapped_address"] = _unpack_address(value, xor, "XOR-MAPPED-ADDRESS")
    elif atype == Attr.RESPONSE_ORIGIN:
        out["response_origin"] = _unpack_address(value, None, "RESPONSE-ORIGIN")
    elif atype == Attr.OTHER_ADDRESS:
        out["other_address"] = _unpack_address(value, None, "OTHER-ADDRESS")
    elif atype == Attr.CHANGE_REQUEST:
        if len(value) != 4:
            raise ProtocolError("STUN CHANGE-REQUEST must be 4 bytes")
        flags = value[3]
        out["change_request"] = ChangeRequest(bool(flags & _CHANGE_IP), bool(flags & _CHANGE_PORT))
    elif atype == Attr.RESPONSE_PORT:
        if len(value) != 4:
            raise ProtocolError("STUN RESPONSE-PORT must be 4 bytes")
        out["response_port"] = int.from_bytes(value[:2], "big")
    elif atype == Attr.PADDING:
        out["padding"] = len(value)
    elif atype == Attr.SOFTWARE:
        out["software"] = _text(value, "SOFTWARE", MAX_TEXT_BYTES, strict=False)
    elif atype == Attr.USERNAME:
        out["username"] = _text(value, "USERNAME", MAX_USERNAME_BYTES, strict=True)
    elif atype == Attr.ERROR_CODE:
        if len(value) < 4:
            raise ProtocolError("STUN ERROR-CODE shorter than 4 bytes")
        klass, number = value[2] & 0x07, value[3]
        if not 3 <= klass <= 6 or number > 99:
            raise ProtocolError(f"STUN ERROR-CODE {klass}/{number} out of range")
        reason = _text(value[4:], "ERROR-CODE reason", MAX_TEXT_BYTES, strict=False)
        out["error"] = ErrorCode(klass * 100 + number, reason)
    elif atype == Attr.UNKNOWN_ATTRIBUTES:
        if len(value) % 2:
            raise ProtocolError("STUN UNKNOWN-ATTRIBUTES has an odd length")
        out["unknown_attributes"] = tuple(
            int.from_bytes(value[i : i + 2], "big") for i in range(0, len(value), 2)
        )
    else:  # pragma: no cover - every member of Attr is handled above or in parse()
        raise ProtocolError(f"unhandled STUN attribute {atype!r}")


# --------------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


def _encode_text(text: str, name: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise InvalidArgument(f"{name} is {len(raw)} bytes, at most {limit}")
    return raw


def encode(
    msg: StunMessage,
    *,
    integrity_key: bytes | None = None,
    integrity: str = "sha1",
) -> bytes:
    """Serialize ``msg``; with ``integrity_key`` add MESSAGE-INTEGRITY (``"sha1"``) or
    MESSAGE-INTEGRITY-SHA256 (``"sha256"``), and a FINGERPRINT if ``msg.fingerprint``.

    Raises :class:`~crust.errors.InvalidArgument` for values that cannot be encoded (bad
    transaction id, address, port, text too long, message over :data:`MAX_MESSAGE_SIZE`).
    """
    txid = msg.transaction_id
    if len(txid) != TRANSACTION_ID_SIZE:
        raise InvalidArgument(f"transaction id must be {TRANSACTION_ID_SIZE} bytes")
    xor = _xor_pad(txid)
    parts: list[bytes] = []
    if msg.xor_mapped_address is not None:
        parts.append(_attr(Attr.XOR_MAPPED_ADDRESS, _pack_address(msg.xor_mapped_address, xor)))
    if msg.mapped_address is not None:
        parts.append(_attr(Attr.MAPPED_ADDRESS, _pack_address(msg.mapped_address, None)))
    if msg.response_origin is not None:
        parts.append(_attr(Attr.RESPONSE_ORIGIN, _pack_address(msg.response_origin, None)))
    if msg.other_address is not None:
        parts.append(_attr(Attr.OTHER_ADDRESS, _pack_address(msg.other_address, None)))
    if msg.change_request is not None:
        flags = (_CHANGE_IP if msg.change_request.change_ip else 0) | (
            _CHANGE_PORT if msg.change_request.change_port else 0
        )
        parts.append(_attr(Attr.CHANGE_REQUEST, bytes((0, 0, 0, flags))))
    if msg.response_port is not None:
        if not 0 <= msg.response_port <= 0xFFFF:
            raise InvalidArgument(f"RESPONSE-PORT out of range: {msg.response_port}")
        parts.append(_attr(Attr.RESPONSE_PORT, msg.response_port.to_bytes(2, "big") + b"\0\0"))
    if msg.username is not None:
        parts.append(
            _attr(Attr.USERNAME, _encode_text(msg.username, "USERNAME", MAX_USERNAME_BYTES))
        )
    if msg.error is not None:
        code = msg.error.code
        if not 300 <= code <= 699:
            raise InvalidArgument(f"STUN error code out of range: {code}")
        reason = _encode_text(msg.error.reason, "error reason", MAX_TEXT_BYTES)
        parts.append(_attr(Attr.ERROR_CODE, bytes((0, 0, code // 100, code % 100)) + reason))
    if msg.unknown_attributes is not None:
        value = b"".join(a.to_bytes(2, "big") for a in msg.unknown_attributes)
        parts.append(_attr(Attr.UNKNOWN_ATTRIBUTES, value))
    if msg.software is not None:
        parts.append(_attr(Attr.SOFTWARE, _encode_text(msg.software, "SOFTWARE", MAX_TEXT_BYTES)))
    if msg.padding is not None:
        if not 0 <= msg.padding <= MAX_MESSAGE_SIZE:
            raise InvalidArgument(f"PADDING length out of range: {msg.padding}")
        parts.append(_attr(Attr.PADDING, bytes(msg.padding)))
    body = b"".join(parts)
    mtype = encode_type(msg.method, msg.cls)

    def header(length: int) -> bytes:
        return struct.pack("!HH", mtype, length) + COOKIE_BYTES + txid

    if integrity_key is not None:
        if integrity == "sha1":
            atype, digest, size = Attr.MESSAGE_INTEGRITY, "sha1", 20
        elif integrity == "sha256":
            atype, digest, size = Attr.MESSAGE_INTEGRITY_SHA256, "sha256", 32
        else:
            raise InvalidArgument(f"integrity must be 'sha1' or 'sha256', not {integrity!r}")
        mac = hmac.new(integrity_key, header(len(body) + 4 + size) + body, digest).digest()
        body += _attr(atype, mac)
    if msg.fingerprint:
        crc = _crc(header(len(body) + 8) + body)
        body += _attr(Attr.FINGERPRINT, crc.to_bytes(4, "big"))
    out = header(len(body)) + body
    if len(out) > MAX_MESSAGE_SIZE:
        raise InvalidArgument(f"STUN message of {len(out)} bytes exceeds {MAX_MESSAGE_SIZE}")
    return out


def short_term_key(password: str) -> bytes:
    """The short-term credential key (RFC 8489 section 9.1.1; OpaqueString is not applied)."""
    return password.encode("utf-8")


# --------------------------------------------------------------------------------------------
# Client transaction
# --------------------------------------------------------------------------------------------

DEFAULT_RTO = 0.5
DEFAULT_RC = 7
DEFAULT_RM = 16


@dataclass(frozen=True)
class BindingResult:
    """A successful Binding transaction."""

    mapped: Address
    """The server-reflexive address (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS)."""
    server: Address
    """Where the request was sent."""
    source: Address
    """Where the response came from (differs from ``server`` after a CHANGE-REQUEST)."""
    response_origin: Address | None
    other_address: Address | None
    rtt: float
    """Seconds from the last transmission to the response."""
    transmissions: int
    software: str | None = None


@dataclass(frozen=True)
class TransactionDone:
    """The transaction finished: exactly one of ``result`` and ``error`` is set."""

    transaction_id: bytes
    result: BindingResult | None
    error: CrustError | None


class BindingTransaction:
    """One client Binding transaction over UDP (RFC 8489 section 6.2.1).

    Transmissions at ``0, RTO, 3 RTO, 7 RTO, ...`` (the interval doubles), ``rc`` of them in
    all; after the last one the transaction waits ``rm x RTO`` and then fails with
    :class:`StunTimeout`.  The surface is aioquic's: :meth:`datagrams_to_send`,
    :meth:`get_timer`, :meth:`handle_timer`, :meth:`receive`, :meth:`next_event`.
    """

    def __init__(
        self,
        transaction_id: bytes,
        server: Address,
        now: float,
        *,
        rto: float = DEFAULT_RTO,
        rc: int = DEFAULT_RC,
        rm: int = DEFAULT_RM,
        change_request: ChangeRequest | None = None,
        response_port: int | None = None,
        padding: int | None = None,
        software: str | None = None,
        username: str | None = None,
        integrity_key: bytes | None = None,
    ) -> None:
        if not rto > 0:
            raise InvalidArgument(f"rto must be positive, not {rto}")
        if rc < 1 or rm < 1:
            raise InvalidArgument("rc and rm must be at least 1")
        self.transaction_id = bytes(transaction_id)
        self.server = server
        self.rto = rto
        self.rc = rc
        self.rm = rm
        self.integrity_key = integrity_key
        self.request = encode(
            request(
                self.transaction_id,
                change_request=change_request,
                response_port=response_port,
                padding=padding,
                software=software,
                username=username,
            ),
            integrity_key=integrity_key,
        )
        self.transmissions = 0
        self._interval = rto
        self._next_send: float | None = now
        self._deadline: float | None = None
        self._last_sent = now
        self._events: list[TransactionDone] = []
        self.result: BindingResult | None = None
        self.error: CrustError | None = None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        if self.done or self._next_send is None or now < self._next_send:
            return []
        self.transmissions += 1
        self._last_sent = now
        if self.transmissions < self.rc:
            self._next_send = now + self._interval
            self._interval *= 2
        else:
            self._next_send = None
            self._deadline = now + self.rm * self.rto
        return [(self.request, self.server)]

    def get_timer(self) -> float | None:
        if self.done:
            return None
        return self._next_send if self._next_send is not None else self._deadline

    def handle_timer(self, now: float) -> None:
        if self.done:
            return
        if self._deadline is not None and now >= self._deadline:
            self._fail(
                StunTimeout(
                    f"no STUN response from {self.server[0]}:{self.server[1]} "
                    f"after {self.transmissions} transmissions"
                )
            )
        # a due transmission is picked up by datagrams_to_send(now)

    def cancel(self, error: CrustError) -> None:
        """End the transaction early (e.g. the caller's own deadline passed)."""
        if not self.done:
            self._fail(error)

    def receive(self, msg: StunMessage, source: Address, now: float) -> bool:
        """Feed a parsed message; returns whether it belonged to this transaction."""
        if msg.transaction_id != self.transaction_id or msg.method != BINDING:
            return False
        if msg.cls not in (StunClass.SUCCESS, StunClass.ERROR):
            return False
        if self.done:
            return True  # a late duplicate
        if self.integrity_key is not None and not msg.check_integrity(self.integrity_key):
            return True  # not authenticated: ignore, keep retransmitting (RFC 8489 9.1.4)
        if msg.cls == StunClass.ERROR:
            if msg.error is None:
                self._fail(ProtocolError("STUN error response without ERROR-CODE"))
            else:
                self._fail(
                    StunErrorResponse(
                        msg.error.code, msg.error.reason, msg.unknown_attributes or ()
                    )
                )
            return True
        if msg.unknown_required:
            self._fail(
                ProtocolError(
                    "STUN response with unknown comprehension-required attributes "
                    + ", ".join(f"0x{a:04x}" for a in msg.unknown_required)
                )
            )
            return True
        mapped = msg.mapped
        if mapped is None:
            self._fail(ProtocolError("STUN Binding response without a mapped address"))
            return True
        self.result = BindingResult(
            mapped=mapped,
            server=self.server,
            source=source,
            response_origin=msg.response_origin,
            other_address=msg.other_address,
            rtt=max(0.0, now - self._last_sent),
            transmissions=self.transmissions,
            software=msg.software,
        )
        self._events.append(TransactionDone(self.transaction_id, self.result, None))
        return True

    def next_event(self) -> TransactionDone | None:
        return self._events.pop(0) if self._events else None

    def _fail(self, error: CrustError) -> None:
        self.error = error
        self._next_send = None
        self._deadline = None
        self._events.append(TransactionDone(self.transaction_id, None, error))


# --------------------------------------------------------------------------------------------
# Responder
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponderAddresses:
    """Where a STUN server listens: ``primary`` and, for RFC 5780, ``alternate`` (another IP
    *and* another port).  The server then listens on all four combinations
    ``{primary ip, alternate ip} x {primary port, alternate port}``."""

    primary: Address
    alternate: Address | None = None

    def __post_init__(self) -> None:
        alt = self.alternate
        if alt is not None and (alt[0] == self.primary[0] or alt[1] == self.primary[1]):
            raise InvalidArgument("the alternate address needs another IP and another port")

    def endpoints(self) -> list[Address]:
        if self.alternate is None:
            return [self.primary]
        (ip1, p1), (ip2, p2) = self.primary, self.alternate
        return [(ip1, p1), (ip1, p2), (ip2, p1), (ip2, p2)]

    def index(self, local: Address) -> tuple[int, int] | None:
        """(ip index, port index) of a local endpoint, or None if it is not one of ours."""
        ips = [self.primary[0]] + ([self.alternate[0]] if self.alternate else [])
        ports = [self.primary[1]] + ([self.alternate[1]] if self.alternate else [])
        host = _normal_ip(local[0])
        for i, ip in enumerate(ips):
            if _normal_ip(ip) == host:
                for j, port in enumerate(ports):
                    if port == local[1]:
                        return i, j
        return None

    def endpoint(self, ip_index: int, port_index: int) -> Address:
        ips = [self.primary[0]] + ([self.alternate[0]] if self.alternate else [])
        ports = [self.primary[1]] + ([self.alternate[1]] if self.alternate else [])
        return ips[ip_index], ports[port_index]


def _normal_ip(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return host


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return True


@dataclass(frozen=True)
class Reply:
    """A datagram the responder wants sent: ``data`` to ``destination`` from ``source``
    (one of the server's endpoints; the one the request arrived on unless CHANGE-REQUEST)."""

    data: bytes
    destination: Address
    source: Address | None
    """None: the endpoint the request arrived on."""


RESPONDER_STATS = (
    "requests",
    "responses",
    "errors_sent",
    "not_stun",
    "malformed",
    "ignored",
    "rate_limited",
)


class StunResponder:
    """Answers STUN Binding requests; stateless apart from counters and the rate limiter.

    * success: XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN (when the local address is known),
      OTHER-ADDRESS (when an alternate address is configured), SOFTWARE (if set),
      FINGERPRINT; PADDING in the request is mirrored so the response is no larger than the
      request; RESPONSE-PORT sends the answer to that port of the request's source IP;
    * CHANGE-REQUEST is honoured from the matching endpoint when ``addresses`` has an
      alternate; without one, a request asking for a change gets 420 (Unknown Attribute);
    * unknown comprehension-required attributes -> 420 with UNKNOWN-ATTRIBUTES; another method
      -> 400; indications, responses and anything malformed are dropped silently;
    * at most ``rate`` answers per second (burst ``burst``); beyond that requests are dropped.
    """

    def __init__(
        self,
        addresses: ResponderAddresses | None = None,
        *,
        software: str | None = None,
        allow_response_port: bool = True,
        rate: float = 200.0,
        burst: float = 100.0,
    ) -> None:
        if software is not None:
            _encode_text(software, "SOFTWARE", MAX_TEXT_BYTES)
        if rate <= 0 or burst < 1:
            raise InvalidArgument("rate must be positive and burst at least 1")
        self.addresses = addresses
        self.software = software
        self.allow_response_port = allow_response_port
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last: float | None = None
        self.stats: dict[str, int] = dict.fromkeys(RESPONDER_STATS, 0)

    def _take_token(self, now: float) -> bool:
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def handle(
        self,
        data: bytes | bytearray | memoryview,
        source: Address,
        local: Address | None,
        now: float,
    ) -> Reply | None:
        """The answer to one datagram that arrived on ``local`` from ``source`` (or None)."""
        if not is_stun(data):
            self.stats["not_stun"] += 1
            return None
        try:
            msg = parse(data)
        except ProtocolError:
            self.stats["malformed"] += 1
            return None
        if msg.cls != StunClass.REQUEST:
            self.stats["ignored"] += 1
            return None
        self.stats["requests"] += 1
        if not self._take_token(now):
            self.stats["rate_limited"] += 1
            return None
        here = local if local is not None and not _is_unspecified(local[0]) else None
        grid = self.addresses
        index = grid.index(here) if grid is not None and here is not None else None

        def error(code: int, unknown: tuple[int, ...] | None = None) -> Reply:
            self.stats["errors_sent"] += 1
            answer = StunMessage(
                StunClass.ERROR,
                msg.transaction_id,
                method=msg.method,
                error=ErrorCode(code, REASONS.get(code, "")),
                unknown_attributes=unknown,
                software=self.software,
                fingerprint=True,
            )
            return Reply(encode(answer), source, None)

        if msg.method != BINDING:
            return error(BAD_REQUEST)
        unknown = list(msg.unknown_required)
        if msg.response_port is not None and not self.allow_response_port:
            unknown.append(Attr.RESPONSE_PORT)
        change = msg.change_request
        wants_change = change is not None and (change.change_ip or change.change_port)
        can_change = grid is not None and grid.alternate is not None and index is not None
        if wants_change and not can_change:
            unknown.append(Attr.CHANGE_REQUEST)
        if unknown:
            return error(UNKNOWN_ATTRIBUTE, tuple(dict.fromkeys(int(a) for a in unknown)))
        if msg.response_port == 0:
            return error(BAD_REQUEST)

        send_from = here
        other: Address | None = None
        if grid is not None and grid.alternate is not None and index is not None:
            i, j = index
            if change is not None:
                i ^= int(change.change_ip)
                j ^= int(change.change_port)
            send_from = grid.endpoint(i, j)
            other = grid.endpoint(1 - index[0], 1 - index[1])
        destination = (source[0], msg.response_port) if msg.response_port else source
        answer = StunMessage(
            StunClass.SUCCESS,
            msg.transaction_id,
            xor_mapped_address=source,
            response_origin=send_from,
            other_address=other,
            software=self.software,
            fingerprint=True,
        )
        out = encode(answer)
        if msg.padding is not None:
            room = len(data) - len(out) - 4
            if room >= 0:
                out = encode(replace(answer, padding=room - room % 4))
        self.stats["responses"] += 1
        return Reply(out, destination, send_from if index is not None else None)
