"""Plain-socket probe for the NAT lab.

Run as a script inside a namespace (``ip netns exec NS python probe.py agent``) it becomes an
*agent*: it reads one JSON command per line on stdin and answers one JSON line on stdout.
Imported, :class:`Probe` starts such an agent in a lab node and wraps the commands::

    pub = Probe.start(lab, "pub")
    echo = pub.udp_echo(lab.host("pub").address, 4000)     # answers with the observed source
    a = Probe.start(lab, "a")
    s = a.udp(port=40000)
    s.query((lab.host("pub").address, 4000))                # -> ("198.18.0.11", 40000)
    s.stun((lab.host("pub").address, 3478))                 # XOR-MAPPED-ADDRESS

IPv6 works the same way: bind ``"::"`` (``a.udp(addr="::")``, ``pub.udp_echo(lab.address6("pub"),
4000)``); every socket's family follows the address it is bound or connecting to.

Only the standard library is used, so the script runs with any Python >= 3.11.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from tests.lab.netlab import Lab, LabProcess

PROBE_PATH: Final = os.path.abspath(__file__)

Addr = tuple[str, int]

# --------------------------------------------------------------------------------------------
# STUN (RFC 8489) -- just enough for a Binding request
# --------------------------------------------------------------------------------------------

STUN_MAGIC: Final = 0x2112A442
STUN_BINDING_REQUEST: Final = 0x0001
STUN_BINDING_SUCCESS: Final = 0x0101
ATTR_MAPPED_ADDRESS: Final = 0x0001
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020


def stun_binding_request(txid: bytes) -> bytes:
    if len(txid) != 12:
        raise ValueError("STUN transaction id is 12 bytes")
    return struct.pack("!HHI", STUN_BINDING_REQUEST, 0, STUN_MAGIC) + txid


def _family(addr: str) -> socket.AddressFamily:
    """``AF_INET6`` for an IPv6 literal, else ``AF_INET``."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _socket(addr: str, kind: socket.SocketKind) -> socket.socket:
    """A socket of ``addr``'s family; IPv6 sockets are IPv6-only (no IPv4-mapped addresses)."""
    family = _family(addr)
    s = socket.socket(family, kind)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return s


def _any_addr(peer: str) -> str:
    """The wildcard address of ``peer``'s family."""
    return "::" if _family(peer) == socket.AF_INET6 else "0.0.0.0"


def stun_parse_mapped(data: bytes, txid: bytes) -> Addr | None:
    """The (XOR-)MAPPED-ADDRESS of a Binding success response for ``txid``, else ``None``."""
    if len(data) < 20:
        return None
    mtype, length, magic = struct.unpack_from("!HHI", data)
    if mtype != STUN_BINDING_SUCCESS or magic != STUN_MAGIC or data[8:20] != txid:
        return None
    body = data[20 : 20 + length]
    plain: Addr | None = None
    pos = 0
    while pos + 4 <= len(body):
        atype, alen = struct.unpack_from("!HH", body, pos)
        value = body[pos + 4 : pos + 4 + alen]
        pos += 4 + alen + (-alen % 4)
        if len(value) >= 20 and value[1] == 0x02:  # IPv6
            port = struct.unpack_from("!H", value, 2)[0]
            raw6 = value[4:20]
            if atype == ATTR_XOR_MAPPED_ADDRESS:
                key = struct.pack("!I", STUN_MAGIC) + txid
                port ^= STUN_MAGIC >> 16
                return socket.inet_ntop(
                    socket.AF_INET6, bytes(b ^ k for b, k in zip(raw6, key, strict=True))
                ), port
            if atype == ATTR_MAPPED_ADDRESS:
                plain = socket.inet_ntop(socket.AF_INET6, raw6), port
            continue
        if len(value) < 8 or value[1] != 0x01:
            continue
        port = struct.unpack_from("!H", value, 2)[0]
        raw = struct.unpack_from("!I", value, 4)[0]
        if atype == ATTR_XOR_MAPPED_ADDRESS:
            port ^= STUN_MAGIC >> 16
            raw ^= STUN_MAGIC
            return socket.inet_ntoa(struct.pack("!I", raw)), port
        if atype == ATTR_MAPPED_ADDRESS:
            plain = socket.inet_ntoa(struct.pack("!I", raw)), port
    return plain


