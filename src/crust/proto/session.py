"""The crust session: handshake, framing, priorities and heartbeats over any byte stream.

Sans-IO (the aioquic surface): bytes go in with :meth:`Session.receive_data`, bytes to write
come out of :meth:`Session.data_to_send`, time comes in as ``now``, events are read from
:attr:`Session.events`.  The same machine runs over TCP and over a QUIC stream.

Wire format (all integers big-endian)::

    initiator -> responder   header: b"CRST" | version u8 | network tag (8 bytes)
                             u16 length | Noise XX message 1 (e, empty clear payload)
    responder -> initiator   status u8 (0 ok, 1 network mismatch, 2 version unsupported)
                             u16 length | Noise message 2 (e, ee, s, es | hello)
    initiator -> responder   u16 length | Noise message 3 (s, se | hello)
    both ways, then          u16 length | AEAD record (plaintext <= 65519 bytes)

An *address echo* (port prediction, see :mod:`crust.proto.predict`) is a header whose version
byte is :data:`ECHO_VERSION` and nothing else; the responder answers
``status 3 | family u8 (4/6) | port u16 | address (4/16 bytes)`` -- the address it sees the
connection come from -- and closes.  No session, no keys, no identity.

The Noise prologue is ``b"crust-prologue" | header | network name``, so a peer of another
network, or a header changed on the wire, fails the handshake.  ``hello`` is a msgpack map
whose ``id`` is the Ed25519 peer id and ``sig`` its signature of the sender's Noise static
key: that binds the authenticated Noise key to the peer id.

A record's plaintext is a sequence of frames ``kind u8 | priority u8 | length u32 | body``.
Messages larger than what fits in a record are fragmented (FIRST carries the total length);
a more urgent message may interleave with the fragments of a less urgent one.

Signed messages (``send_message(..., signed=True)``) use their own kinds, SMSG and SFIRST (then
MORE/LAST as usual); their body starts with ``sequence u64 | Ed25519 signature (64)`` followed
by the data (see :mod:`crust.signing` for what is signed).  The whole header is always in the
SMSG/SFIRST frame, so the receiver checks the sequence when the message starts.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from crust.errors import (
    HandshakeError,
    HandshakeTimeout,
    NetworkMismatch,
    OversizedInput,
    PeerAuthenticationError,
    ProtocolError,
    VersionMismatch,
)
from crust.events import MessageReceived, message_received
from crust.identity import Identity, PeerId
from crust.proto.noise import DH_LEN, TAG_LEN, CipherState, HandshakeState, TransportKeys
from crust.signing import SIGNED_HEADER, SIGNED_HEADER_LEN, SignedMessage, signing_input

MAGIC = b"CRST"
VERSION = 1
HEADER_LEN = 13
MAX_RECORD = 65535
MAX_PLAINTEXT = MAX_RECORD - TAG_LEN
FRAME_HEADER = struct.Struct(">BBI")
FRAME_HEADER_LEN = FRAME_HEADER.size
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
MAX_HELLO = 8192
HANDSHAKE_OVERHEAD = 2 * DH_LEN + TAG_LEN
"""Noise message 2 without its payload: e, encrypted s (key + tag); the payload's tag comes
on top."""
MAX_HELLO_CONTACTS = 32
MAX_CONTROL = 65536
PREEMPT_LIMIT = 1024 * 1024
"""A sender only starts a new message while less than this many bytes of other messages are
partially sent; the receiver bounds its reassembly buffers by it plus one message."""
SMALL_MESSAGE = 16 * 1024
"""Messages up to this size are never split across records (they wait for the next one)."""
STATIC_KEY_CONTEXT = b"crust static key v1\x00"

STATUS_OK = 0
STATUS_NETWORK_MISMATCH = 1
STATUS_VERSION = 2
STATUS_ECHO = 3
ECHO_VERSION = 0xEC
"""The header version byte of an address echo request (never a session version)."""
ECHO_REPLY_MAX = 1 + 1 + 2 + 16


class Kind(enum.IntEnum):
    MSG = 1
    FIRST = 2
    MORE = 3
    LAST = 4
    SMSG = 5
    SFIRST = 6
    PING = 16
    PONG = 17
    CLOSE = 32
    SELECT = 33
    ACCEPT = 34
    CONTROL = 48


# plain ints for the per-frame loops (an IntEnum attribute lookup and comparison cost more)
_MSG = int(Kind.MSG)
_SMSG = int(Kind.SMSG)
_FIRST = int(Kind.FIRST)
_MORE = int(Kind.MORE)
_LAST = int(Kind.LAST)
_SFIRST = int(Kind.SFIRST)


class CloseCode(enum.IntEnum):
    NORMAL = 0
    DUPLICATE = 1
    REPLACED = 2
    PROTOCOL_ERROR = 3
    BLACKLISTED = 4
    SHUTDOWN = 5
    SELF = 6
    LIMIT = 7
    TIMEOUT = 8


class State(enum.Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    peer_id: PeerId
    hello: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Selected:
    """The remote (the greater peer id) chose this connection."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """The remote (the lesser peer id) checked our identity and accepts the connection."""


@dataclass(frozen=True, slots=True)
class ControlReceived:
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SignatureRejected:
    """A signed message was not delivered: its signature is invalid (``"forged"``) or its
    sequence number does not increase (``"replayed"``)."""

    reason: str
    sequence: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    token: int
    rtt: float | None


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended. ``error`` is set when it ended because of a failure."""

    code: int
    reason: str
    by_peer: bool
    error: BaseException | None = None


