"""The Wireshark dissector (crust.lua) on real crust traffic captured on loopback.

Capture: a raw AF_PACKET socket on ``lo`` with a classic BPF port filter (root or
CAP_NET_RAW), opened *before* the traffic starts and drained after the services closed, so
no packet is missed and nothing waits on a clock.  Only loopback traffic of the ports the
test itself opened is captured.  Decoding: ``tshark -X lua_script:crust.lua -T pdml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import random
import shutil
import socket
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

import crust
from crust.cli.main import main as cli
from crust.contact import Contact
from crust.events import MessageReceived, PeerLost
from crust.service import Service
from crust.testing.watcher import EventWatcher
from crust.wireshark import personal_plugin_dir, plugin_path

TSHARK = shutil.which("tshark")
pytestmark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is not installed (apt install tshark)"
)

LUA = plugin_path()
TIMEOUT = 10.0


def network_tag(name: str) -> str:
    """What the dissector must show as crust.network_tag (computed here independently)."""
    return hashlib.sha256(b"crust network\x00" + name.encode()).digest()[:8].hex()


# ------------------------------------------------------------------ capture

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35
SNAPLEN = 262144
MAX_PACKETS = 20000


def port_filter(ports: list[int], ip_proto: int) -> bytes:
    """Classic BPF: IPv4, this IP protocol, first fragment, source or destination port in
    ``ports``; accept SNAPLEN bytes, else drop."""
    ld_h, ld_b, ldx_msh, ld_h_ind, jeq, jset, ret = 0x28, 0x30, 0xB1, 0x48, 0x15, 0x45, 0x06
    n = len(ports)
    total = 8 + n + 1 + n + 2
    accept, drop = total - 2, total - 1
    prog: list[tuple[int, int, int, int]] = []

    def jump(target: int) -> int:
        return target - len(prog) - 1

    prog.append((ld_h, 0, 0, 12))  # ethertype
    prog.append((jeq, 0, jump(drop), ETH_P_IP))
    prog.append((ld_b, 0, 0, 23))  # IP protocol
    prog.append((jeq, 0, jump(drop), ip_proto))
    prog.append((ld_h, 0, 0, 20))  # flags + fragment offset
    prog.append((jset, jump(drop), 0, 0x1FFF))
    prog.append((ldx_msh, 0, 0, 14))  # X = IP header length
    prog.append((ld_h_ind, 0, 0, 14))  # source port
    for port in ports:
        prog.append((jeq, jump(accept), 0, port))
    prog.append((ld_h_ind, 0, 0, 16))  # destination port
    for i, port in enumerate(ports):
        prog.append((jeq, jump(accept), jump(drop) if i == n - 1 else 0, port))
    prog.append((ret, 0, 0, SNAPLEN))
    prog.append((ret, 0, 0, 0))
    assert len(prog) == total
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


class LoopbackCapture:
    """Packets to or from ``ports`` on ``lo``, kept in the socket until :meth:`drain`."""

    def __init__(self, ports: list[int], ip_proto: int) -> None:
        try:
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            pytest.skip("capturing on loopback needs root or CAP_NET_RAW")
        code = port_filter(ports, ip_proto)
        self._code = ctypes.create_string_buffer(code, len(code))
        fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(self._code))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 * 1024 * 1024)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(("lo", 0))
        self.sock.setblocking(False)
        self.packets: list[tuple[int, int, bytes]] = []

    def drain(self) -> None:
        """Read what the kernel queued (every packet was queued when it was sent)."""
        while len(self.packets) < MAX_PACKETS:
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(SNAPLEN, 64)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue  # loopback shows every packet twice: keep the received copy
            sec = nsec = 0
            for level, kind, raw in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", raw[:16])
            self.packets.append((sec, nsec // 1000, data))

    def save(self, path: Path) -> Path:
        write_pcap(path, self.packets)
        return path

    def close(self) -> None:
        self.sock.close()


def write_pcap(path: Path, packets: list[tuple[int, int, bytes]]) -> None:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1)]  # Ethernet
    for sec, usec, data in packets:
        out.append(struct.pack("<IIII", sec, usec, len(data), len(data)))
        out.append(data)
    path.write_bytes(b"".join(out))


# ------------------------------------------------------------------ tshark and PDML


@dataclass
class Pdu:
    """One decoded crust element: header, status, handshake message or record."""

    frame: int
    direction: int
    kind: str
    fields: dict[str, str] = field(default_factory=dict)
    frames: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Packet:
    number: int
    layers: dict[str, list[str]]
    pdus: list[Pdu]


def _value(el: ET.Element) -> str:
    """A field's bytes as hex for byte fields, else its shown value."""
    name = el.get("name", "")
    if name.endswith((".tag", ".ephemeral", ".body", ".ciphertext", ".static", ".payload")):
        return el.get("value", "")
    return el.get("show", "")