# --------------------------------------------------------------------------------------------
# Agent (runs inside a namespace)
# --------------------------------------------------------------------------------------------


class _Agent:
    def __init__(self) -> None:
        self.socks: dict[int, socket.socket] = {}
        self.backlog: dict[int, deque[tuple[Addr, bytes]]] = {}
        self.echoing: set[int] = set()
        self.next_id = 1

    def _add(self, s: socket.socket) -> int:
        sid = self.next_id
        self.next_id += 1
        self.socks[sid] = s
        self.backlog[sid] = deque()
        return sid

    def _sock(self, cmd: dict[str, Any]) -> tuple[int, socket.socket]:
        sid = int(cmd["sock"])
        return sid, self.socks[sid]

    # -- commands --------------------------------------------------------------------------

    def op_udp(self, cmd: dict[str, Any]) -> dict[str, Any]:
        bind = str(cmd.get("addr", "0.0.0.0"))
        s = _socket(bind, socket.SOCK_DGRAM)
        s.bind((bind, int(cmd.get("port", 0))))
        sid = self._add(s)
        addr, port = s.getsockname()[:2]
        return {"sock": sid, "addr": addr, "port": port}

    def op_udp_echo(self, cmd: dict[str, Any]) -> dict[str, Any]:
        res = self.op_udp(cmd)
        sid = res["sock"]
        self.echoing.add(sid)
        threading.Thread(target=self._echo_loop, args=(self.socks[sid],), daemon=True).start()
        return res

    @staticmethod
    def _echo_loop(s: socket.socket) -> None:
        while True:
            try:
                data, src = s.recvfrom(2048)
            except OSError:
                return
            if data.startswith(b"Q "):
                reply = {"nonce": data[2:].decode(errors="replace"), "observed": list(src[:2])}
                with contextlib.suppress(OSError):
                    s.sendto(json.dumps(reply).encode(), src)

    def _tcp_listener(
        self, cmd: dict[str, Any], serve: Callable[[socket.socket], None]
    ) -> dict[str, Any]:
        """A TCP listener served by ``serve`` in a thread (until the socket closes)."""
        bind = str(cmd.get("addr", "0.0.0.0"))
        s = _socket(bind, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((bind, int(cmd.get("port", 0))))
        s.listen(16)
        sid = self._add(s)
        self.echoing.add(sid)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
        addr, port = s.getsockname()[:2]
        return {"sock": sid, "addr": addr, "port": port}

    def op_tcp_echo(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return self._tcp_listener(cmd, self._tcp_echo_loop)

    @staticmethod
    def _tcp_echo_loop(s: socket.socket) -> None:
        while True:
            try:
                conn, src = s.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(json.dumps({"observed": list(src[:2])}).encode() + b"\n")

    def op_tcp_query(self, cmd: dict[str, Any]) -> dict[str, Any]:
        peer = str(cmd["to"][0])
        with _socket(peer, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((_any_addr(peer), int(cmd.get("port", 0))))
            s.settimeout(float(cmd.get("timeout", 3.0)))
            try:
                s.connect((cmd["to"][0], int(cmd["to"][1])))
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    buf += chunk
            except OSError as exc:
                return {"observed": None, "error": str(exc)}
            local = s.getsockname()
        return {"observed": json.loads(buf)["observed"], "local": list(local[:2])}

    def op_tcp_sink(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """A TCP listener that reads each connection to EOF and answers the byte count."""
        return self._tcp_listener(cmd, self._tcp_sink_loop)

    @staticmethod
    def _tcp_sink_loop(s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                total = 0
                while chunk := conn.recv(1 << 16):
                    total += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                conn.sendall(f"{total}\n".encode())

    def op_tcp_bulk(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send ``nbytes`` (ending in a newline) to a TCP sink; answer its count and the time."""
        nbytes = int(cmd["nbytes"])
        payload = b"x" * (nbytes - 1) + b"\n"
        start = time.monotonic()
        with socket.create_connection(
            (cmd["to"][0], int(cmd["to"][1])), timeout=float(cmd.get("timeout", 10.0))
        ) as s:
            s.sendall(payload)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                reply += chunk
        return {"received": int(reply or b"-1"), "seconds": time.monotonic() - start}

    def op_tcp_punch(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """TCP simultaneous open: ``connect()`` from the fixed local ``port`` (SO_REUSEADDR and
        SO_REUSEPORT) to ``to``, up to ``attempts`` times, each bounded by ``timeout``.

        Once connected, each side writes ``data`` and a newline and reads the peer's line.
        """
        peer = (str(cmd["to"][0]), int(cmd["to"][1]))
        port = int(cmd["port"])
        attempts = max(1, min(int(cmd.get("attempts", 5)), 20))
        per_try = max(0.1, min(float(cmd.get("timeout", 2.0)), 10.0))
        message = str(cmd.get("data", "hello")).encode() + b"\n"
        errors: list[str] = []
        for attempt in range(1, attempts + 1):
            start = time.monotonic()
            s = _socket(peer[0], socket.SOCK_STREAM)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((_any_addr(peer[0]), port))
                s.settimeout(per_try)
                s.connect(peer)
                s.sendall(message)
                line = b""
                while not line.endswith(b"\n") and len(line) < 4096:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    line += chunk
                return {
                    "connected": True,
                    "attempts": attempt,
                    "local": list(s.getsockname()[:2]),
                    "peer": list(s.getpeername()[:2]),
                    "received": line.decode(errors="replace").rstrip("\n"),
                    "errors": errors,
                }
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                # An immediate failure (e.g. a RST) must not turn into a tight loop: pace the
                # attempts at most once per ``per_try``.
                rest = per_try - (time.monotonic() - start)
                if rest > 0 and attempt < attempts:
                    time.sleep(rest)
            finally:
                s.close()
        return {"connected": False, "attempts": attempts, "errors": errors}

    def op_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        _, s = self._sock(cmd)
        data = str(cmd.get("data", "")).encode()
        for _ in range(int(cmd.get("count", 1))):
            s.sendto(data, (cmd["to"][0], int(cmd["to"][1])))
        return {}

    def _recv_one(self, sid: int, s: socket.socket, deadline: float) -> tuple[Addr, bytes] | None:
        if self.backlog[sid]:
            return self.backlog[sid].popleft()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        s.settimeout(remaining)
        try:
            data, src = s.recvfrom(2048)
        except (TimeoutError, ConnectionRefusedError):
            return None
        return (src[0], src[1]), data

    def op_recv(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Packets received within ``timeout`` (all of them, or the first with ``first``)."""
        sid, s = self._sock(cmd)
        if sid in self.echoing:
            raise ValueError("cannot recv on an echo socket")
        deadline = time.monotonic() + float(cmd.get("timeout", 1.0))
        got: list[dict[str, Any]] = []
        while True:
            item = self._recv_one(sid, s, deadline)
            if item is None:
                break
            got.append({"from": list(item[0]), "data": item[1].decode(errors="replace")})
            if cmd.get("first"):
                break
        return {"packets": got}

    def _request(
        self,
        sid: int,
        s: socket.socket,
        to: Addr,
        payload: bytes,
        match: Any,
        timeout: float,
        interval: float = 0.2,
    ) -> tuple[Any, float] | None:
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            sent = time.monotonic()
            s.sendto(payload, to)
            resend = min(deadline, sent + interval)
            while time.monotonic() < resend:
                s.settimeout(max(resend - time.monotonic(), 0.001))
                try:
                    data, src = s.recvfrom(2048)
                except (TimeoutError, ConnectionRefusedError):
                    break
                result = match(data)
                if result is not None:
                    return result, time.monotonic() - sent
                self.backlog[sid].append(((src[0], src[1]), data))
        return None

    def op_query(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Ask a UDP echo server which source address it sees."""
        sid, s = self._sock(cmd)
        nonce = secrets.token_hex(6)

        def match(data: bytes) -> Any:
            try:
                msg = json.loads(data)
            except ValueError:
                return None
            if isinstance(msg, dict) and msg.get("nonce") == nonce:
                return msg["observed"]
            return None

        to = (cmd["to"][0], int(cmd["to"][1]))
        got = self._request(sid, s, to, b"Q " + nonce.encode(), match, float(cmd["timeout"]))
        if got is None:
            return {"observed": None}
        return {"observed": got[0], "rtt": got[1]}

    def op_stun(self, cmd: dict[str, Any]) -> dict[str, Any]:
        sid, s = self._sock(cmd)
        txid = secrets.token_bytes(12)
        to = (cmd["to"][0], int(cmd["to"][1]))
        got = self._request(
            sid,
            s,
            to,
            stun_binding_request(txid),
            lambda data: stun_parse_mapped(data, txid),
            float(cmd["timeout"]),
            interval=0.25,
        )
        if got is None:
            return {"mapped": None}
        return {"mapped": list(got[0]), "rtt": got[1]}

    def op_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        sid, s = self._sock(cmd)
        s.close()
        del self.socks[sid]
        del self.backlog[sid]
        self.echoing.discard(sid)
        return {}

    def serve(self) -> int:
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                handler = getattr(self, "op_" + str(cmd["op"]))
                reply: dict[str, Any] = {"ok": True, **handler(cmd)}
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(reply), flush=True)
        for s in self.socks.values():
            s.close()
        return 0


# --------------------------------------------------------------------------------------------
# Client side (runs in the test process)
# --------------------------------------------------------------------------------------------


class ProbeError(RuntimeError):
    pass


@dataclass(frozen=True)
class UdpSocket:
    probe: Probe
    id: int
    addr: str
    port: int

    def send(self, to: Addr, data: str = "x", count: int = 1) -> None:
        self.probe.call("send", sock=self.id, to=list(to), data=data, count=count)

    def recv(self, timeout: float = 1.0) -> list[tuple[Addr, str]]:
        """Every packet that arrives within ``timeout`` seconds: ``[((ip, port), data)]``."""
        res = self.probe.call("recv", sock=self.id, timeout=timeout, wait=timeout + 5)
        return [((p["from"][0], int(p["from"][1])), p["data"]) for p in res["packets"]]

    def recv_first(self, timeout: float = 1.0) -> tuple[Addr, str] | None:
        res = self.probe.call("recv", sock=self.id, timeout=timeout, first=True, wait=timeout + 5)
        if not res["packets"]:
            return None
        p = res["packets"][0]
        return (p["from"][0], int(p["from"][1])), p["data"]

    def query(self, echo: Addr, timeout: float = 3.0) -> Addr:
        """The source address a UDP echo server sees for this socket (retransmits)."""
        res = self.probe.call("query", sock=self.id, to=list(echo), timeout=timeout)
        if res["observed"] is None:
            raise ProbeError(f"no answer from echo server {echo} to {self.probe.node}:{self.port}")
        return res["observed"][0], int(res["observed"][1])

    def query_rtt(self, echo: Addr, timeout: float = 3.0) -> float:
        res = self.probe.call("query", sock=self.id, to=list(echo), timeout=timeout)
        if res["observed"] is None:
            raise ProbeError(f"no answer from echo server {echo}")
        return float(res["rtt"])

    def try_query(self, echo: Addr, timeout: float = 1.0) -> Addr | None:
        res = self.probe.call("query", sock=self.id, to=list(echo), timeout=timeout)
        if res["observed"] is None:
            return None
        return res["observed"][0], int(res["observed"][1])

    def stun(self, server: Addr, timeout: float = 3.0) -> Addr | None:
        """XOR-MAPPED-ADDRESS from a STUN Binding request, or ``None`` on timeout."""
        res = self.probe.call("stun", sock=self.id, to=list(server), timeout=timeout)
        if res["mapped"] is None:
            return None
        return res["mapped"][0], int(res["mapped"][1])

    def close(self) -> None:
        self.probe.call("close", sock=self.id)


@dataclass(frozen=True)
class TcpPunch:
    """Outcome of :meth:`Probe.tcp_punch`."""

    connected: bool
    attempts: int
    local: Addr | None
    peer: Addr | None
    #: The line the peer wrote on the connection.
    received: str | None
    #: One entry per failed attempt.
    errors: list[str]


class Probe:
    """A probe agent running inside one lab node."""

    def __init__(self, node: str, proc: LabProcess) -> None:
        self.node = node
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        assert proc.stdout is not None
        assert proc.stderr is not None
        threading.Thread(target=self._pump, args=(proc.stdout, self._lines), daemon=True).start()
        threading.Thread(target=self._pump_err, args=(proc.stderr,), daemon=True).start()

    @classmethod
    def start(cls, lab: Lab, node: str, timeout: float = 10.0) -> Probe:
        proc = lab.spawn_python(
            node,
            ["-u", PROBE_PATH, "agent"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        probe = cls(node, proc)
        lab.add_cleanup(probe.close)
        hello = probe._read(timeout)
        if not hello.get("ready"):
            raise ProbeError(f"probe in {node} did not start: {hello}")
        return probe

    @staticmethod
    def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
        try:
            for line in stream:
                lines.put(line)
        except (OSError, ValueError):
            pass
        lines.put(None)

    def _pump_err(self, stream: Any) -> None:
        try:
            for line in stream:
                self._stderr.append(line)
        except (OSError, ValueError):
            pass

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise ProbeError(f"probe in {self.node}: no answer within {timeout}s") from None
        if line is None:
            raise ProbeError(f"probe in {self.node} exited: {''.join(self._stderr)[-2000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, op: str, wait: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one command and wait for its answer."""
        limit = wait if wait is not None else float(args.get("timeout", 0)) + 10.0
        with self._lock:
            if self._closed:
                raise ProbeError(f"probe in {self.node} is closed")
            stdin = self.proc.stdin
            assert stdin is not None
            stdin.write(json.dumps({"op": op, **args}) + "\n")
            stdin.flush()
            res = self._read(limit)
        if not res.get("ok"):
            raise ProbeError(f"probe in {self.node}: {op} failed: {res.get('error')}")
        return res

    def udp(self, port: int = 0, addr: str = "0.0.0.0") -> UdpSocket:
        res = self.call("udp", addr=addr, port=port)
        return UdpSocket(self, int(res["sock"]), str(res["addr"]), int(res["port"]))

    def udp_echo(self, addr: str, port: int) -> UdpSocket:
        """A UDP socket answering ``Q <nonce>`` with the source address it observed."""
        res = self.call("udp_echo", addr=addr, port=port)
        return UdpSocket(self, int(res["sock"]), str(res["addr"]), int(res["port"]))

    def tcp_echo(self, addr: str, port: int) -> int:
        """A TCP listener that writes the observed source address to every connection."""
        return int(self.call("tcp_echo", addr=addr, port=port)["port"])

    def tcp_sink(self, addr: str, port: int) -> int:
        """A TCP listener that answers every connection with the number of bytes it read."""
        return int(self.call("tcp_sink", addr=addr, port=port)["port"])

    def tcp_bulk(self, sink: Addr, nbytes: int, timeout: float = 10.0) -> tuple[int, float]:
        """Send ``nbytes`` to a :meth:`tcp_sink`; returns (bytes it counted, seconds)."""
        res = self.call("tcp_bulk", to=list(sink), nbytes=nbytes, timeout=timeout)
        return int(res["received"]), float(res["seconds"])

    def tcp_query(self, echo: Addr, port: int = 0, timeout: float = 3.0) -> Addr | None:
        return self.tcp_try(echo, port, timeout)[0]

    def tcp_try(
        self, echo: Addr, port: int = 0, timeout: float = 3.0
    ) -> tuple[Addr | None, str | None]:
        """Like :meth:`tcp_query`, also returning why it failed (``"timed out"``: no answer)."""
        res = self.call("tcp_query", to=list(echo), port=port, timeout=timeout)
        if res["observed"] is None:
            return None, str(res.get("error"))
        return (res["observed"][0], int(res["observed"][1])), None

    def tcp_punch(
        self, peer: Addr, port: int, *, attempts: int = 5, timeout: float = 2.0, data: str = ""
    ) -> TcpPunch:
        """TCP simultaneous open from local ``port`` to ``peer`` (run on both sides at once)."""
        res = self.call(
            "tcp_punch",
            to=list(peer),
            port=port,
            attempts=attempts,
            timeout=timeout,
            data=data or f"hello from {self.node}",
            wait=attempts * (timeout + 0.5) + 10.0,
        )
        if not res["connected"]:
            return TcpPunch(False, int(res["attempts"]), None, None, None, list(res["errors"]))
        return TcpPunch(
            True,
            int(res["attempts"]),
            (res["local"][0], int(res["local"][1])),
            (res["peer"][0], int(res["peer"][1])),
            str(res["received"]),
            list(res["errors"]),
        )

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2.0)
        self.proc.stop()


def main(argv: list[str]) -> int:
    if argv[1:2] == ["agent"]:
        return _Agent().serve()
    print("usage: probe.py agent", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
