"""Node or client: a peer is a *node* once a dial-back from another address proved that
others can reach its listeners; otherwise it is a *client* (``Config.role`` overrides).

The peer asks a connected peer (``{"t": "dbq", "n": nonce, "c": [contacts]}``); that peer
dials each contact back **from a different local address** than the one our connection
arrived at (so a restricted NAT that lets in the address we talked to cannot fake it), runs a
full crust handshake that must prove our peer id, and answers ``{"t": "dbr", "n": nonce,
"ok": [contacts reached]}`` (or ``"e": reason``). Guards: it only dials addresses of the IP it
sees us at (dial-backs cannot be aimed at third parties), at most 4 contacts, one request per
peer per 30 s and 10 per second in all; the nonce binds the answer to our request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from crust import errors
from crust.aio.tcp import TcpProtocol
from crust.contact import Contact, expand_wildcard
from crust.events import ReachabilityChecked
from crust.identity import PeerId
from crust.traversal import BucketMap, TokenBucket

if TYPE_CHECKING:
    from crust.aio.connection import Connection
    from crust.service import Service

log = logging.getLogger("crust.reachability")

MAX_CONTACTS = 4
DIAL_TIMEOUT = 5.0
ASKED_PEERS = 3


def _public(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


class Reachability:
    """Both sides of the dial-back for one service."""

    def __init__(self, service: Service) -> None:
        self.svc = service
        self.proven: list[str] = []
        """Our contacts a dial-back reached."""
        self._asked: set[PeerId] = set()
        self._waiters: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._per_peer = BucketMap(rate=1 / 30, burst=1.0)
        self._total = TokenBucket(rate=10.0, burst=10.0, now=asyncio.get_running_loop().time())
        self._running = False
        self.counters = {"dialbacks_done": 0, "dialbacks_refused": 0}

    @property
    def role(self) -> str:
        configured = self.svc.config.role
        if configured != "auto":
            return configured
        return "node" if self.proven else "client"

    # ------------------------------------------------------------------ asking

    def connected(self, conn: Connection) -> None:
        """A connection we dialed is up: ask for a dial-back if we do not know yet."""
        if (
            self.svc.config.role == "auto"
            and not self.proven
            and not self._running
            and len(self._asked) < ASKED_PEERS
            and conn.peer_id is not None
            and conn.peer_id not in self._asked
        ):
            self._running = True
            self.svc._spawn(self._ask(conn))

    def endpoints_changed(self) -> None:
        """A listener got a new external address (port mapping): if we are not proven yet,
        ask again, first of a peer we dialed directly."""
        if self.proven or self.svc.config.role != "auto":
            return
        self._asked.clear()
        for conn in list(self.svc._active.values()):
            if conn.outbound and conn.path == "direct" and not conn.closed:
                self.connected(conn)
                return

    async def _ask(self, conn: Connection) -> None:
        try:
            peer = conn.peer_id
            assert peer is not None
            self._asked.add(peer)
            contacts = [c for c in self._contacts() if _public(Contact.parse(c).host)]
            if not contacts:
                return
            nonce = os.urandom(16)
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._waiters[nonce] = fut
            try:
                conn.session.send_control({"t": "dbq", "n": nonce, "c": contacts[:MAX_CONTACTS]})
                conn.control_changed()
                async with asyncio.timeout(DIAL_TIMEOUT * MAX_CONTACTS + 5):
                    answer = await fut
            except TimeoutError:
                return
            finally:
                self._waiters.pop(nonce, None)
            got = answer.get("ok")
            ok = (
                [c for c in got if isinstance(c, str) and c in contacts]
                if isinstance(got, list)
                else []
            )
            self.svc._emit(ReachabilityChecked(peer, bool(ok), tuple(ok)))
            if ok:
                self.proven = ok
                self.svc._params.hello_extra["role"] = "node"
                log.info("reachable from outside at %s: role node", ", ".join(ok))
            else:
                log.info("dial-back by %s: %s", peer.short(), answer.get("e", "nothing reached"))
        finally:
            self._running = False

    def _contacts(self) -> list[str]:
        out: list[str] = []
        for ep in self.svc.endpoints():
            for text in (ep.external, ep.local):
                if text is None:
                    continue
                c = Contact.parse(text)
                for host in expand_wildcard(c.host):
                    s = str(Contact(c.scheme, host, c.port))
                    if s not in out:
                        out.append(s)
        return out

    # ------------------------------------------------------------------ answering

    def handle_control(self, conn: Connection, payload: dict[str, Any]) -> bool:
        kind = payload.get("t")
        if kind == "dbr":
            nonce = payload.get("n")
            fut = self._waiters.get(nonce) if isinstance(nonce, bytes) else None
            if fut is not None and not fut.done():
                fut.set_result(payload)
            return True
        if kind == "dbq":
            self._request(conn, payload)
            return True
        return False

    def _request(self, conn: Connection, payload: dict[str, Any]) -> None:
        nonce, items = payload.get("n"), payload.get("c")
        peer = conn.peer_id
        if peer is None or not isinstance(nonce, bytes) or len(nonce) != 16:
            return
        now = asyncio.get_running_loop().time()

        def refuse(reason: str) -> None:
            self.counters["dialbacks_refused"] += 1
            conn.session.send_control({"t": "dbr", "n": nonce, "e": reason})
            conn.control_changed()

        if not (self._per_peer.take(peer, now) and self._total.take(now)):
            refuse("rate limited")
            return
        seen = Contact.parse(conn.remote).host
        local = Contact.parse(conn.local).host
        targets: list[Contact] = []
        for text in items if isinstance(items, list) else []:
            try:
                c = Contact.parse(text) if isinstance(text, str) else None
            except errors.ConfigError:
                c = None
            # only the address we see the peer at: a dial-back is never aimed elsewhere
            if c is not None and c.is_ip and c.host == seen and c.port and c not in targets:
                targets.append(c)
        if not targets:
            refuse("no contact at the address the request came from")
            return
        self.svc._spawn(self._dial_back(conn, peer, nonce, targets[:MAX_CONTACTS], local))

    def _other_address(self, family: int, used: str) -> str | None:
        """A public address of ours, of ``family``, other than ``used``."""
        for ep in self.svc.endpoints():
            for host in expand_wildcard(Contact.parse(ep.local).host):
                v6 = ":" in host
                if (family == socket.AF_INET6) == v6 and host != used and _public(host):
                    return host
        return None

    async def _dial_back(
        self, conn: Connection, peer: PeerId, nonce: bytes, targets: list[Contact], used: str
    ) -> None:
        ok: list[str] = []
        reasons: list[str] = []
        for c in targets:
            family = socket.AF_INET6 if c.family_v6 else socket.AF_INET
            source = self._other_address(family, used)
            if source is None:
                reasons.append("no second address to dial back from")
                continue
            try:
                async with asyncio.timeout(DIAL_TIMEOUT):
                    await self._attempt(c.with_peer(peer), source)
                ok.append(str(c.with_peer(None)))
            except (errors.CrustError, OSError, TimeoutError) as exc:
                reasons.append(f"{c}: {type(exc).__name__}")
        self.counters["dialbacks_done"] += 1
        answer: dict[str, Any] = {"t": "dbr", "n": nonce, "ok": ok}
        if not ok:
            answer["e"] = "; ".join(reasons) or "nothing reached"
        if not conn.closed:
            conn.session.send_control(answer)
            conn.control_changed()

    async def _attempt(self, contact: Contact, source: str) -> None:
        """A crust handshake to ``contact`` from ``source`` that must prove the peer id (the
        connection itself then closes as a duplicate of the one we already have)."""
        svc = self.svc
        if contact.scheme == "quic":
            mux = next((m for m in svc._muxes if m.local_address[0] == source), None)
            if mux is None:
                raise errors.ConnectError(f"no QUIC socket on {source}")
            await svc._attempt_quic(contact, mux=mux)
            return
        make = svc._tcp_dialed(initiator=True, expected=contact.peer_id)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: TcpProtocol(make), contact.host, contact.port, local_addr=(source, 0)
        )
        new = await protocol.made
        if new is None:
            raise errors.ConnectError("connection closed at once")
        await svc._keep_attempt(new)