def _fields(el: ET.Element) -> dict[str, str]:
    return {f.get("name", ""): _value(f) for f in el.iter("field") if f.get("name")}


def tshark(pcap: Path, home: Path, *options: str, lua: bool = True) -> list[Packet]:
    """Dissect ``pcap`` (personal Wireshark folders under ``home``) and parse the PDML."""
    assert TSHARK is not None
    args = [TSHARK, "-n", "-r", str(pcap), "-T", "pdml"]
    if lua:
        args += ["-X", f"lua_script:{LUA}"]
    args += list(options)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "Lua Error" not in done.stdout + done.stderr, done.stderr
    packets = []
    for pkt in ET.fromstring(done.stdout).iter("packet"):
        layers: dict[str, list[str]] = {}
        pdus: list[Pdu] = []
        number = 0
        for proto in pkt.findall("proto"):
            if proto.get("name") == "crust":
                pdus.extend(_root_pdus(proto, number))
            for f in proto.iter("field"):
                name = f.get("name", "")
                if name:
                    layers.setdefault(name, []).append(f.get("show", ""))
            if proto.get("name") == "frame":
                number = int(layers["frame.number"][0])
        packets.append(Packet(number, layers, pdus))
    return packets


def _root_pdus(root: ET.Element, number: int) -> Iterator[Pdu]:
    direction = -1
    for child in root:
        name = child.get("name", "")
        if name == "crust.direction":
            direction = int(child.get("show", "-1"))
        elif name == "crust.status":
            yield Pdu(number, direction, "status", {name: child.get("show", "")})
        elif name == "crust.data":
            yield Pdu(number, direction, "data", {name: child.get("value", "")})
        elif child.tag == "proto":
            title = child.get("showname", "")
            kind = title.split(" ")[0].lower()  # header, handshake, record
            pdu = Pdu(number, direction, kind, _fields(child))
            for fr in child.findall("field"):
                if fr.get("name") == "crust.frame":
                    pdu.frames.append(_fields(fr))
            yield pdu


def all_pdus(packets: list[Packet]) -> list[Pdu]:
    return [p for pkt in packets for p in pkt.pdus]


def frames_of(pdus: list[Pdu], direction: int) -> list[dict[str, str]]:
    return [f for p in pdus if p.kind == "record" and p.direction == direction for f in p.frames]


def pdu_bytes(p: Pdu) -> int:
    """Bytes a PDU occupies on the stream."""
    if p.kind == "header":
        return 13
    if p.kind == "status":
        return 1
    if p.kind == "handshake":
        return 2 + int(p.fields["crust.handshake.length"])
    if p.kind == "record":
        return 2 + int(p.fields["crust.record.length"])
    raise AssertionError(f"unexpected {p}")


KIND = {
    "1": "MSG",
    "2": "FIRST",
    "3": "MORE",
    "4": "LAST",
    "32": "CLOSE",
    "33": "SELECT",
    "34": "ACCEPT",
}


