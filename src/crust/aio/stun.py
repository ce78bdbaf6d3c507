"""asyncio side of STUN: a per-socket dispatcher, the Binding client, a server, the NAT prober.

* :class:`StunDispatcher` owns the STUN traffic of **one UDP socket**: it runs client
  transactions (one ``loop.call_at`` timer for all of them), feeds Binding requests to an
  optional :class:`~crust.proto.stun.StunResponder`, and watches for our own requests coming
  back (hairpinning).  It works on its own socket (:meth:`StunDispatcher.open`), on a socket
  nobody else reads (:meth:`StunDispatcher.for_socket`), on crust's QUIC socket
  (:meth:`StunDispatcher.for_mux`: one dispatcher per :class:`~crust.aio.udp_mux.UdpMux`,
  registered as one of its datagram handlers, so hole punching can register its own), or on
  anything that can send a datagram (``StunDispatcher(send)`` + :meth:`datagram_received`).
* :func:`stun_binding` -- one Binding request, on any of those.
* :class:`StunServer` -- a standalone STUN server; with an alternate address it listens on
  four sockets and answers RFC 5780 CHANGE-REQUESTs.
* :class:`NatProber` -- runs the RFC 5780 tests against one server (and/or plain observers)
  and classifies the NAT (:func:`crust.proto.natclass.classify`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Self

from crust.aio.udp_mux import UdpMux
from crust.errors import ConfigError, LimitExceeded, ProtocolError, ServiceClosed
from crust.proto import stun as proto
from crust.proto.natclass import (
    FilteringProbe,
    MappingObservation,
    NatClassification,
    NatObservations,
    ProbeSource,
    classify,
)
from crust.proto.stun import (
    Address,
    BindingResult,
    BindingTransaction,
    ChangeRequest,
    ResponderAddresses,
    StunClass,
    StunErrorResponse,
    StunResponder,
    StunTimeout,
)

log = logging.getLogger("crust.stun")

SendFn = Callable[[bytes, Address], None]
RECV_SIZE = 2048
MAX_BATCH = 64
MAX_TRANSACTIONS = 64
"""Client transactions in flight per dispatcher."""
DISPATCHER_STATS = (
    "stun_received",
    "responses_matched",
    "requests_answered",
    "hairpin_seen",
    "unmatched",
    "malformed",
    "not_stun",
    "send_errors",
)

_by_mux: weakref.WeakKeyDictionary[UdpMux, StunDispatcher] = weakref.WeakKeyDictionary()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return True


async def resolve(server: tuple[str, int], family: int = socket.AF_UNSPEC) -> Address:
    """``(host, port)`` with a host name resolved (first result of the socket's family)."""
    host, port = server
    if not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ConfigError(f"bad port {port!r}", field="server")
    if _is_ip(host):
        return host, port
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError(f"cannot resolve {host!r}: {exc}", field="server") from exc
    if not infos:
        raise ConfigError(f"{host!r} has no address", field="server")
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


def local_ip_towards(target: Address) -> str | None:
    """The source IP the kernel would use to reach ``target`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(target)
            return str(s.getsockname()[0])
    except OSError:
        return None


class _ClosedOnExit:
    """``async with x:`` closes ``x`` (synchronously) on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class StunDispatcher(_ClosedOnExit):
    """The STUN traffic of one UDP socket (see the module docstring)."""

    def __init__(
        self,
        send: SendFn,
        *,
        local_address: Address | None = None,
        responder: StunResponder | None = None,
        max_transactions: int = MAX_TRANSACTIONS,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._send = send
        self.local_address = local_address
        self.responder = responder
        """Answers Binding requests arriving on this socket (None: they are ignored)."""
        self.max_transactions = max_transactions
        self._random = random_bytes
        self._loop = asyncio.get_running_loop()
        self._transactions: dict[
            bytes, tuple[BindingTransaction, asyncio.Future[BindingResult]]
        ] = {}
        self._watches: dict[bytes, asyncio.Future[Address]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._detach: Callable[[], None] | None = None
        self._closed = False
        self.stats: dict[str, int] = dict.fromkeys(DISPATCHER_STATS, 0)

    # ------------------------------------------------------------ construction

    @classmethod
    def for_mux(cls, mux: UdpMux) -> StunDispatcher:
        """The dispatcher of crust's QUIC socket ``mux`` (created on first use)."""
        if mux.closed:
            raise ServiceClosed("the UDP socket is closed")
        existing = _by_mux.get(mux)
        if existing is not None and not existing.closed:
            return existing
        # The dispatcher refers to the mux only weakly: the mux (through its handler list)
        # keeps the dispatcher alive, never the other way round.
        ref = weakref.ref(mux)

        def send(data: bytes, addr: Address) -> None:
            m = ref()
            if m is not None:
                m.sendto(data, addr)

        d = cls(send, local_address=mux.local_address)
        mux.add_datagram_handler(d.datagram_received)

        def detach() -> None:
            m = ref()
            if m is not None:
                m.remove_datagram_handler(d.datagram_received)

        d._detach = detach
        _by_mux[mux] = d
        return d

    @classmethod
    def for_socket(cls, sock: socket.socket, *, own: bool = False) -> StunDispatcher:
        """Read and write ``sock`` (a UDP socket nothing else reads); ``own``: close it too."""
        sock.setblocking(False)

        def send(data: bytes, addr: Address) -> None:
            sock.sendto(data, addr)

        d = cls(send, local_address=_sockname(sock))
        loop = d._loop
        fd = sock.fileno()

        def readable() -> None:
            for _ in range(MAX_BATCH):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # ICMP errors reported on the socket
                    log.debug("stun socket: %s", exc)
                    continue
                try:
                    if not d.datagram_received(data, (str(addr[0]), int(addr[1]))):
                        d.stats["not_stun"] += 1
                except Exception:  # a datagram must never break the reader
                    log.exception("STUN datagram from %s could not be handled", addr)

        loop.add_reader(fd, readable)

        def detach() -> None:
            loop.remove_reader(fd)
            if own:
                sock.close()

        d._detach = detach
        return d

    @classmethod
    def open(cls, host: str = "0.0.0.0", port: int = 0) -> StunDispatcher:
        """A dispatcher on a fresh UDP socket bound to ``host:port`` (closed with it)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
            return cls.for_socket(sock, own=True)
        except BaseException:
            sock.close()
            raise

    # ------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, fut in self._transactions.values():
            if not fut.done():
                fut.set_exception(ServiceClosed("STUN dispatcher closed"))
        for watch in self._watches.values():
            watch.cancel()
        self._transactions.clear()
        self._watches.clear()
        if self._detach is not None:
            self._detach()
            self._detach = None

    async def aclose(self) -> None:
        self.close()

    # ------------------------------------------------------------ input

    def datagram_received(self, data: bytes, addr: Address) -> bool:
        """Handle one datagram; False if it is not STUN (someone else's)."""
        if self._closed or not proto.is_stun(data):
            return False
        self.stats["stun_received"] += 1
        try:
            msg = proto.parse(data)
        except ProtocolError:
            self.stats["malformed"] += 1
            return True
        now = self._loop.time()
        txid = msg.transaction_id
        if msg.cls == StunClass.REQUEST:
            watch = self._watches.get(txid)
            if watch is not None:
                self.stats["hairpin_seen"] += 1
                if not watch.done():
                    watch.set_result(addr)
                return True
            if self.responder is not None:
                reply = self.responder.handle(data, addr, self.local_address, now)
                if reply is not None:
                    self.stats["requests_answered"] += 1
                    self._sendto(reply.data, reply.destination)
            return True
        entry = self._transactions.get(txid)
        if entry is not None and entry[0].receive(msg, addr, now):
            self.stats["responses_matched"] += 1
            self._service()
        else:
            self.stats["unmatched"] += 1
        return True

    def _sendto(self, data: bytes, addr: Address) -> None:
        try:
            self._send(data, addr)
        except OSError as exc:  # the transaction retransmits; a hairpin probe resends
            self.stats["send_errors"] += 1
            log.debug("STUN send to %s failed: %s", addr, exc)

    # ------------------------------------------------------------ transactions

    def _service(self) -> None:
        """Send what is due, finish what is done, re-arm the one timer."""
        if self._closed:
            return
        now = self._loop.time()
        earliest: float | None = None
        for txid, (tx, fut) in list(self._transactions.items()):
            tx.handle_timer(now)
            for data, addr in tx.datagrams_to_send(now):
                self._sendto(data, addr)
            event = tx.next_event()
            if event is not None:
                del self._transactions[txid]
                if not fut.done():
                    if event.result is not None:
                        fut.set_result(event.result)
                    elif event.error is not None:
                        fut.set_exception(event.error)
                continue
            at = tx.get_timer()
            if at is not None and (earliest is None or at < earliest):
                earliest = at
        if earliest != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_at = earliest
            if earliest is not None:
                self._timer = self._loop.call_at(earliest, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._service()

    def new_transaction_id(self) -> bytes:
        return self._random(proto.TRANSACTION_ID_SIZE)

    async def binding(
        self,
        server: tuple[str, int],
        *,
        timeout: float = 5.0,
        rto: float = proto.DEFAULT_RTO,
        rc: int = proto.DEFAULT_RC,
        rm: int = proto.DEFAULT_RM,
        change_request: ChangeRequest | None = None,
        response_port: int | None = None,
        padding: int | None = None,
        software: str | None = None,
    ) -> BindingResult:
        """One Binding transaction to ``server``.

        Raises :class:`~crust.proto.stun.StunTimeout` (after ``timeout`` or when the RFC 8489
        retransmissions are exhausted), :class:`~crust.proto.stun.StunErrorResponse`,
        :class:`~crust.errors.ProtocolError` for a bad response, ``ServiceClosed``.
        """
        if self._closed:
            raise ServiceClosed("STUN dispatcher closed")
        if len(self._transactions) >= self.max_transactions:
            raise LimitExceeded(f"more than {self.max_transactions} STUN transactions in flight")
        family = socket.AF_UNSPEC
        if self.local_address is not None:
            family = socket.AF_INET6 if ":" in self.local_address[0] else socket.AF_INET
        target = await resolve(server, family)
        txid = self.new_transaction_id()
        tx = BindingTransaction(
            txid,
            target,
            self._loop.time(),
            rto=rto,
            rc=rc,
            rm=rm,
            change_request=change_request,
            response_port=response_port,
            padding=padding,
            software=software,
        )
        fut: asyncio.Future[BindingResult] = self._loop.create_future()
        self._transactions[txid] = (tx, fut)
        self._service()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except StunTimeout:
            raise
        except TimeoutError:
            raise StunTimeout(
                f"no STUN response from {target[0]}:{target[1]} within {timeout:g} s "
                f"({tx.transmissions} transmissions)"
            ) from None
        finally:
            if self._transactions.pop(txid, None) is not None:
                self._service()

    async def hairpin(
        self, target: Address, *, timeout: float = 1.0, interval: float = 0.2
    ) -> bool:
        """Send a Binding request to ``target`` (our own mapped address) until it comes back
        to this socket; True if it did within ``timeout`` (the NAT hairpins)."""
        if self._closed:
            raise ServiceClosed("STUN dispatcher closed")
        txid = self.new_transaction_id()
        data = proto.encode(proto.request(txid))
        fut: asyncio.Future[Address] = self._loop.create_future()
        self._watches[txid] = fut
        deadline = self._loop.time() + timeout
        try:
            while True:
                self._sendto(data, target)
                remaining = deadline - self._loop.time()
                if remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(min(interval, remaining)):
                        await asyncio.shield(fut)
                    return True
                except TimeoutError:
                    if self._loop.time() >= deadline:
                        return False
        finally:
            self._watches.pop(txid, None)
            if not fut.done():
                fut.cancel()


def _sockname(sock: socket.socket) -> Address:
    name = sock.getsockname()
    return str(name[0]), int(name[1])


async def stun_binding(
    via: StunDispatcher | UdpMux | socket.socket,
    server: tuple[str, int],
    timeout: float = 5.0,
    **options: object,
) -> BindingResult:
    """One STUN Binding request from ``via`` to ``server``; returns the mapped address etc.

    ``via`` is a :class:`StunDispatcher`, crust's :class:`~crust.aio.udp_mux.UdpMux` (the
    request leaves from the QUIC socket, so the mapping is the one QUIC uses), or a UDP
    socket that nothing else reads.  ``options`` go to :meth:`StunDispatcher.binding`.
    """
    if isinstance(via, StunDispatcher):
        return await via.binding(server, timeout=timeout, **options)  # type: ignore[arg-type]
    if isinstance(via, UdpMux):
        d = StunDispatcher.for_mux(via)
        return await d.binding(server, timeout=timeout, **options)  # type: ignore[arg-type]
    if isinstance(via, socket.socket):
        temp = StunDispatcher.for_socket(via)
        try:
            return await temp.binding(server, timeout=timeout, **options)  # type: ignore[arg-type]
        finally:
            temp.close()
    raise TypeError(f"stun_binding needs a StunDispatcher, UdpMux or socket, not {type(via)!r}")


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


class StunServer(_ClosedOnExit):
    """A standalone STUN server on one socket, or four for RFC 5780 (see :meth:`start`)."""

    def __init__(self, responder: StunResponder, sockets: dict[Address, socket.socket]) -> None:
        self.responder = responder
        self._sockets = sockets
        self._loop = asyncio.get_running_loop()
        self._closed = False
        for local, sock in sockets.items():
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._reader(local, sock))

    @classmethod
    async def start(
        cls,
        primary: Address,
        alternate_ip: str | None = None,
        *,
        alternate_port: int = 0,
        software: str | None = None,
        rate: float = 200.0,
        burst: float = 100.0,
    ) -> StunServer:
        """Listen on ``primary`` (port 0 = any); with ``alternate_ip`` also on the alternate
        IP and an alternate port (``alternate_port``, 0 = any), all four combinations."""
        family = socket.AF_INET6 if ":" in primary[0] else socket.AF_INET
        socks: dict[Address, socket.socket] = {}
        try:
            for _attempt in range(20):
                for s in socks.values():
                    s.close()
                socks = {}
                try:
                    first = _bind(family, primary)
                    p1 = _sockname(first)[1]
                    socks[(primary[0], p1)] = first
                    if alternate_ip is None:
                        break
                    second = _bind(family, (primary[0], alternate_port))
                    p2 = _sockname(second)[1]
                    socks[(primary[0], p2)] = second
                    socks[(alternate_ip, p1)] = _bind(family, (alternate_ip, p1))
                    socks[(alternate_ip, p2)] = _bind(family, (alternate_ip, p2))
                    break
                except OSError:
                    if primary[1] and alternate_port:
                        raise
                    continue
            else:
                raise OSError("could not find free ports for the STUN server")
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        locals_ = list(socks)
        addresses = ResponderAddresses(locals_[0], locals_[3] if alternate_ip is not None else None)
        responder = StunResponder(addresses, software=software, rate=rate, burst=burst)
        return cls(responder, socks)

    @property
    def addresses(self) -> ResponderAddresses:
        assert self.responder.addresses is not None
        return self.responder.addresses

    @property
    def address(self) -> Address:
        return self.addresses.primary

    def _reader(self, local: Address, sock: socket.socket) -> Callable[[], None]:
        def readable() -> None:
            for _ in range(MAX_BATCH):
                try:
                    data, addr = sock.recvfrom(RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue
                source = (str(addr[0]), int(addr[1]))
                try:
                    reply = self.responder.handle(data, source, local, self._loop.time())
                except Exception:
                    log.exception("STUN request from %s could not be handled", source)
                    continue
                if reply is None:
                    continue
                out = self._sockets.get(reply.source or local, sock)
                try:
                    out.sendto(reply.data, reply.destination)
                except OSError as exc:
                    log.debug("STUN reply to %s failed: %s", reply.destination, exc)

        return readable

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets.values():
            self._loop.remove_reader(sock.fileno())
            sock.close()


def _bind(family: int, addr: Address) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------------------------
# NAT prober
# --------------------------------------------------------------------------------------------


class NatProber:
    """Classify the NAT in front of one UDP socket (RFC 5780 section 4).

    With a ``server`` that supports RFC 5780 (its response carries OTHER-ADDRESS, e.g. coturn
    with two listening addresses, or :class:`StunServer` with an alternate IP):

    1. Binding to the server -> mapping M1, OTHER-ADDRESS;
    2. filtering: CHANGE-REQUEST change-IP-and-port, then (if nothing came) change-port --
       done before the socket sends anywhere else, so only the server's primary endpoint has
       been contacted;
    3. mapping: Binding to (alternate IP, primary port), (alternate IP, alternate port) and
       (primary IP, alternate port) -- four destinations in all, which also gives three port
       steps for the allocation pattern;
    4. hairpinning: a Binding request to M1 itself.

    Plain ``observers`` (any STUN servers) add mapping observations; without RFC 5780 the
    filtering stays unknown.  Uses ``dispatcher``'s socket, or a fresh one bound to ``bind``.
    Run it on a socket that has not talked to others recently, or the filtering result can be
    too permissive.
    """

    def __init__(
        self,
        dispatcher: StunDispatcher | None = None,
        *,
        server: tuple[str, int] | None = None,
        observers: Sequence[tuple[str, int]] = (),
        bind: Address = ("0.0.0.0", 0),
        timeout: float = 3.0,
        filter_timeout: float = 1.5,
        rto: float = 0.25,
        hairpin: bool = True,
        hairpin_timeout: float = 1.0,
        local_addresses: Sequence[str] = (),
    ) -> None:
        if server is None and not observers:
            raise ConfigError("give a STUN server or observers", field="server")
        for name, value in (
            ("timeout", timeout),
            ("filter_timeout", filter_timeout),
            ("rto", rto),
            ("hairpin_timeout", hairpin_timeout),
        ):
            if not value > 0:
                raise ConfigError(f"must be positive, not {value!r}", field=name)
        self.dispatcher = dispatcher
        self.server = server
        self.observers = list(observers)
        self.bind = bind
        self.timeout = timeout
        self.filter_timeout = filter_timeout
        self.rto = rto
        self.hairpin = hairpin
        self.hairpin_timeout = hairpin_timeout
        self.local_addresses = list(local_addresses)
        self.notes: list[str] = []

    async def run(self) -> NatClassification:
        own = self.dispatcher is None
        d = self.dispatcher if self.dispatcher is not None else StunDispatcher.open(*self.bind)
        try:
            return await self._run(d)
        finally:
            if own:
                d.close()

    async def _binding(
        self, d: StunDispatcher, target: tuple[str, int], **kw: object
    ) -> BindingResult | None:
        try:
            return await d.binding(target, timeout=self.timeout, rto=self.rto, **kw)  # type: ignore[arg-type]
        except (StunTimeout, ProtocolError) as exc:
            self.notes.append(f"{target[0]}:{target[1]}: {exc}")
            return None

    async def _filter_probe(
        self, d: StunDispatcher, server: Address, source: ProbeSource
    ) -> FilteringProbe | None:
        change = ChangeRequest(change_ip=source == "other-address", change_port=True)
        try:
            r = await d.binding(
                server, timeout=self.filter_timeout, rto=self.rto, change_request=change
            )
        except StunTimeout:
            return FilteringProbe(source, arrived=False)
        except StunErrorResponse as exc:
            self.notes.append(f"server refused CHANGE-REQUEST: {exc}")
            return None
        except ProtocolError as exc:
            self.notes.append(f"bad CHANGE-REQUEST response: {exc}")
            return None
        same_ip = _same_ip(r.source[0], server[0])
        if r.source == server or (source == "other-address" and same_ip):
            self.notes.append(
                f"server answered a CHANGE-REQUEST from {r.source[0]}:{r.source[1]}: not honoured"
            )
            return None
        return FilteringProbe(source, arrived=True)

    async def _run(self, d: StunDispatcher) -> NatClassification:
        self.notes = []
        family = socket.AF_UNSPEC
        if d.local_address is not None:
            family = socket.AF_INET6 if ":" in d.local_address[0] else socket.AF_INET
        candidates = [self.server] if self.server is not None else []
        candidates += self.observers
        targets = [await resolve(t, family) for t in candidates]
        mappings: list[MappingObservation] = []
        probes: list[FilteringProbe] = []
        first: BindingResult | None = None
        primary: Address | None = None
        for t in targets:
            first = await self._binding(d, t)
            if first is not None:
                primary = t
                break
        hairpin: bool | None = None
        if first is not None and primary is not None:
            mappings.append(MappingObservation(primary, first.mapped, first.rtt))
            other = first.other_address
            rfc5780 = (
                primary == (targets[0] if self.server is not None else None)
                and other is not None
                and not _same_ip(other[0], primary[0])
                and other[1] != primary[1]
            )
            extra: list[Address] = []
            if rfc5780 and other is not None:
                probe = await self._filter_probe(d, primary, "other-address")
                if probe is not None:
                    probes.append(probe)
                if probe is None or not probe.arrived:
                    probe = await self._filter_probe(d, primary, "other-port")
                    if probe is not None:
                        probes.append(probe)
                extra = [(other[0], primary[1]), other, (primary[0], other[1])]
            elif self.server is not None and primary == targets[0]:
                self.notes.append("server does not support RFC 5780 (no OTHER-ADDRESS)")
            extra += [t for t in targets if t != primary and t not in extra]
            for t in extra:
                r = await self._binding(d, t)
                if r is not None:
                    mappings.append(MappingObservation(t, r.mapped, r.rtt))
            if self.hairpin:
                hairpin = await d.hairpin(first.mapped, timeout=self.hairpin_timeout)
        local = d.local_address
        if local is not None and _wildcard(local[0]) and primary is not None:
            ip = local_ip_towards(primary)
            if ip is not None:
                local = (ip, local[1])
        result = classify(
            NatObservations(
                local=local,
                mappings=mappings,
                filtering=probes,
                hairpin=hairpin,
                local_addresses=self.local_addresses,
            )
        )
        if self.notes:
            result = _with_notes(result, self.notes)
        return result


def _with_notes(result: NatClassification, notes: Sequence[str]) -> NatClassification:
    return replace(result, notes=(*result.notes, *notes))


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


__all__ = [
    "NatProber",
    "StunDispatcher",
    "StunServer",
    "local_ip_towards",
    "resolve",
    "stun_binding",
]