SessionEvent = (
    HandshakeCompleted
    | Selected
    | Accepted
    | ControlReceived
    | PongReceived
    | SignatureRejected
    | Closed
    | MessageReceived
)


# ----------------------------------------------------------------------------- parameters


def network_tag(network_name: str) -> bytes:
    """8 clear bytes naming the network (a hash, so the name itself is not shown)."""
    return hashlib.sha256(b"crust network\x00" + network_name.encode("utf-8")).digest()[:8]


def handshake_header(network_name: str) -> bytes:
    return MAGIC + bytes([VERSION]) + network_tag(network_name)


def echo_request(network_name: str) -> bytes:
    """An address echo request: "which address do you see this connection come from?"."""
    return MAGIC + bytes([ECHO_VERSION]) + network_tag(network_name)


def encode_echo_reply(address: tuple[str, int]) -> bytes:
    ip = ipaddress.ip_address(address[0])
    return bytes([STATUS_ECHO, ip.version]) + U16.pack(address[1]) + ip.packed


def parse_echo_reply(data: bytes | bytearray | memoryview) -> tuple[str, int] | None:
    """The address in a complete echo reply; None while more bytes are needed.  Anything
    else (another status, a bad family, port 0, trailing bytes) raises ProtocolError."""
    raw = bytes(data)
    if not raw:
        return None
    if raw[0] == STATUS_NETWORK_MISMATCH:
        raise NetworkMismatch("peer belongs to another network")
    if raw[0] != STATUS_ECHO:
        raise ProtocolError(f"not an address echo (status {raw[0]})")
    if len(raw) < 2:
        return None
    if raw[1] not in (4, 6):
        raise ProtocolError(f"address echo: bad family {raw[1]}")
    size = 4 + (4 if raw[1] == 4 else 16)
    if len(raw) < size:
        return None
    if len(raw) > size:
        raise ProtocolError("address echo: trailing bytes")
    port = (raw[2] << 8) | raw[3]
    if port == 0:
        raise ProtocolError("address echo: port 0")
    return str(ipaddress.ip_address(raw[4:])), port


@dataclass
class SessionParams:
    """What a session needs from the service (one object shared by all sessions)."""

    identity: Identity
    network_name: str
    static_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    max_message_size: int = 2 * 1024 * 1024
    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 120.0
    handshake_timeout: float = 10.0
    send_queue_size: int = 16 * 1024 * 1024
    hello_extra: dict[str, Any] = field(default_factory=dict)
    """Extra hello fields (contacts, role); bounded by MAX_HELLO when encoded."""
    scratch: bytearray = field(default_factory=lambda: bytearray(MAX_PLAINTEXT), repr=False)
    """Plaintext work space shared by every session made with these parameters (one
    service, one thread): records are packed and decrypted into it within one call, so an
    idle connection costs no 64 KiB buffer of its own."""
    keylog: Callable[[TransportKeys], None] | None = None
    """Debugging only: called with every session's transport keys when its handshake
    completes (the asyncio layer writes them to ``Config.keylog_file``)."""

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives import serialization

        pub = self.static_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.static_signature = self.identity.sign(STATIC_KEY_CONTEXT + pub)
        self.header = handshake_header(self.network_name)
        self.prologue = b"crust-prologue\x00" + self.header + self.network_name.encode("utf-8")


class _OutMessage:
    __slots__ = ("data", "offset", "priority", "sealed", "signed")

    def __init__(self, data: bytes, priority: int, signed: bool = False) -> None:
        self.data = data
        self.priority = priority
        self.offset = 0
        self.signed = signed
        self.sealed = False  # signed: the sequence and signature are prepended to data


class _Partial:
    __slots__ = ("buf", "filled", "replayed", "signed")

    def __init__(self, total: int, signed: bool = False, replayed: bool = False) -> None:
        self.buf = bytearray(total)
        self.filled = 0
        self.signed = signed
        self.replayed = replayed


# ----------------------------------------------------------------------------- session