def check_session(pdus: list[Pdu], network: str, keylog: Path | None) -> None:
    """What every decoded crust session must show, whatever the transport."""
    headers = [p for p in pdus if p.kind == "header"]
    assert len(headers) == 1
    header = headers[0].fields
    assert header["crust.magic"] == "CRST"
    assert header["crust.version"] == "1"
    assert header["crust.network_tag"].replace(":", "") == network_tag(network)
    assert headers[0].direction == 0
    hs = [p for p in pdus if p.kind == "handshake"]
    assert [p.fields["crust.handshake.message"] for p in hs] == ["1", "2", "3"]
    assert [p.direction for p in hs] == [0, 1, 0]
    assert hs[0].fields["crust.handshake.length"] == "32"  # message 1 is the bare ephemeral
    assert len(hs[0].fields["crust.handshake.ephemeral"]) == 64
    assert len(hs[1].fields["crust.handshake.ephemeral"]) == 64
    assert hs[0].fields["crust.handshake.ephemeral"] != hs[1].fields["crust.handshake.ephemeral"]
    assert "crust.handshake.static" in hs[1].fields and "crust.handshake.static" in hs[2].fields
    status = [p for p in pdus if p.kind == "status"]
    assert [(p.fields["crust.status"], p.direction) for p in status] == [("0", 1)]
    assert not [p for p in pdus if p.kind == "data"]
    for direction in (0, 1):
        records = [p for p in pdus if p.kind == "record" and p.direction == direction]
        assert records, f"no records in direction {direction}"
        numbers = [int(p.fields["crust.record.number"]) for p in records]
        assert numbers == list(range(len(records)))  # nonces, in order, none missed
        for p in records:
            assert int(p.fields["crust.record.length"]) >= 16
            assert len(p.fields["crust.record.tag"]) == 32
    if keylog is not None:
        # the key log line of this session is found by the clear ephemeral of message 1
        lines = [ln.split() for ln in keylog.read_text().splitlines()]
        noise = [ln for ln in lines if ln[0] == "CRUST_NOISE"]
        assert hs[0].fields["crust.handshake.ephemeral"] in [ln[1] for ln in noise]


# ------------------------------------------------------------------ crust traffic


