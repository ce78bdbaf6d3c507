"""One UDP socket shared by every QUIC connection of a listener (and its outbound dials).

The mux reads datagrams in batches (``loop.add_reader`` + ``recvfrom_into`` into one
preallocated buffer, or on Linux ``recvmsg_into`` with UDP GRO, several datagrams per call)
and routes each one by its QUIC destination connection id:

* long header  -> DCID length byte + DCID;
* short header -> the fixed-length DCID we chose for ourselves (:data:`CID_LENGTH`);
* an Initial for an unknown DCID -> a new *server* connection, after stateless Retry
  (address validation: a spoofed source never gets connection state);
* first byte without the QUIC "fixed bit" (0x40) -> the handlers added with
  :meth:`UdpMux.add_datagram_handler` (STUN, hole punching), in order, until one claims it;
  then :attr:`UdpMux.on_other_datagram`;
* anything else is dropped and counted in :attr:`UdpMux.stats`. Nothing a remote sends can
  raise out of the read callback.

With :attr:`UdpMux.junk_limit` set, every datagram from an address that reaches no
connection and is refused (garbage, unknown connection id, forged Retry token, an Initial
without token that costs a Retry, a non-QUIC datagram nobody claims) spends one token of
that address's budget; an address out of tokens has its unrouted datagrams dropped before
any parsing (``dropped_abuse``) until the budget refills, and :attr:`UdpMux.on_abuse` hears
of it. Datagrams of established connections are never charged nor blocked, so a sender
spoofing someone's address cannot cut that peer's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from aioquic._buffer import Buffer
from aioquic.quic.packet import (
    QuicPacketType,
    QuicProtocolVersion,
    encode_quic_retry,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

log = logging.getLogger("crust.quic")

Address = tuple[str, int]
CID_LENGTH = 8
"""Length of every connection id *we* issue (``QuicConfiguration(connection_id_length=8)``)."""
MAX_CID_LENGTH = 20
RECV_BUFFER = 65_536
MAX_BATCH = 64
"""Datagrams read per reader callback before yielding to the loop."""
SOCKET_BUFFER = 4 * 1024 * 1024
"""Requested SO_RCVBUF / SO_SNDBUF.  The kernel's default (about 208 KiB on Linux) holds
only a few dozen full datagrams: a burst larger than that is dropped by the kernel and
QUIC's congestion control halves its window.  Linux caps the request at
``net.core.rmem_max`` / ``wmem_max`` (see docs/design.md, QUIC)."""
MIN_INITIAL_SIZE = 1200
"""RFC 9000 §14.1: a client Initial is padded to 1200 bytes; smaller ones are not served."""
SUPPORTED_VERSIONS = (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)

UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
"""Linux ``setsockopt``/cmsg level SOL_UDP: send one buffer as several datagrams (GSO)."""
MAX_GSO_SEGMENTS = 64
MAX_UDP_PAYLOAD = 65_507
"""The segments of one GSO send share one UDP length field (IPv4 bound, IPv6 allows 20
bytes more)."""
UDP_GRO = getattr(socket, "UDP_GRO", 104)
"""Linux SOL_UDP option: the kernel may hand several datagrams of one sender, all of one
size but the last, to one receive call, with their size in a control message (GRO)."""
_GSO_OFF_ERRNOS = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(_INT.size) if hasattr(socket, "CMSG_SPACE") else 0

STAT_NAMES = (
    "datagrams_received",
    "datagrams_sent",
    "gso_sends",
    "send_dropped",
    "dropped_garbage",
    "dropped_unknown_cid",
    "dropped_limit",
    "dropped_paused",
    "other_datagrams",
    "retries_sent",
    "invalid_tokens",
    "connections_accepted",
    "dropped_abuse",
)
DROPPED_STATS = tuple(name for name in STAT_NAMES if name.startswith("dropped_"))
"""The ``stats`` counting datagrams dropped unread."""
MAX_JUNK_SOURCES = 4096
"""Source addresses whose junk budget is tracked (the least recently charged forgotten)."""


class MuxClient(Protocol):
    """A QUIC connection as the mux sees it (implemented by :class:`crust.aio.quic.QuicLink`)."""

    @property
    def handshake_done(self) -> bool: ...

    @property
    def accepting_datagrams(self) -> bool:
        """False while the reader is paused and enough is buffered: drop (QUIC resends)."""
        ...

    def datagram_received(self, data: bytes, addr: Address, now: float) -> None: ...

    def after_batch(self) -> None:
        """Process the events of the datagrams just fed and transmit."""
        ...

    def abort(self) -> None: ...

    def detach(self) -> None:
        """The mux is closing: stop timers, report the connection lost."""
        ...


class Acceptor(Protocol):
    """Creates a server connection for a validated new Initial (or None to refuse)."""

    def __call__(
        self,
        mux: UdpMux,
        addr: Address,
        original_dcid: bytes,
        retry_scid: bytes | None,
    ) -> MuxClient | None: ...


def parse_dcid(data: bytes | memoryview) -> bytes | None:
    """The destination connection id of a QUIC packet, or None if it cannot be one."""
    n = len(data)
    if n < 1:
        return None
    first = data[0]
    if first & 0x80:  # long header: flags, version(4), dcid len, dcid, scid len, scid
        if n < 7:
            return None
        dlen = data[5]
        if dlen > MAX_CID_LENGTH or n < 6 + dlen + 1:
            return None
        return bytes(data[6 : 6 + dlen])
    if not first & 0x40 or n < 1 + CID_LENGTH:
        return None
    return bytes(data[1 : 1 + CID_LENGTH])


def enlarge_buffers(sock: socket.socket, size: int) -> tuple[int, int]:
    """Ask for ``size``-byte receive and send buffers (never shrinking them); returns the
    sizes granted.  A refusal is not an error: the defaults still work, only slower."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            if sock.getsockopt(socket.SOL_SOCKET, opt) < size:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )


def is_quic(first_byte: int) -> bool:
    """QUIC packets (other than version negotiation) have the fixed bit set."""
    return bool(first_byte & 0x40) or bool(first_byte & 0x80)


class DatagramReceiver:
    """Reads datagrams from one non-blocking UDP socket in batches, into one preallocated
    buffer.  With UDP GRO (Linux) one system call may bring many datagrams of one sender,
    which are cut apart again here; elsewhere (or if the kernel refuses the option) it is
    one ``recvfrom_into`` per datagram.  Counts ``datagrams_received`` into ``stats``."""

    def __init__(self, sock: socket.socket, stats: dict[str, int]) -> None:
        self.sock = sock
        self.stats = stats
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)
        self.gro = False
        if sys.platform == "linux" and _GRO_CMSG_SPACE and hasattr(sock, "recvmsg_into"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.gro = True

    def receive(self, limit: int) -> list[tuple[bytes, Address]]:
        """Up to about ``limit`` datagrams that are waiting (``limit`` system calls at most,
        never blocks)."""
        out: list[tuple[bytes, Address]] = []
        sock, view = self.sock, self._view
        for _ in range(limit):
            segment = 0
            try:
                if self.gro:
                    n, ancillary, _flags, raw = sock.recvmsg_into([self._buf], _GRO_CMSG_SPACE)
                    for level, kind, data in ancillary:
                        if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                            segment = _INT.unpack_from(data)[0]
                else:
                    n, raw = sock.recvfrom_into(self._buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP port unreachable reported on the socket
                log.debug("recvfrom: %s", exc)
                continue
            addr = (str(raw[0]), int(raw[1]))
            if 0 < segment < n:
                for start in range(0, n, segment):
                    out.append((view[start : min(start + segment, n)].tobytes(), addr))
            else:
                out.append((view[:n].tobytes(), addr))
            if len(out) >= limit:
                break
        self.stats["datagrams_received"] += len(out)
        return out


class DatagramSender:
    """Sends datagrams from one non-blocking UDP socket, counting into ``stats``
    (``datagrams_sent``, ``gso_sends``, ``send_dropped``).  A datagram that cannot be sent
    at once is dropped: QUIC's loss recovery sends its content again."""

    def __init__(self, sock: socket.socket, stats: dict[str, int]) -> None:
        self.sock = sock
        self.stats = stats
        self.gso = sys.platform == "linux" and hasattr(sock, "sendmsg")
        """Send runs of equal-size datagrams to one address with one ``sendmsg`` (UDP GSO);
        turned off for good when the kernel refuses it."""

    def sendto(self, data: bytes, addr: Address) -> None:
        try:
            self.sock.sendto(data, addr)
            self.stats["datagrams_sent"] += 1
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += 1
        except OSError as exc:
            self.stats["send_dropped"] += 1
            log.debug("sendto %s failed: %s", addr, exc)

    def send(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Send datagrams in order.  With GSO, each run of datagrams to one address whose
        sizes are equal (the last of a run may be shorter) leaves in one system call; the
        kernel (or the network card) cuts it into the same datagrams."""
        if not self.gso or len(datagrams) < 2:
            for data, addr in datagrams:
                self.sendto(data, addr)
            return
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            limit = min(MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD // size)
            j = i + 1
            while j < n and j - i < limit:
                d, a = datagrams[j]
                if a != addr or len(d) > size:
                    break
                j += 1
                if len(d) < size:  # a shorter one can only end the run
                    break
            if j - i == 1:
                self.sendto(data, addr)
            else:
                self._send_segments([d for d, _ in datagrams[i:j]], size, addr)
            i = j

    def _send_segments(self, segments: list[bytes], size: int, addr: Address) -> None:
        try:
            self.sock.sendmsg(
                [b"".join(segments)], [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr
            )
            self.stats["datagrams_sent"] += len(segments)
            self.stats["gso_sends"] += 1
        except (BlockingIOError, InterruptedError):
            self.stats["send_dropped"] += len(segments)
        except OSError as exc:
            if exc.errno in _GSO_OFF_ERRNOS:
                log.debug("UDP GSO refused (%s): sending datagrams one by one", exc)
                self.gso = False
                for data in segments:
                    self.sendto(data, addr)
            else:
                self.stats["send_dropped"] += len(segments)
                log.debug("sendmsg %s failed: %s", addr, exc)


class UdpMux:
    """A non-blocking UDP socket carrying many QUIC connections (both directions).

    ``acceptor`` is None for a client-only mux (no inbound connections).
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        acceptor: Acceptor | None,
        max_connections: int = 1024,
        max_pending_handshakes: int = 256,
        retry: bool = True,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buffer_sizes = enlarge_buffers(sock, SOCKET_BUFFER)
        """(receive, send) socket buffer sizes the kernel granted."""
        self.family = sock.family
        self.local_address: Address = sock.getsockname()[:2]
        self.acceptor = acceptor
        self.max_connections = max_connections
        self.max_pending_handshakes = max_pending_handshakes
        self.retry = retry
        self.on_other_datagram: Callable[[bytes, Address], bool | None] | None = None
        """Non-QUIC datagrams no handler claimed; returning False refuses one (charged to
        the sender's junk budget)."""
        self.junk_limit: tuple[float, float] | None = None
        """(rate per second, burst) of refused unrouted datagrams per source IP; None: no
        limit."""
        self.on_abuse: Callable[[Address, str], None] | None = None
        """Called with (address, ``"garbage"`` or ``"flood"``) when an address runs out of
        junk budget."""
        self._junk: OrderedDict[str, list[float]] = OrderedDict()
        self._datagram_handlers: list[Callable[[bytes, Address], bool]] = []
        self.stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        self.sender = DatagramSender(sock, self.stats)
        self._routes: dict[bytes, MuxClient] = {}
        self._clients: dict[MuxClient, set[bytes]] = {}
        self._retry_tokens = QuicRetryTokenHandler()
        self.receiver = DatagramReceiver(sock, self.stats)
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        *,
        acceptor: Acceptor | None,
        max_connections: int = 1024,
        max_pending_handshakes: int = 256,
        retry: bool = True,
    ) -> UdpMux:
        """A mux on a fresh socket bound to ``host:port`` (port 0 = ephemeral)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            return cls(
                sock,
                acceptor=acceptor,
                max_connections=max_connections,
                max_pending_handshakes=max_pending_handshakes,
                retry=retry,
            )
        except BaseException:
            sock.close()
            raise

    # ------------------------------------------------------------ routing table

    def register(self, cid: bytes, client: MuxClient) -> None:
        self._routes[cid] = client
        self._clients.setdefault(client, set()).add(cid)

    def unregister(self, cid: bytes, client: MuxClient) -> None:
        if self._routes.get(cid) is client:
            del self._routes[cid]
        cids = self._clients.get(client)
        if cids is not None:
            cids.discard(cid)

    def add_client(self, client: MuxClient) -> None:
        self._clients.setdefault(client, set())

    def remove_client(self, client: MuxClient) -> None:
        for cid in self._clients.pop(client, set()):
            if self._routes.get(cid) is client:
                del self._routes[cid]

    def client_for(self, cid: bytes) -> MuxClient | None:
        return self._routes.get(cid)

    @property
    def connection_count(self) -> int:
        return len(self._clients)

    def can_dial(self) -> bool:
        return not self._closed and len(self._clients) < self.max_connections

    @property
    def closed(self) -> bool:
        return self._closed

    def add_datagram_handler(self, handler: Callable[[bytes, Address], bool]) -> None:
        """Offer every non-QUIC datagram to ``handler`` first; it returns True to claim it."""
        self._datagram_handlers.append(handler)

    def remove_datagram_handler(self, handler: Callable[[bytes, Address], bool]) -> None:
        with contextlib.suppress(ValueError):
            self._datagram_handlers.remove(handler)

    # ------------------------------------------------------------ I/O

    def sendto(self, data: bytes, addr: Address) -> None:
        if not self._closed:
            self.sender.sendto(data, addr)

    def send_datagrams(self, datagrams: list[tuple[bytes, Address]]) -> None:
        """Send datagrams in order (see :meth:`DatagramSender.send`)."""
        if not self._closed:
            self.sender.send(datagrams)

    def _on_readable(self) -> None:
        touched: dict[MuxClient, None] = {}
        now = self._loop.time()
        for data, addr in self.receiver.receive(MAX_BATCH):
            try:
                client = self._route(data, addr, now)
            except Exception:  # never let a datagram break the reader
                self.stats["dropped_garbage"] += 1
                log.exception("datagram from %s could not be routed", addr)
                continue
            if client is not None:
                touched[client] = None
            if self._closed:
                return
        for client in touched:
            try:
                client.after_batch()
            except Exception:
                log.exception("QUIC connection failed to process input")
                client.abort()

    def _route(self, view: bytes | memoryview, addr: Address, now: float) -> MuxClient | None:
        """Hand one datagram to its connection; returns the connection fed (if any)."""
        first = view[0] if view else 0
        quic = is_quic(first)
        dcid = parse_dcid(view) if quic else None
        client = self._routes.get(dcid) if dcid is not None else None
        if client is not None:
            if not client.accepting_datagrams:
                self.stats["dropped_paused"] += 1
                return None
            client.datagram_received(bytes(view), addr, now)
            return client
        if self.junk_limit is not None and self._over_budget(addr[0], now):
            self.stats["dropped_abuse"] += 1
            return None
        if not view or (quic and dcid is None):
            self.stats["dropped_garbage"] += 1
            self._charge(addr, now, "garbage")
            return None
        if not quic:
            self.stats["other_datagrams"] += 1
            data = bytes(view)
            for handler in self._datagram_handlers:
                if handler(data, addr):
                    return None
            hook = self.on_other_datagram
            if hook is None or hook(data, addr) is False:
                self._charge(addr, now, "garbage")
            return None
        if first & 0x80:
            return self._new_initial(bytes(view), addr, now)
        self.stats["dropped_unknown_cid"] += 1
        self._charge(addr, now, "garbage")
        return None

    def _over_budget(self, host: str, now: float) -> bool:
        entry = self._junk.get(host)
        if entry is None or self.junk_limit is None:
            return False
        rate, burst = self.junk_limit
        return min(burst, entry[0] + (now - entry[1]) * rate) < 1.0

    def _charge(self, addr: Address, now: float, kind: str) -> None:
        """One refused datagram from ``addr``: spend a token of its junk budget."""
        if self.junk_limit is None:
            return
        rate, burst = self.junk_limit
        host = addr[0]
        entry = self._junk.get(host)
        if entry is None:
            if len(self._junk) >= MAX_JUNK_SOURCES:
                self._junk.popitem(last=False)
            entry = self._junk[host] = [burst, now]
        else:
            self._junk.move_to_end(host)
        tokens = min(burst, entry[0] + (now - entry[1]) * rate) - 1.0
        entry[0], entry[1] = tokens, now
        if tokens < 1.0 and self.on_abuse is not None:
            self.on_abuse(addr, kind)

    def _new_initial(self, data: bytes, addr: Address, now: float) -> MuxClient | None:
        """A long-header packet for an unknown connection id: maybe a new client."""
        if self.acceptor is None:
            self.stats["dropped_unknown_cid"] += 1
            self._charge(addr, now, "garbage")
            return None
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except ValueError:
            self.stats["dropped_garbage"] += 1
            self._charge(addr, now, "garbage")
            return None
        if (
            header.packet_type != QuicPacketType.INITIAL
            or header.version not in SUPPORTED_VERSIONS
            or len(data) < MIN_INITIAL_SIZE
        ):
            self.stats["dropped_unknown_cid"] += 1
            self._charge(addr, now, "garbage")
            return None
        pending = sum(1 for c in self._clients if not c.handshake_done)
        if len(self._clients) >= self.max_connections or pending >= self.max_pending_handshakes:
            self.stats["dropped_limit"] += 1
            return None
        version = int(header.version)
        retry_scid: bytes | None = None
        if self.retry:
            if not header.token:
                scid = os.urandom(CID_LENGTH)
                token = self._retry_tokens.create_token(
                    address=addr,
                    original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=scid,
                    now=now,
                )
                packet = encode_quic_retry(
                    version=version,
                    source_cid=scid,
                    destination_cid=header.source_cid,
                    original_destination_cid=header.destination_cid,
                    retry_token=token,
                )
                self.stats["retries_sent"] += 1
                self.sendto(packet, addr)
                self._charge(addr, now, "flood")  # a Retry costs us: a flood of them is capped
                return None
            try:
                original = self._retry_tokens.validate_token(
                    address=addr,
                    destination_cid=header.destination_cid,
                    token=header.token,
                    now=now,
                )
            except ValueError:
                # forged, expired or from another address: no state, no answer
                self.stats["invalid_tokens"] += 1
                self._charge(addr, now, "garbage")
                return None
            retry_scid = header.destination_cid
        else:
            original = header.destination_cid
        client = self.acceptor(self, addr, original, retry_scid)
        if client is None:
            self.stats["dropped_limit"] += 1
            return None
        self.stats["connections_accepted"] += 1
        self.register(header.destination_cid, client)
        if client.accepting_datagrams:
            client.datagram_received(data, addr, now)
        return client

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Abort every connection (each sends its CONNECTION_CLOSE) and close the socket."""
        if self._closed:
            return
        for client in list(self._clients):
            with contextlib.suppress(Exception):
                client.abort()
            with contextlib.suppress(Exception):
                client.detach()
        self._closed = True
        self._loop.remove_reader(self.sock.fileno())
        self._routes.clear()
        self._clients.clear()
        self.sock.close()