class Session:
    """One connection's protocol machine, from the first handshake byte to the close."""

    def __init__(
        self,
        params: SessionParams,
        *,
        initiator: bool,
        now: float,
        expected_peer: PeerId | None = None,
        observed: str | None = None,
    ) -> None:
        self.params = params
        self.initiator = initiator
        self.expected_peer = expected_peer
        self.state = State.HANDSHAKE
        self.peer_id: PeerId | None = None
        self.remote_hello: dict[str, Any] = {}
        self.events: deque[SessionEvent] = deque()
        self.rtt: float | None = None
        self.close_code: int | None = None
        self.closed_event: Closed | None = None
        # statistics (read by the service)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.dropped: dict[int, int] = {}
        self.signed_sent = 0
        self.signed_received = 0
        self.signature_failures = 0
        self.handshake_hash = b""
        self._sign_seq = 0  # the sequence of our last signed message
        self._sign_seen = 0  # the greatest sequence of the peer's signed messages
        self._observed = observed
        self._noise: HandshakeState | None = HandshakeState(
            initiator, params.prologue, params.static_key
        )
        self._send: CipherState | None = None
        self._recv: CipherState | None = None
        self._inbuf = bytearray()
        self._out: list[bytes | bytearray] = []
        self._plain = params.scratch
        self._plain_view = memoryview(self._plain)
        self._got_header = initiator  # the responder first reads the clear header
        self._handshake_read = 0  # Noise handshake messages read so far
        self._got_status = not initiator
        self._handshake_deadline = now + params.handshake_timeout
        self._last_rx = now
        self._next_ping = now + params.heartbeat_interval
        self._ping_token = 0
        self._ping_sent: dict[int, float] = {}
        self._close_deadline: float | None = None
        # outgoing queues
        self._queues: dict[int, deque[_OutMessage]] = {}
        self._active: list[int] = []  # sorted priorities with queued messages
        self._control: list[tuple[int, bytes]] = []
        self.queued_bytes = 0
        self._partial_out = 0  # full length of messages started but not finished
        # incoming reassembly
        self._partials: dict[int, _Partial] = {}
        self._partial_in = 0
        if initiator:
            msg1 = self._noise.write_message(b"")
            self._emit_raw(params.header + U16.pack(len(msg1)) + msg1)

    # ------------------------------------------------------------------ public surface

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def data_to_send(self, limit: int = 1 << 62) -> list[bytes | bytearray]:
        """Records ready to write: queued messages packed into as few records as fit, until
        about ``limit`` bytes are produced (the rest stays queued for the next call)."""
        if self.state in (State.ESTABLISHED, State.CLOSING) and (self._control or self._active):
            self._pack_records(limit)
        out, self._out = self._out, []
        return out

    def has_data_to_send(self) -> bool:
        return bool(self._out) or (
            self.state in (State.ESTABLISHED, State.CLOSING) and bool(self._control or self._active)
        )

    def send_message(self, data: bytes, priority: int, signed: bool = False) -> bool:
        """Queue a message. Returns False when it was dropped (priority >= 2, queue full).

        Priorities 0 and 1 are never dropped: the caller waits while :attr:`queue_full`.
        ``signed``: sign it with our identity when it starts to go out (the sequence number
        then follows the wire order).
        """
        if self.state is not State.ESTABLISHED:
            raise ProtocolError("session is not established")
        if len(data) > self.params.max_message_size:
            raise ProtocolError("message larger than max_message_size")
        if priority >= 2 and self.queued_bytes >= self.params.send_queue_size:
            self._make_room(priority)
            if self.queued_bytes >= self.params.send_queue_size:
                self.dropped[priority] = self.dropped.get(priority, 0) + 1
                return False
        q = self._queues.get(priority)
        if q is None:
            q = self._queues[priority] = deque()
        if not q:
            bisect.insort(self._active, priority)
        q.append(_OutMessage(data, priority, signed))
        self.queued_bytes += len(data)
        return True

    @property
    def queue_full(self) -> bool:
        return self.queued_bytes >= self.params.send_queue_size

    def send_control(self, payload: dict[str, Any]) -> None:
        body = msgpack.packb(payload, use_bin_type=True)
        if len(body) > MAX_CONTROL:
            raise ProtocolError("control message too large")
        self._control.append((Kind.CONTROL, body))

    def select(self) -> None:
        """Tell the remote (the lesser peer id) that this connection is the one kept."""
        self._control.append((Kind.SELECT, b""))

    def accept(self) -> None:
        """Tell the remote (the greater peer id) that we accept its identity; it decides."""
        self._control.append((Kind.ACCEPT, b""))

    def ping(self, now: float) -> int:
        self._ping_token = (self._ping_token + 1) & 0xFFFFFFFFFFFFFFFF
        self._ping_sent[self._ping_token] = now
        if len(self._ping_sent) > 16:
            del self._ping_sent[min(self._ping_sent)]
        self._control.append((Kind.PING, U64.pack(self._ping_token)))
        return self._ping_token

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", now: float = 0.0) -> None:
        """Start a clean close: queued messages go first, then CLOSE; wait for the peer's."""
        if self.state is State.HANDSHAKE:
            self._finish(Closed(code, reason, by_peer=False))
            return
        if self.state is not State.ESTABLISHED:
            return
        self.state = State.CLOSING
        self.close_code = code
        self._close_reason = reason
        self._close_deadline = now + min(self.params.handshake_timeout, 5.0)
        self._control.append((Kind.CLOSE, bytes([code]) + reason.encode()[:200]))

    def abort(self, code: int, reason: str, error: BaseException | None = None) -> None:
        """End at once (the transport is gone or must be dropped)."""
        if self.state is not State.CLOSED:
            self._finish(Closed(code, reason, by_peer=False, error=error))

    def connection_lost(self, error: BaseException | None = None) -> None:
        """The transport closed underneath us."""
        if self.state is State.CLOSED:
            return
        if self.state is State.CLOSING:
            self._finish(Closed(self.close_code or 0, self._close_reason, by_peer=False))
        elif self.state is State.HANDSHAKE:
            err = error or HandshakeError("connection closed during the handshake")
            self._finish(Closed(CloseCode.PROTOCOL_ERROR, str(err), by_peer=True, error=err))
        else:
            self._finish(Closed(CloseCode.NORMAL, "connection closed", by_peer=True, error=error))

    def get_timer(self) -> float | None:
        if self.state is State.CLOSED:
            return None
        if self.state is State.HANDSHAKE:
            return self._handshake_deadline
        deadline = min(self._next_ping, self._last_rx + self.params.heartbeat_timeout)
        if self._close_deadline is not None:
            deadline = min(deadline, self._close_deadline)
        return deadline

    def handle_timer(self, now: float) -> None:
        if self.state is State.HANDSHAKE:
            if now >= self._handshake_deadline:
                err = HandshakeTimeout("handshake not completed in time")
                self._finish(Closed(CloseCode.TIMEOUT, str(err), by_peer=False, error=err))
            return
        if self.state is State.CLOSED:
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            self._finish(Closed(self.close_code or 0, self._close_reason, by_peer=False))
            return
        if now - self._last_rx >= self.params.heartbeat_timeout:
            self._finish(Closed(CloseCode.TIMEOUT, "heartbeat timeout", by_peer=False, error=None))
            return
        if now >= self._next_ping:
            self._next_ping = now + self.params.heartbeat_interval
            if self.state is State.ESTABLISHED:
                self.ping(now)

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the stream. Protocol violations end the session (a Closed
        event with the error); they never raise."""
        if self.state is State.CLOSED or not data:
            return
        self._last_rx = now
        self.bytes_received += len(data)
        try:
            if self.state is State.HANDSHAKE:
                self._inbuf += data
                self._receive_handshake(now)
                if self.state is not State.HANDSHAKE and self._inbuf:
                    rest = bytes(self._inbuf)
                    self._inbuf.clear()
                    self._receive_records(memoryview(rest), now)
            elif self._inbuf:
                self._receive_after_partial(memoryview(data), now)
            else:
                self._receive_records(memoryview(data), now)
        except ProtocolError as exc:
            self._fail(exc)

    def _receive_after_partial(self, view: memoryview, now: float) -> None:
        """A record was cut by the previous read: complete just that record from the head of
        ``view`` (one small copy), then parse the rest in place."""
        buf = self._inbuf
        if len(buf) < 2:
            take = 2 - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < 2:
                return
        need = 2 + ((buf[0] << 8) | buf[1]) - len(buf)
        if len(view) < need:
            buf += view
            return
        buf += view[:need]
        record = bytes(buf)
        buf.clear()
        self._receive_records(memoryview(record), now)
        if len(view) > need and self.state is not State.CLOSED:
            self._receive_records(view[need:], now)

    def _fail(self, exc: ProtocolError) -> None:
        if self._send is not None and self.state is State.ESTABLISHED:
            # tell the peer why, best effort, before closing
            self._control = [
                (Kind.CLOSE, bytes([CloseCode.PROTOCOL_ERROR]) + str(exc).encode()[:200])
            ]
            self._active.clear()
            self._pack_records()
        self._finish(Closed(CloseCode.PROTOCOL_ERROR, str(exc), by_peer=False, error=exc))

    def _finish(self, event: Closed) -> None:
        self.state = State.CLOSED
        self.closed_event = event
        self._noise = None
        self._queues.clear()
        self._active.clear()
        self._control.clear()
        self._partials.clear()
        self.queued_bytes = 0
        self.events.append(event)

    def _receive_handshake(self, now: float) -> None:
        buf = self._inbuf
        assert self._noise is not None
        if not self._got_header:
            if len(buf) < HEADER_LEN:
                if MAGIC[: len(buf)] != bytes(buf[:4]):
                    raise ProtocolError("not a crust peer (bad magic)")
                return
            header = bytes(buf[:HEADER_LEN])
            del buf[:HEADER_LEN]
            if header[:4] != MAGIC:
                raise ProtocolError("not a crust peer (bad magic)")
            if header[4] == ECHO_VERSION and not self.initiator:
                self._answer_echo(header)
                return
            if header[4] != VERSION:
                self._emit_raw(bytes([STATUS_VERSION]))
                raise VersionMismatch(
                    f"peer speaks protocol version {header[4]}, we speak {VERSION}"
                )
            if header != self.params.header:
                self._emit_raw(bytes([STATUS_NETWORK_MISMATCH]))
                raise NetworkMismatch("peer belongs to another network")
            self._got_header = True
        if not self._got_status:
            if not buf:
                return
            status = buf[0]
            del buf[:1]
            if status == STATUS_NETWORK_MISMATCH:
                raise NetworkMismatch("peer belongs to another network")
            if status == STATUS_VERSION:
                raise VersionMismatch(f"peer does not speak protocol version {VERSION}")
            if status != STATUS_OK:
                raise ProtocolError(f"unknown handshake status {status}")
            self._got_status = True
        while self.state is State.HANDSHAKE:
            if len(buf) < 2:
                return
            (n,) = U16.unpack_from(buf)
            if n > self._handshake_limit():
                # refused as soon as the length prefix arrives: nothing of that size is
                # buffered (a slow sender cannot make us hold 64 KiB per handshake)
                raise OversizedInput(f"handshake message of {n} bytes announced")
            if len(buf) < 2 + n:
                return
            msg = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self._handshake_message(msg, now)
            self._handshake_read += 1

    def _handshake_limit(self) -> int:
        """The largest handshake message the peer may send next: message 1 is exactly the
        ephemeral key (no payload); messages 2 and 3 carry keys, tags and a hello."""
        if not self.initiator and self._handshake_read == 0:
            return DH_LEN
        return HANDSHAKE_OVERHEAD + MAX_HELLO + TAG_LEN

    def _answer_echo(self, header: bytes) -> None:
        """An address echo request instead of a handshake: answer it and close."""
        if header[5:] != self.params.header[5:]:
            self._emit_raw(bytes([STATUS_NETWORK_MISMATCH]))
            raise NetworkMismatch("peer belongs to another network")
        address = _host_port(self._observed)
        if address is None:
            raise ProtocolError("address echo: no address to report")
        self._inbuf.clear()
        self._emit_raw(encode_echo_reply(address))
        self._finish(Closed(CloseCode.NORMAL, "address echo", by_peer=False))

    def _handshake_message(self, msg: bytes, now: float) -> None:
        noise = self._noise
        assert noise is not None
        payload = noise.read_message(msg)
        if self.initiator:
            # message 2: the responder's hello
            self._accept_hello(payload, noise.remote_static)
            msg3 = noise.write_message(self._hello())
            self._emit_raw(U16.pack(len(msg3)) + msg3)
            self._establish(now)
        elif not noise.remote_static:
            # message 1: reply with message 2
            if payload:
                raise ProtocolError("message 1 carries no payload")
            msg2 = noise.write_message(self._hello())
            self._emit_raw(bytes([STATUS_OK]) + U16.pack(len(msg2)) + msg2)
        else:
            self._accept_hello(payload, noise.remote_static)
            self._establish(now)

    def _hello(self) -> bytes:
        hello: dict[str, Any] = {
            "id": bytes(self.params.identity.peer_id),
            "sig": self.params.static_signature,
        }
        if self._observed:
            hello["observed"] = self._observed
        hello.update(self.params.hello_extra)
        return msgpack.packb(hello, use_bin_type=True)

    def _accept_hello(self, payload: bytes, remote_static: bytes | None) -> None:
        if len(payload) > MAX_HELLO:
            raise OversizedInput("hello too large")
        hello = _unpack_map(payload, "hello")
        raw_id, sig = hello.get("id"), hello.get("sig")
        if not isinstance(raw_id, bytes) or len(raw_id) != 32 or not isinstance(sig, bytes):
            raise PeerAuthenticationError("hello without a valid peer id and signature")
        peer = PeerId(raw_id)
        if remote_static is None or not peer.verify(sig, STATIC_KEY_CONTEXT + remote_static):
            raise PeerAuthenticationError("peer id signature over the Noise key is invalid")
        if self.expected_peer is not None and peer != self.expected_peer:
            raise PeerAuthenticationError(f"peer is {peer}, expected {self.expected_peer}")
        self.peer_id = peer
        self.remote_hello = _sanitize_hello(hello)

    def _establish(self, now: float) -> None:
        noise = self._noise
        assert noise is not None and self.peer_id is not None
        keys = noise.split_keys()
        mine, theirs = keys.initiator_to_responder, keys.responder_to_initiator
        if not self.initiator:
            mine, theirs = theirs, mine
        self._send, self._recv = CipherState(mine), CipherState(theirs)
        self.handshake_hash = keys.handshake_hash
        if self.params.keylog is not None:
            self.params.keylog(keys)
        self._noise = None
        self.state = State.ESTABLISHED
        self._next_ping = now + self.params.heartbeat_interval
        self.events.append(HandshakeCompleted(self.peer_id, self.remote_hello))

    def _receive_records(self, view: memoryview, now: float) -> None:
        recv = self._recv
        assert recv is not None
        plain = self._plain_view
        pos = 0
        end = len(view)
        while end - pos >= 2 and self.state is not State.CLOSED:
            n = (view[pos] << 8) | view[pos + 1]
            if end - pos - 2 < n:
                break
            if n < TAG_LEN:
                raise ProtocolError("record shorter than its tag")
            record = view[pos + 2 : pos + 2 + n]
            pos += 2 + n
            if self._partials and self._decrypt_in_place(record, now):
                continue
            size = recv.decrypt_into(record, plain)
            self._receive_frames(size, now)
        if pos < end and self.state is not State.CLOSED:
            self._inbuf += view[pos:]

    def _decrypt_in_place(self, record: memoryview, now: float) -> bool:
        """A large message arrives as records that each hold one fragment: decrypt such a
        record straight into the message's reassembly buffer (its frame header lands on the
        last bytes already filled, which are put back), saving the copy out of the plaintext
        work space. Any other layout is moved to the work space and parsed as usual. False
        when the record was not touched (not one partial message, or it cannot fit)."""
        if len(self._partials) != 1:
            return False
        ((prio, part),) = self._partials.items()
        filled = part.filled
        start = filled - FRAME_HEADER_LEN
        size = len(record) - TAG_LEN
        buf = part.buf
        if start < 0 or start + size > len(buf):
            return False
        saved = bytes(buf[start:filled])
        out = memoryview(buf)[start : start + size]
        recv = self._recv
        assert recv is not None
        try:
            recv.decrypt_into(record, out)
            kind, fprio, n = FRAME_HEADER.unpack_from(buf, start)
            whole = fprio == prio and _MORE <= kind <= _LAST and n == size - FRAME_HEADER_LEN
            if not whole:
                self._plain_view[:size] = out
        finally:
            buf[start:filled] = saved
            out.release()
        if not whole:
            self._receive_frames(size, now)
            return True
        part.filled = filled + n
        if kind == _LAST:
            self._complete(prio, part)
        return True

    def _receive_frames(self, size: int, now: float) -> None:
        plain = self._plain
        pos = 0
        events = self.events
        peer = self.peer_id
        assert peer is not None
        unpack = FRAME_HEADER.unpack_from
        view = self._plain_view
        max_size = self.params.max_message_size
        while pos < size:
            if size - pos < FRAME_HEADER_LEN:
                raise ProtocolError("truncated frame header")
            kind, prio, n = unpack(plain, pos)
            pos += FRAME_HEADER_LEN
            if n > size - pos:
                raise OversizedInput("frame longer than its record")
            if kind == _MSG:
                if n > max_size:
                    raise OversizedInput("incoming message larger than max_message_size")
                if self.state is not State.CLOSED:  # also while closing: nothing is lost
                    events.append(message_received(peer, view[pos : pos + n].tobytes(), prio))
                    self.messages_received += 1
            elif _FIRST <= kind <= _LAST or kind == _SFIRST:
                self._fragment(kind, prio, pos, n)
            elif kind == _SMSG:
                if n < SIGNED_HEADER_LEN:
                    raise ProtocolError("signed message shorter than its signature")
                if n - SIGNED_HEADER_LEN > self.params.max_message_size:
                    raise OversizedInput("incoming message larger than max_message_size")
                replayed = self._check_sequence(pos)
                if self.state is not State.CLOSED:
                    self._signed_received(bytes(plain[pos : pos + n]), prio, replayed)
            else:
                self._control_frame(kind, bytes(plain[pos : pos + n]), now)
            pos += n

    def _fragment(self, kind: int, prio: int, pos: int, n: int) -> None:
        plain = self._plain
        part = self._partials.get(prio)
        if kind == Kind.FIRST or kind == Kind.SFIRST:
            signed = kind == Kind.SFIRST
            extra = SIGNED_HEADER_LEN if signed else 0
            if part is not None or n < 4 + extra:
                raise ProtocolError("bad first fragment")
            (total,) = U32.unpack_from(plain, pos)
            if total < extra or total - extra > self.params.max_message_size:
                raise OversizedInput("incoming message larger than max_message_size")
            if self._partial_in + total > PREEMPT_LIMIT + self.params.max_message_size + extra:
                raise OversizedInput("too many interleaved partial messages")
            replayed = signed and self._check_sequence(pos + 4)
            part = self._partials[prio] = _Partial(total, signed, replayed)
            self._partial_in += total
            pos += 4
            n -= 4
        elif part is None:
            raise ProtocolError("fragment without a first fragment")
        if part.filled + n > len(part.buf):
            raise ProtocolError("fragments longer than the message")
        part.buf[part.filled : part.filled + n] = self._plain_view[pos : pos + n]
        part.filled += n
        if kind == _LAST:
            self._complete(prio, part)

    def _complete(self, prio: int, part: _Partial) -> None:
        """The LAST fragment of ``part`` arrived: deliver the message."""
        if part.filled != len(part.buf):
            raise ProtocolError("message shorter than announced")
        del self._partials[prio]
        self._partial_in -= len(part.buf)
        if self.state is State.CLOSED:
            return
        if part.signed:
            self._signed_received(bytes(part.buf), prio, part.replayed)
            return
        assert self.peer_id is not None
        self.events.append(message_received(self.peer_id, bytes(part.buf), prio))
        self.messages_received += 1

    def _check_sequence(self, pos: int) -> bool:
        """Read the sequence of a signed message starting at ``pos``; True when it does not
        increase (a replay).  Sequences are checked in the order messages start on the wire,
        which is the order the sender numbered them."""
        (seq,) = U64.unpack_from(self._plain, pos)
        if seq <= self._sign_seen:
            return True
        self._sign_seen = seq
        return False

    def _signed_received(self, body: bytes, prio: int, replayed: bool) -> None:
        peer = self.peer_id
        assert peer is not None
        seq, sig = SIGNED_HEADER.unpack_from(body)
        data = body[SIGNED_HEADER_LEN:]
        if replayed:
            self.signature_failures += 1
            self.events.append(SignatureRejected("replayed", seq))
            return
        proof = SignedMessage(
            sender=peer,
            receiver=self.params.identity.peer_id,
            network=self.params.network_name,
            connection=self.handshake_hash,
            sequence=seq,
            data=data,
            signature=sig,
        )
        if not peer.verify(sig, proof.signing_input()):
            self.signature_failures += 1
            self.events.append(SignatureRejected("forged", seq))
            return
        self.events.append(MessageReceived(peer, data, prio, sig, proof))
        self.messages_received += 1
        self.signed_received += 1

    def _control_frame(self, kind: int, body: bytes, now: float) -> None:
        if kind == Kind.PING:
            if len(body) != 8:
                raise ProtocolError("bad ping")
            if self.state is State.ESTABLISHED:
                self._control.append((Kind.PONG, body))
        elif kind == Kind.PONG:
            if len(body) != 8:
                raise ProtocolError("bad pong")
            (token,) = U64.unpack(body)
            sent = self._ping_sent.pop(token, None)
            if sent is not None:
                self.rtt = now - sent
            self.events.append(PongReceived(token, self.rtt if sent is not None else None))
        elif kind == Kind.CLOSE:
            code = body[0] if body else 0
            reason = body[1:].decode("utf-8", "replace")
            if self.state is State.CLOSING:  # the answer to our own close
                self._finish(Closed(self.close_code or 0, self._close_reason, by_peer=False))
                return
            # answer so the peer can close cleanly too: our queued messages first, then CLOSE
            # (a clean close loses nothing in either direction)
            self._control = [(Kind.CLOSE, bytes([CloseCode.NORMAL]))]
            self._pack_records()
            self._finish(Closed(code, reason, by_peer=True))
        elif kind == Kind.SELECT:
            if self.state is State.ESTABLISHED:
                self.events.append(Selected())
        elif kind == Kind.ACCEPT:
            if self.state is State.ESTABLISHED:
                self.events.append(Accepted())
        elif kind == Kind.CONTROL:
            if self.state is State.ESTABLISHED:
                self.events.append(ControlReceived(_unpack_map(body, "control")))
        else:
            raise ProtocolError(f"unknown frame kind {kind}")

    # ------------------------------------------------------------------ sending

    def _emit_raw(self, data: bytes) -> None:
        self._out.append(data)
        self.bytes_sent += len(data)

    def _make_room(self, priority: int) -> None:
        """Drop the oldest unstarted messages of the least urgent priorities >= ``priority``."""
        limit = self.params.send_queue_size
        for prio in reversed(self._active[:]):
            if prio < max(2, priority):
                break
            q = self._queues[prio]
            while q and self.queued_bytes >= limit:
                victim_index = 0 if q[0].offset == 0 else 1
                if victim_index >= len(q):
                    break
                victim = q[victim_index]
                del q[victim_index]
                self.queued_bytes -= len(victim.data)
                self.dropped[prio] = self.dropped.get(prio, 0) + 1
            if not q:
                self._active.remove(prio)
            if self.queued_bytes < limit:
                return

    def _pack_records(self, limit: int = 1 << 62) -> None:
        send = self._send
        assert send is not None
        plain = self._plain
        pack = FRAME_HEADER.pack_into
        produced = 0
        while (self._control or self._active) and produced < limit:
            pos = 0
            # control frames first: they are small and urgent
            while self._control:
                kind, body = self._control[0]
                if kind == Kind.CLOSE and self._active:
                    break  # a clean close goes after the queued messages
                need = FRAME_HEADER_LEN + len(body)
                if need > MAX_PLAINTEXT - pos:
                    break
                pack(plain, pos, kind, 0, len(body))
                plain[pos + FRAME_HEADER_LEN : pos + need] = body
                pos += need
                del self._control[0]
                if kind == Kind.CLOSE:
                    self._active.clear()
            active = self._active
            queues = self._queues
            while active and MAX_PLAINTEXT - pos > FRAME_HEADER_LEN + 4:
                if self._partial_out < PREEMPT_LIMIT:
                    q = queues[active[0]]
                    msg = q[0]
                else:
                    msg = self._pick()
                    q = queues[msg.priority]
                if msg.signed and not msg.sealed:
                    self._seal(msg)
                data = msg.data
                remaining = len(data) - msg.offset
                room = MAX_PLAINTEXT - pos - FRAME_HEADER_LEN
                if msg.offset == 0 and remaining <= room:
                    pack(plain, pos, _SMSG if msg.signed else _MSG, msg.priority, remaining)
                    pos += FRAME_HEADER_LEN
                    plain[pos : pos + remaining] = data
                    pos += remaining
                    # the message is done (what _pop does, inline: this loop is per message)
                    q.popleft()
                    self.queued_bytes -= remaining
                    self.messages_sent += 1
                    if not q:
                        active.remove(msg.priority)
                    continue
                if msg.offset == 0:
                    if remaining <= SMALL_MESSAGE and pos > 0:
                        break  # keep small messages whole: next record
                    chunk = room - 4
                    if msg.signed and chunk < SIGNED_HEADER_LEN:
                        break  # the signature header goes whole in the first fragment
                    pack(
                        plain,
                        pos,
                        Kind.SFIRST if msg.signed else Kind.FIRST,
                        msg.priority,
                        chunk + 4,
                    )
                    U32.pack_into(plain, pos + FRAME_HEADER_LEN, len(data))
                    pos += FRAME_HEADER_LEN + 4
                    plain[pos : pos + chunk] = memoryview(data)[:chunk]
                    pos += chunk
                    msg.offset = chunk
                    self._partial_out += len(data)
                    continue
                chunk = min(remaining, room)
                last = chunk == remaining
                pack(plain, pos, Kind.LAST if last else Kind.MORE, msg.priority, chunk)
                pos += FRAME_HEADER_LEN
                plain[pos : pos + chunk] = memoryview(data)[msg.offset : msg.offset + chunk]
                pos += chunk
                if last:
                    self._partial_out -= len(data)
                    self._pop(msg)
                else:
                    msg.offset += chunk
            if pos == 0:
                break
            record = bytearray(2 + pos + TAG_LEN)
            U16.pack_into(record, 0, pos + TAG_LEN)
            send.encrypt_into(self._plain_view[:pos], memoryview(record)[2:])
            self._out.append(record)
            self.bytes_sent += len(record)
            produced += len(record)

    def _seal(self, msg: _OutMessage) -> None:
        """Number and sign a signed message as it starts to go out."""
        peer = self.peer_id
        assert peer is not None
        self._sign_seq += 1
        seq = self._sign_seq
        me = self.params.identity
        sig = me.sign(
            signing_input(
                me.peer_id, peer, self.handshake_hash, seq, self.params.network_name, msg.data
            )
        )
        header = SIGNED_HEADER.pack(seq, sig)
        msg.data = header + msg.data
        msg.sealed = True
        self.queued_bytes += SIGNED_HEADER_LEN
        self.signed_sent += 1

    def _pick(self) -> _OutMessage:
        """The next message to (continue to) send: the most urgent one, unless starting it
        would leave too many bytes of partially sent messages open (``_partial_out`` counts
        the full length of every started, unfinished message, as the receiver does)."""
        msg = self._queues[self._active[0]][0]
        if msg.offset == 0 and self._partial_out >= PREEMPT_LIMIT:
            for prio in self._active:
                head = self._queues[prio][0]
                if head.offset:
                    return head
        return msg

    def _pop(self, msg: _OutMessage) -> None:
        q = self._queues[msg.priority]
        q.popleft()
        self.queued_bytes -= len(msg.data)
        self.messages_sent += 1
        if not q:
            self._active.remove(msg.priority)


def _unpack_map(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for malformed input
        raise ProtocolError(f"malformed {what}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}: not a map")
    return obj


def _sanitize_hello(hello: dict[str, Any]) -> dict[str, Any]:
    """Keep only well-typed, bounded fields of a remote hello."""
    out: dict[str, Any] = {}
    contacts = hello.get("contacts")
    if isinstance(contacts, list):
        out["contacts"] = [c for c in contacts[:MAX_HELLO_CONTACTS] if isinstance(c, str)]
    observed = hello.get("observed")
    if isinstance(observed, str) and len(observed) < 300:
        out["observed"] = observed
    role = hello.get("role")
    if role in ("node", "client"):
        out["role"] = role
    return out


def _host_port(contact: str | None) -> tuple[str, int] | None:
    """``(ip, port)`` of a ``scheme://ip:port`` string (IPv6 in brackets), else None."""
    if not contact or "://" not in contact:
        return None
    rest = contact.split("://", 1)[1].split("#", 1)[0]
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        ip, number = str(ipaddress.ip_address(host)), int(port)
    except ValueError:
        return None
    return (ip, number) if 0 < number < 65536 else None