def big_payload(size: int) -> bytes:
    return (bytes(range(256)) * (size // 256 + 1))[:size]


def port_of(contact: str) -> int:
    return Contact.parse(contact).port


async def exchange(a: Service, b: Service, contact: str, big: int) -> None:
    """b dials a, sends a text message and a large one, a replies; b disconnects."""
    wa, wb = EventWatcher(a), EventWatcher(b)
    try:
        peer = await asyncio.wait_for(b.connect(contact), TIMEOUT)
        await b.send(peer, b"hello wireshark")
        await b.send(peer, big_payload(big))
        got = await wa.messages(2)
        assert [len(m.data) for m in got] == [15, big]
        await a.send(b.peer_id, b"reply")
        await wb.wait(MessageReceived, lambda m: m.data == b"reply")
        await b.disconnect(a.peer_id)
        await wa.wait(PeerLost)
    finally:
        await wa.stop()
        await wb.stop()


async def plain_tcp_exchange(port_holder: list[int]) -> tuple[asyncio.Server, bytes]:
    """A non-crust TCP conversation on loopback (must never be claimed by the dissector)."""
    payload = b"plain tcp, not crust at all\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port_holder.append(server.sockets[0].getsockname()[1])
    return server, payload


# ------------------------------------------------------------------ tests


async def test_tcp_session_is_decoded_and_decrypted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    network = "wireshark-tcp"
    keylog = tmp_path / "keys.log"
    plain_port: list[int] = []
    server, payload = await plain_tcp_exchange(plain_port)
    cfg = crust.Config.for_testing(network_name=network, listen=("tcp://127.0.0.1:0",))
    async with server, Service(cfg) as a, Service(cfg.replace(keylog_file=keylog)) as b:
        contact = a.contacts()[0]
        capture = LoopbackCapture([port_of(contact), plain_port[0]], socket.IPPROTO_TCP)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", plain_port[0])
            writer.write(payload)
            assert await asyncio.wait_for(reader.readline(), TIMEOUT) == payload
            writer.close()
            await exchange(a, b, contact, big=150_000)
        except BaseException:
            capture.close()
            raise
    capture.drain()
    capture.close()
    assert any(
        r.name == "crust.keylog" and r.levelname == "WARNING" and str(keylog) in r.getMessage()
        for r in caplog.records
    )
    pcap = capture.save(tmp_path / "tcp.pcap")
    packets = tshark(pcap, tmp_path, "-o", f"crust.keylog_file:{keylog}")
    pdus = all_pdus(packets)
    check_session(pdus, network, keylog)

    # only the crust conversation is crust; the plain one on another port is not
    crust_port = port_of(contact)
    for pkt in packets:
        ports = {int(p) for p in pkt.layers.get("tcp.port", [])}
        if plain_port[0] in ports:
            assert not pkt.pdus
    # every payload byte of each direction belongs to exactly one decoded element
    initiator = next(
        int(pkt.layers["tcp.srcport"][0]) for pkt in packets for p in pkt.pdus if p.kind == "header"
    )
    for direction in (0, 1):
        sent = sum(
            int(pkt.layers["tcp.len"][0])
            for pkt in packets
            if crust_port in {int(p) for p in pkt.layers.get("tcp.port", [])}
            and (int(pkt.layers["tcp.srcport"][0]) == initiator) == (direction == 0)
        )
        decoded = sum(pdu_bytes(p) for p in pdus if p.direction == direction)
        assert decoded == sent > 0
    # the large message crossed several TCP segments: reassembled by desegmentation
    assert any("tcp.reassembled.length" in pkt.layers for pkt in packets if pkt.pdus)

    # decrypted with the CRUST_NOISE line: the frames and messages are readable
    records = [p for p in pdus if p.kind == "record"]
    assert all(p.fields["crust.record.decrypted"] == "1" for p in records)
    sent_by_b = frames_of(pdus, 0)
    sent_by_a = frames_of(pdus, 1)
    texts_b = [f.get("crust.frame.text") for f in sent_by_b if f["crust.frame.kind"] == "1"]
    assert "hello wireshark" in texts_b
    first = [f for f in sent_by_b if f["crust.frame.kind"] == "2"]
    assert len(first) == 1 and first[0]["crust.frame.total"] == "150000"
    fragments = [f for f in sent_by_b if f["crust.frame.kind"] in ("2", "3", "4")]
    assert [KIND[f["crust.frame.kind"]] for f in fragments][-1] == "LAST"
    body = bytes.fromhex("".join(f.get("crust.frame.body", "") for f in fragments))
    assert body == big_payload(150_000)
    assert "reply" in [f.get("crust.frame.text") for f in sent_by_a]
    # one side accepts, the other selects (which one depends on the peer ids); both close
    kinds_a = [KIND.get(f["crust.frame.kind"]) for f in sent_by_a]
    kinds_b = [KIND.get(f["crust.frame.kind"]) for f in sent_by_b]
    assert sorted(kinds_a.count(k) + kinds_b.count(k) for k in ("SELECT", "ACCEPT")) == [1, 1]
    assert kinds_a[-1] == "CLOSE" and kinds_b[-1] == "CLOSE"

    # without the key log: the same structure, records stay opaque
    opaque = all_pdus(tshark(pcap, tmp_path))
    check_session(opaque, network, None)
    opaque_records = [p for p in opaque if p.kind == "record"]
    assert [p.fields["crust.record.length"] for p in opaque_records] == [
        p.fields["crust.record.length"] for p in records
    ]
    assert all(p.fields["crust.record.decrypted"] == "0" and not p.frames for p in opaque_records)


async def test_quic_session_is_decrypted_with_the_key_log(tmp_path: Path) -> None:
    network = "wireshark-quic"
    keylog = tmp_path / "keys.log"
    # internet-sized datagrams: the 20 kB record below then spans many QUIC packets
    cfg = crust.Config.for_testing(
        network_name=network, listen=("quic://127.0.0.1:0",), quic_max_datagram_size=1350
    )
    # the dialer writes the key log (see docs/wireshark.md: Retry and the ClientHello random)
    async with Service(cfg) as a, Service(cfg.replace(keylog_file=keylog)) as b:
        contact = a.contacts()[0]
        assert contact.startswith("quic://")
        capture = LoopbackCapture([port_of(contact)], socket.IPPROTO_UDP)
        try:
            await exchange(a, b, contact, big=20_000)
        except BaseException:
            capture.close()
            raise
    capture.drain()
    capture.close()
    pcap = capture.save(tmp_path / "quic.pcap")
    text = keylog.read_text()
    assert "CLIENT_TRAFFIC_SECRET_0 " in text and "CRUST_NOISE " in text

    packets = tshark(
        pcap,
        tmp_path,
        "-o",
        f"tls.keylog_file:{keylog}",
        "-o",
        f"crust.keylog_file:{keylog}",
        "-o",
        f"crust.networks:{network}",
    )
    alpns = {a for pkt in packets for a in pkt.layers.get("tls.handshake.extensions_alpn_str", [])}
    assert alpns == {f"crust/1/{network}"}
    stream_packets = [pkt for pkt in packets if "quic.stream.stream_id" in pkt.layers]
    assert len(stream_packets) > 10  # decrypted STREAM frames
    assert {s for pkt in stream_packets for s in pkt.layers["quic.stream.stream_id"]} == {"0"}
    pdus = all_pdus(packets)
    check_session(pdus, network, keylog)
    # every STREAM byte of each direction is one decoded crust element
    client_port = next(
        int(pkt.layers["udp.srcport"][0]) for pkt in packets for p in pkt.pdus if p.kind == "header"
    )
    for direction in (0, 1):
        streamed = sum(
            int(n)
            for pkt in stream_packets
            if (int(pkt.layers["udp.srcport"][0]) == client_port) == (direction == 0)
            for n in pkt.layers["quic.stream.length"]
        )
        assert sum(pdu_bytes(p) for p in pdus if p.direction == direction) == streamed > 0
    records = [p for p in pdus if p.kind == "record"]
    assert all(p.fields["crust.record.decrypted"] == "1" for p in records)
    sent_by_b = frames_of(pdus, 0)
    assert "hello wireshark" in [f.get("crust.frame.text") for f in sent_by_b]
    assert "reply" in [f.get("crust.frame.text") for f in frames_of(pdus, 1)]
    # one record of ~20 kB spread over many QUIC packets, reassembled by the dissector
    large = [
        f for f in sent_by_b if f["crust.frame.kind"] == "1" and f["crust.frame.length"] == "20000"
    ]
    assert len(large) == 1 and bytes.fromhex(large[0]["crust.frame.body"]) == big_payload(20_000)
    assert any(int(p.fields["crust.record.length"]) > 20_000 for p in records)

    # without the TLS secrets nothing inside QUIC is visible
    hidden = tshark(pcap, tmp_path, "-o", f"crust.networks:{network}")
    assert not [pkt for pkt in hidden if "quic.stream.stream_id" in pkt.layers]
    assert not all_pdus(hidden)


# ------------------------------------------------------------------ synthetic captures


def tcp_packet(src: int, dst: int, seq: int, payload: bytes) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", src, dst, seq, 1, 5 << 4, 0x18, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, bytes([127, 0, 0, 1]),
                     bytes([127, 0, 0, 1]))  # fmt: skip
    return bytes(12) + struct.pack(">H", ETH_P_IP) + ip + tcp + payload


def udp_packet(src: int, dst: int, payload: bytes) -> bytes:
    udp = struct.pack(">HHHH", src, dst, 8 + len(payload), 0)
    total = 20 + len(udp) + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 17, 0, bytes([127, 0, 0, 1]),
                     bytes([127, 0, 0, 1]))  # fmt: skip
    return bytes(12) + struct.pack(">H", ETH_P_IP) + ip + udp + payload


