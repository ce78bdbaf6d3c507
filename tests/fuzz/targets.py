"""Fuzz targets: every parser and protocol machine that reads bytes from the network or disk.

Each target takes arbitrary bytes and feeds them to one parser (or drives one state
machine with them).  A :class:`crust.errors.ProtocolError` is the expected way to refuse
input and is swallowed; any other exception escapes and is a bug.  Machines that never
raise on input (a :class:`~crust.proto.session.Session`) are checked for their own
contract instead: they end with a ``Closed`` event whose error is a ``ProtocolError``.

The same targets run under atheris (``tests/fuzz/run_atheris.py``, ``scripts/fuzz``) and
under Hypothesis in the normal test suite (``tests/fuzz/test_fuzz.py``).  ``SEEDS`` holds
valid inputs for each target: the starting corpus for atheris and the inputs Hypothesis
mutates, so both reach past the first length or magic check.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

from crust.errors import LimitExceeded, ProtocolError
from crust.identity import Identity, PeerId
from crust.proto import cache, igd, natpmp, pcp, punch, stun
from crust.proto.relay import RelayLimits, RelayTable
from crust.proto.session import (
    MAX_PLAINTEXT,
    Closed,
    Session,
    SessionParams,
    echo_request,
    encode_echo_reply,
    parse_echo_reply,
)
from crust.testing.pair import FakeClock, SessionPair

Target = Callable[[bytes], None]

_IDS = (Identity.from_seed(bytes(32)), Identity.from_seed(bytes([1]) * 32))
_PARAMS = (
    SessionParams(identity=_IDS[0], network_name="fuzz"),
    SessionParams(identity=_IDS[1], network_name="fuzz"),
)


def _refused(fn: Callable[[], object]) -> None:
    """Run ``fn``; a ProtocolError is a refusal, anything else escapes."""
    with contextlib.suppress(ProtocolError):
        fn()


# ------------------------------------------------------------------------ session and noise


def _check_session(s: Session) -> None:
    """A session fed garbage is either still fine or closed because of a ProtocolError."""
    s.data_to_send()
    if s.closed:
        closed = s.closed_event
        assert isinstance(closed, Closed)
        assert closed.error is None or isinstance(closed.error, ProtocolError), closed.error


def noise_handshake(data: bytes) -> None:
    """Handshake bytes from a stranger: to a fresh responder (first byte even), or as the
    answer to an initiator's first message (odd)."""
    clock = FakeClock()
    if not data or data[0] % 2 == 0:
        s = Session(_PARAMS[1], initiator=False, now=clock.now)
    else:
        s = Session(_PARAMS[0], initiator=True, now=clock.now)
        s.data_to_send()
    s.receive_data(data[1:], clock.now)
    _check_session(s)


def _established() -> SessionPair:
    pair = SessionPair(_PARAMS[0], _PARAMS[1])
    pair.pump()
    assert pair.a.established and pair.b.established
    return pair