def header(network: str, version: int = 1) -> bytes:
    return b"CRST" + bytes([version]) + bytes.fromhex(network_tag(network))


def test_hostile_streams_never_break_the_dissector(tmp_path: Path) -> None:
    """Valid headers followed by garbage, bad statuses, huge or truncated lengths, and
    records decrypted with keys from the key log: always dissected, never a Lua error."""
    rng = random.Random(1234)
    keylog = tmp_path / "keys.log"
    lines = []
    packets: list[tuple[int, int, bytes]] = []
    for i in range(60):
        client, server = 20000 + i, 30000 + i
        ephemeral = rng.randbytes(32)
        msg1 = struct.pack(">H", 32) + ephemeral
        first = header("fuzz", version=rng.choice([1, 1, 1, 2, 255])) + msg1
        lines.append(
            f"CRUST_NOISE {ephemeral.hex()} {rng.randbytes(32).hex()} "
            f"{rng.randbytes(32).hex()} {rng.randbytes(32).hex()}"
        )
        status = bytes([rng.choice([0, 0, 0, 1, 2, 77])])
        msg2 = rng.randbytes(rng.choice([0, 5, 80, 300]))
        reply = status + struct.pack(">H", rng.choice([len(msg2), 0xFFFF, 1])) + msg2
        records = b"".join(
            struct.pack(">H", n) + rng.randbytes(n)
            for n in (rng.randrange(0, 200) for _ in range(3))
        )
        garbage = rng.randbytes(rng.randrange(0, 400))
        seq_c, seq_s = 1, 1
        for src, dst, data in (
            (client, server, first),
            (server, client, reply),
            (client, server, struct.pack(">H", 64) + rng.randbytes(64) + records),
            (server, client, garbage),
            (client, server, records[: rng.randrange(0, len(records) + 1)]),
        ):
            if not data:
                continue
            if src == client:
                packets.append((i, 0, tcp_packet(src, dst, seq_c, data)))
                seq_c += len(data)
            else:
                packets.append((i, 0, tcp_packet(src, dst, seq_s, data)))
                seq_s += len(data)
    # a TCP stream that merely starts with the magic and a tiny length is not claimed
    packets.append((100, 0, tcp_packet(40000, 40001, 1, header("fuzz") + b"\x00\x05hello")))
    keylog.write_text("\n".join(lines) + "\n")
    pcap = tmp_path / "hostile.pcap"
    write_pcap(pcap, packets)
    decoded = tshark(pcap, tmp_path, "-o", f"crust.keylog_file:{keylog}")
    headers = [p for p in all_pdus(decoded) if p.kind == "header"]
    assert len(headers) == 60
    unclaimed = [pkt for pkt in decoded if "40000" in pkt.layers.get("tcp.srcport", [])]
    assert unclaimed and not unclaimed[0].pdus


def test_udp_control_datagram_hook(tmp_path: Path) -> None:
    """The hook future clear UDP datagrams plug into: a kind registered from another Lua
    script is claimed on any UDP port and dissected by its function."""
    hook = tmp_path / "hook.lua"
    hook.write_text(
        'local f = ProtoField.uint8("crust.test_kind", "Test kind")\n'
        'local p = Proto("crusttesthook", "test hook")\n'
        "p.fields = { f }\n"
        "local api = _G.crust_dissector\n"
        'api.register_udp_message("\\1cx", "test datagram", function(tvb, pinfo, tree)\n'
        "    tree:add(f, tvb(3, 1))\n"
        "end)\n"
    )
    packets = [
        (0, 0, udp_packet(41000, 41001, b"\x01cx\x07rest")),
        (0, 0, udp_packet(41000, 41001, b"\x02cx\x07rest")),
    ]
    pcap = tmp_path / "udp.pcap"
    write_pcap(pcap, packets)
    decoded = tshark(pcap, tmp_path, "-X", f"lua_script:{hook}")
    assert decoded[0].layers.get("crust.test_kind") == ["7"]
    assert "crust.test_kind" not in decoded[1].layers


# ------------------------------------------------------------------ CLI


def test_cli_prints_the_shipped_dissector() -> None:
    result = CliRunner().invoke(cli, ["wireshark-plugin"])
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip())
    assert path == LUA and path.name == "crust.lua"
    assert path.read_text().startswith("-- crust.lua")


def test_cli_install_into_a_folder(tmp_path: Path) -> None:
    dest = tmp_path / "plugins"
    result = CliRunner().invoke(cli, ["wireshark-plugin", "--install", "--dest", str(dest)])
    assert result.exit_code == 0, result.output
    assert (dest / "crust.lua").read_bytes() == LUA.read_bytes()
    bad = CliRunner().invoke(cli, ["wireshark-plugin", "--dest", str(dest)])
    assert bad.exit_code == 2


def test_cli_install_into_the_personal_plugin_folder_that_tshark_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    expected = personal_plugin_dir()
    assert expected.is_relative_to(home)
    result = CliRunner().invoke(cli, ["wireshark-plugin", "--install"])
    assert result.exit_code == 0, result.output
    installed = expected / "crust.lua"
    assert Path(result.stdout.strip()) == installed and installed.exists()
    # tshark now loads it by itself (no -X lua_script)
    pcap = tmp_path / "one.pcap"
    payload = header("crust") + struct.pack(">H", 32) + bytes(range(32))
    write_pcap(pcap, [(0, 0, tcp_packet(45000, 45001, 1, payload))])
    decoded = tshark(pcap, home, lua=False)
    assert [p.kind for p in all_pdus(decoded)] == ["header", "handshake"]