def session(data: bytes) -> None:
    """Bytes into an established session: raw (first byte even: records that fail to
    decrypt), or sealed as records by the real peer (odd: the frames inside are garbage,
    so frame and control parsing is what gets fuzzed).  Cut at the 0xFF bytes of the
    second byte's choosing to exercise partial records."""
    pair = _established()
    if not data:
        return
    if data[0] % 2 == 0:
        pieces = [data[1:]]
    else:
        send = pair.a._send
        assert send is not None
        pieces = []
        for start in range(1, len(data), MAX_PLAINTEXT):
            plain = data[start : start + MAX_PLAINTEXT]
            record = bytearray(2 + len(plain) + 16)
            struct.pack_into(">H", record, 0, len(plain) + 16)
            send.encrypt_into(plain, memoryview(record)[2:])
            pieces.append(bytes(record))
    stream = b"".join(pieces)
    cut = max(1, data[0] // 2)
    for pos in range(0, len(stream), cut):
        pair.b.receive_data(stream[pos : pos + cut], pair.clock.now)
        if pair.b.closed:
            break
    _check_session(pair.b)


# ------------------------------------------------------------------------------ datagrams


def stun_parse(data: bytes) -> None:
    _refused(lambda: stun.parse(data))


def punch_parse(data: bytes) -> None:
    _refused(lambda: punch.parse(data))


def connection_info(data: bytes) -> None:
    _refused(lambda: punch.PublicConnectionInfo.from_bytes(data))


def address_echo(data: bytes) -> None:
    """A TCP address echo reply (port prediction), as the asking side reads it."""
    _refused(lambda: parse_echo_reply(data))


def bootstrap_cache(data: bytes) -> None:
    def parse() -> None:
        parsed = cache.BootstrapCache.from_bytes(data, max_entries=8)
        # what was accepted survives a round trip
        again = cache.BootstrapCache.from_bytes(parsed.to_bytes(), max_entries=8)
        assert len(again) == len(parsed)

    _refused(parse)


def natpmp_response(data: bytes) -> None:
    _refused(lambda: natpmp.parse_response(data))


def pcp_response(data: bytes) -> None:
    _refused(lambda: pcp.parse_response(data))


def igd_codecs(data: bytes) -> None:
    """SSDP replies, HTTP responses, device descriptions, SOAP answers and URLs: the first
    byte picks the parser."""
    if not data:
        return
    which, body = data[0] % 6, data[1:]
    if which == 0:
        _refused(lambda: igd.parse_ssdp_response(body))
    elif which == 1:
        _refused(lambda: igd.parse_http_response(body))
    elif which == 2:
        _refused(lambda: igd.parse_xml(body))
    elif which == 3:
        _refused(lambda: igd.parse_device_description(body, "http://10.0.0.1:5000/d.xml"))
    elif which == 4:
        status = 200 if len(body) < 1 or body[0] % 2 else 500
        _refused(lambda: igd.parse_soap_response(status, body[1:], "AddPortMapping"))
    else:
        _refused(lambda: igd.parse_http_url(body.decode("utf-8", "replace")))


# ------------------------------------------------------------------------------ relay table


_OP = struct.Struct(">BBiI")


def relay_table(data: bytes) -> None:
    """A sequence of relay messages as the node's circuit table sees them: each 10-byte
    record is (operation, connection, circuit number, size/time).  The table refuses with
    ProtocolError (malformed) or LimitExceeded (over a limit; the relay answers both with a
    refusal), and its bounds hold after every step."""
    limits = RelayLimits(max_circuits=4, max_circuits_per_peer=2, window=4096, max_bytes=1 << 20)
    t = RelayTable(limits)
    now = 0.0
    for op, conn, cid, arg in _OP.iter_unpack(data[: len(data) - len(data) % _OP.size]):
        key = conn % 4
        now += (arg % 1000) / 100.0
        try:
            match op % 6:
                case 0:
                    t.open(key, cid, (key + 1 + arg % 3) % 4, now)
                case 1:
                    t.accept(key, cid)
                case 2:
                    t.route_data(key, cid, arg % (1 << 17), now)
                case 3:
                    t.route_credit(key, cid, arg % (1 << 17), now)
                case 4:
                    t.close(key, cid)
                case _:
                    t.drop(key) if arg % 2 else t.expired(now)
        except (ProtocolError, LimitExceeded):
            pass
        assert t.circuits <= limits.max_circuits
        for circuit in t._by_end.values():
            assert 0 <= circuit.a.inflight <= limits.window
            assert 0 <= circuit.b.inflight <= limits.window
            assert circuit.carried <= limits.max_bytes


# ---------------------------------------------------------------------------- the registry


TARGETS: dict[str, Target] = {
    "noise_handshake": noise_handshake,
    "session": session,
    "stun": stun_parse,
    "punch": punch_parse,
    "connection_info": connection_info,
    "address_echo": address_echo,
    "bootstrap_cache": bootstrap_cache,
    "natpmp": natpmp_response,
    "pcp": pcp_response,
    "igd": igd_codecs,
    "relay_table": relay_table,
}


def _seeds() -> dict[str, list[bytes]]:
    txid = bytes(range(12))
    token = bytes(range(16))
    peer = PeerId(bytes(_IDS[0].peer_id))
    init = Session(_PARAMS[0], initiator=True, now=0.0)
    msg1 = b"".join(init.data_to_send())
    book = cache.BootstrapCache()
    book.apply(cache.Reached("crust", peer, "tcp://192.0.2.1:5483", 1000.0))
    book.apply(cache.Reached("crust", PeerId(bytes(_IDS[1].peer_id)), "quic://[2001:db8::2]:9", 5))
    book.apply(cache.Failed("crust", peer, 1001.0))
    reply = (
        b"HTTP/1.1 200 OK\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USN: uuid:1::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"Location: http://10.0.0.1:5000/d.xml\r\n\r\n"
    )
    soap = (
        b'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        b"<s:Body><u:AddPortMappingResponse xmlns:u="
        b'"urn:schemas-upnp-org:service:WANIPConnection:1"/></s:Body></s:Envelope>'
    )
    device = (
        b'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device>'
        b"<deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:1</deviceType>"
        b"<serviceList><service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1"
        b"</serviceType><controlURL>/ctl</controlURL></service></serviceList>"
        b"</device></root>"
    )
    pcp_map = (
        struct.pack("!BBBBII", 2, 0x81, 0, 0, 7200, 5)
        + bytes(12)
        + bytes(range(1, 13))
        + struct.pack("!B3xHH", 6, 4000, 4000)
        + pcp.address_to_bytes("198.18.0.10")
    )
    return {
        "noise_handshake": [
            b"\x00" + msg1,
            b"\x01" + bytes(100),
            b"\x00" + echo_request(_PARAMS[0].network_name),
        ],
        "session": [b"\x01" + bytes(40), b"\x00" + bytes(60), b"\x07" + b"\x01\x02" * 30],
        "stun": [
            stun.encode(stun.request(txid, software="crust")),
            stun.encode(
                stun.StunMessage(
                    stun.StunClass.SUCCESS, txid, xor_mapped_address=("198.51.100.7", 40000)
                )
            ),
        ],
        "punch": [
            punch.encode(punch.Kind.ECHO_REQUEST, token),
            punch.encode(punch.Kind.ECHO_REPLY, token, ("203.0.113.5", 5000)),
        ],
        "connection_info": [
            punch.PublicConnectionInfo(
                peer, ("quic://198.51.100.1:5000", "tcp://[2001:db8::1]:5000"), token
            ).to_bytes(),
            punch.PublicConnectionInfo(
                peer,
                ("quic://198.51.100.1:5000",),
                token,
                ("quic://198.51.100.1:20001", "tcp://198.51.100.1:30001"),
            ).to_bytes(),
        ],
        "address_echo": [
            encode_echo_reply(("198.51.100.1", 20001)),
            encode_echo_reply(("2001:db8::1", 30001)),
        ],
        "bootstrap_cache": [book.to_bytes()],
        "natpmp": [
            struct.pack("!BBHI4s", 0, 128, 0, 77, bytes([198, 51, 100, 9])),
            struct.pack("!BBHIHHI", 0, 130, 0, 77, 4000, 4001, 3600),
        ],
        "pcp": [pcp_map],
        "igd": [b"\x00" + reply, b"\x03" + device, b"\x04\x01" + soap, b"\x05http://a:1/x"],
        "relay_table": [
            _OP.pack(0, 0, 7, 0)
            + _OP.pack(1, 1, 1, 0)
            + _OP.pack(2, 0, 7, 100)
            + _OP.pack(3, 1, 1, 100)
        ],
    }


SEEDS: dict[str, list[bytes]] = _seeds()