def test_plugin_folder_fallback_without_tshark(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    assert personal_plugin_dir(tshark=None, env=env) == (
        tmp_path / ".local" / "lib" / "wireshark" / "plugins"
    )
    missing = personal_plugin_dir(tshark=str(tmp_path / "no-tshark"), env=env)
    assert missing == tmp_path / ".local" / "lib" / "wireshark" / "plugins"


# ------------------------------------------------------------------ key log and the service


async def test_unopenable_key_log_fails_the_start_naming_the_field(tmp_path: Path) -> None:
    cfg = crust.Config.for_testing(keylog_file=tmp_path / "no-such-dir" / "keys.log")
    with pytest.raises(crust.errors.ConfigError) as info:
        async with Service(cfg):
            pass
    assert info.value.field == "keylog_file"


async def test_both_sides_log_the_same_session_keys(tmp_path: Path) -> None:
    cfg = crust.Config.for_testing(listen=("tcp://127.0.0.1:0",))
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    async with (
        Service(cfg.replace(keylog_file=log_a)) as a,
        Service(cfg.replace(keylog_file=log_b)) as b,
    ):
        await asyncio.wait_for(b.connect(a.contacts()[0]), TIMEOUT)
    lines_a, lines_b = log_a.read_text().splitlines(), log_b.read_text().splitlines()
    assert len(lines_a) == 1 and lines_a == lines_b
    assert lines_a[0].startswith("CRUST_NOISE ")


def test_punch_and_address_echo_datagrams(tmp_path: Path) -> None:
    """crust's clear hole-punch datagrams (``0x2a "cp1" | kind | token`` + padding or the
    address seen), on any UDP port; malformed ones are flagged, not dissected as valid."""
    magic, token = b"\x2acp1", bytes(range(16))
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    datagrams = [
        magic + b"\x01" + token,  # PROBE
        magic + b"\x02" + token,  # ACK
        magic + b"\x03" + token + bytes(24),  # ECHO_REQUEST
        magic + b"\x04" + token + b"\x04" + struct.pack(">H", 4242) + bytes([198, 51, 100, 7]),
        magic + b"\x04" + token + b"\x06" + struct.pack(">H", 5483) + v6,
        magic + b"\x04" + token + b"\x04\x00",  # truncated address
        magic + b"\x01",  # truncated token
    ]
    pcap = tmp_path / "punch.pcap"
    write_pcap(pcap, [(0, 0, udp_packet(43000 + i, 43100, d)) for i, d in enumerate(datagrams)])
    decoded = tshark(pcap, tmp_path)
    assert [pkt.layers.get("crust.punch.kind") for pkt in decoded] == [
        ["1"],
        ["2"],
        ["3"],
        ["4"],
        ["4"],
        ["4"],
        None,
    ]
    assert all(pkt.layers["crust.punch.token"] == [token.hex(":")] for pkt in decoded[:6])
    assert decoded[3].layers["crust.punch.ipv4"] == ["198.51.100.7"]
    assert decoded[3].layers["crust.punch.port"] == ["4242"]
    assert decoded[4].layers["crust.punch.ipv6"] == ["2001:db8::7"]
    assert decoded[4].layers["crust.punch.port"] == ["5483"]
    messages = [pkt.layers.get("_ws.expert.message") for pkt in decoded[5:]]
    assert messages == [["bad address in an echo reply"], ["shorter than a punch datagram"]]
    assert not [pkt for pkt in decoded[5:] if "crust.punch.port" in pkt.layers]


def test_lan_beacon_datagrams(tmp_path: Path) -> None:
    """The LAN discovery beacon (``0x2b "cb" | version | kind ...``, signed) is decoded on any
    UDP port; truncated or inconsistent ones are flagged."""
    from crust.identity import Identity
    from crust.proto import beacon

    ident = Identity.from_seed(bytes(range(32)))
    contacts = ["tcp://10.1.0.2:7000", "quic://10.1.0.2:7000"]
    good = beacon.encode(ident, beacon.Kind.QUERY, "crust", 1_800_000_000_000, b"n" * 8, contacts)
    datagrams = [
        good,
        beacon.encode(ident, beacon.Kind.ANNOUNCE, "crust", 1, b"n" * 8, []),
        good[:70],  # truncated
        good[:61] + b"\x05" + good[62:],  # more contacts announced than present
    ]
    pcap = tmp_path / "beacon.pcap"
    write_pcap(pcap, [(0, 0, udp_packet(5484, 5484, d)) for d in datagrams])
    decoded = tshark(pcap, tmp_path)
    assert decoded[0].layers["crust.beacon.kind"] == ["2"]
    assert decoded[0].layers["crust.beacon.timestamp"] == ["1800000000000"]
    assert decoded[0].layers["crust.beacon.contact"] == contacts
    assert decoded[0].layers["crust.beacon.peer"] == [bytes(ident.peer_id).hex(":")]
    assert decoded[1].layers["crust.beacon.kind"] == ["1"]
    assert decoded[1].layers["crust.beacon.contact_count"] == ["0"]
    assert "crust.beacon.signature" in decoded[1].layers
    messages = [pkt.layers.get("_ws.expert.message") for pkt in decoded[2:]]
    assert messages == [["shorter than a beacon"], ["bad contact in a beacon"]]
    assert not [pkt for pkt in decoded[2:] if "crust.beacon.signature" in pkt.layers]


async def test_real_punch_and_echo_datagrams_are_decoded(tmp_path: Path) -> None:
    """A real introduction and punch on loopback (QUIC only) plus an address echo, captured:
    tshark shows crust's PROBE/ACK/ECHO datagrams with one token per punch."""
    cfg = crust.Config.for_testing(listen=("quic://127.0.0.1:0",))
    async with Service(cfg) as node, Service(cfg) as a, Service(cfg) as b:
        ports = [port_of(s.contacts()[0]) for s in (node, a, b)]
        capture = LoopbackCapture(ports, socket.IPPROTO_UDP)
        try:
            # the echo first: once a QUIC connection uses the same pair of ports, Wireshark
            # shows that conversation as QUIC (docs/wireshark.md)
            traversal = b._traversal
            assert traversal is not None
            seen = await traversal.echo(b._muxes[0], ("127.0.0.1", ports[0]))
            assert seen == b._muxes[0].local_address
            await a.connect(node.contacts()[0])
            await b.connect(node.contacts()[0])
            async with asyncio.timeout(20):
                while b.peer_id not in node.peers():
                    await node._wait_peer(b.peer_id)
            assert await a.connect(b.peer_id) == b.peer_id
            assert a.connection(b.peer_id).path == "punched"
        finally:
            capture.drain()
            capture.close()
    decoded = tshark(capture.save(tmp_path / "punch.pcap"), tmp_path)
    kinds = [k for pkt in decoded for k in pkt.layers.get("crust.punch.kind", [])]
    assert "3" in kinds and "4" in kinds  # the echo request and its reply
    assert "1" in kinds and "2" in kinds  # probes and acks of the punch
    reply = next(pkt for pkt in decoded if pkt.layers.get("crust.punch.kind") == ["4"])
    assert reply.layers["crust.punch.ipv4"] == ["127.0.0.1"]
    assert reply.layers["crust.punch.port"] == [str(ports[2])]
    tokens = {
        t
        for pkt in decoded
        if pkt.layers.get("crust.punch.kind") in (["1"], ["2"])
        for t in pkt.layers["crust.punch.token"]
    }
    assert len(tokens) == 1  # both sides use the one token derived from both nonces


async def test_real_tcp_address_echo_is_decoded(tmp_path: Path) -> None:
    """Port prediction's TCP address echo (a header with version 0xEC; the reply names the
    address the node saw), captured from crust on loopback and decoded, not flagged."""
    cfg = crust.Config.for_testing(listen=("tcp://127.0.0.1:0",))
    async with Service(cfg) as node, Service(cfg) as a:
        port = port_of(node.contacts()[0])
        capture = LoopbackCapture([port], socket.IPPROTO_TCP)
        try:
            traversal = a._traversal
            assert traversal is not None
            local_port, seen = await traversal._tcp_echo(("127.0.0.1", port))
            assert seen == ("127.0.0.1", local_port)
        finally:
            capture.drain()
            capture.close()
    decoded = tshark(capture.save(tmp_path / "echo.pcap"), tmp_path)
    assert any(p.layers.get("crust.version") == ["236"] for p in decoded)  # the request
    reply = next(p for p in decoded if p.layers.get("crust.status") == ["3"])
    assert reply.layers["crust.punch.ipv4"] == ["127.0.0.1"]
    assert reply.layers["crust.punch.port"] == [str(local_port)]
    experts = {"crust.malformed", "crust.version.unknown", "crust.status.refused"}
    assert not [p for p in decoded if experts & p.layers.keys()]
