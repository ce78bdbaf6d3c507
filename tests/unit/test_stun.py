"""STUN codec, client transaction and responder (sans-IO, fake clock), cross-checked with aioice."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from typing import Any

import pytest
from aioice import stun as aioice_stun
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.errors import InvalidArgument, ProtocolError
from crust.proto import stun
from crust.proto.stun import (
    BINDING,
    MAX_MESSAGE_SIZE,
    Address,
    Attr,
    BindingTransaction,
    ChangeRequest,
    ErrorCode,
    ResponderAddresses,
    StunClass,
    StunErrorResponse,
    StunMessage,
    StunResponder,
    StunTimeout,
)

TXID = bytes(range(1, 13))
SERVER: Address = ("198.51.100.1", 3478)
CLIENT: Address = ("203.0.113.9", 40000)

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
addresses = st.tuples(st.one_of(ipv4, ipv6), ports)
txids = st.binary(min_size=12, max_size=12)
short_text = st.text(max_size=40)


@st.composite
def messages(draw: st.DrawFn) -> StunMessage:
    cls = draw(st.sampled_from(list(StunClass)))
    error = None
    if cls == StunClass.ERROR:
        error = ErrorCode(draw(st.integers(300, 699)), draw(short_text))
    return StunMessage(
        cls=cls,
        transaction_id=draw(txids),
        method=draw(st.integers(0, 0xFFF)),
        mapped_address=draw(st.none() | addresses),
        xor_mapped_address=draw(st.none() | addresses),
        response_origin=draw(st.none() | addresses),
        other_address=draw(st.none() | addresses),
        change_request=draw(st.none() | st.builds(ChangeRequest, st.booleans(), st.booleans())),
        response_port=draw(st.none() | ports),
        padding=draw(st.none() | st.integers(0, 64)),
        software=draw(st.none() | short_text),
        username=draw(st.none() | short_text),
        error=error,
        unknown_attributes=draw(
            st.none() | st.lists(st.integers(0, 0xFFFF), max_size=5).map(tuple)
        ),
        fingerprint=draw(st.booleans()),
    )


def header(mtype: int, body: bytes, txid: bytes = TXID) -> bytes:
    return struct.pack("!HH", mtype, len(body)) + stun.COOKIE_BYTES + txid + body


def attr(atype: int, value: bytes) -> bytes:
    return struct.pack("!HH", atype, len(value)) + value + bytes(-len(value) % 4)


# --------------------------------------------------------------------------------------------
# Message type and quick check
# --------------------------------------------------------------------------------------------


def test_message_type_values() -> None:
    assert stun.encode_type(BINDING, StunClass.REQUEST) == 0x0001
    assert stun.encode_type(BINDING, StunClass.INDICATION) == 0x0011
    assert stun.encode_type(BINDING, StunClass.SUCCESS) == 0x0101
    assert stun.encode_type(BINDING, StunClass.ERROR) == 0x0111
    assert stun.encode_type(0xFFF, StunClass.ERROR) == 0x3FFF
    with pytest.raises(InvalidArgument):
        stun.encode_type(0x1000, StunClass.REQUEST)


@given(st.integers(0, 0xFFF), st.sampled_from(list(StunClass)))
def test_message_type_roundtrip(method: int, cls: StunClass) -> None:
    t = stun.encode_type(method, cls)
    assert t < 0x4000
    assert stun.decode_type(t) == (method, cls)


@given(messages())
def test_is_stun_accepts_every_message_we_encode(msg: StunMessage) -> None:
    data = stun.encode(msg)
    assert stun.is_stun(data)
    # ... and never a QUIC packet: long header (0x80) or short header with the fixed bit (0x40)
    for first in (data[0] | 0x40, data[0] | 0x80):
        assert not stun.is_stun(bytes([first]) + data[1:])


@given(st.binary(min_size=1, max_size=1500))
def test_is_stun_rejects_quic_first_bytes(data: bytes) -> None:
    if data[0] & 0xC0:
        assert not stun.is_stun(data)


def test_is_stun_checks_cookie_and_length() -> None:
    data = stun.encode(stun.request(TXID))
    assert stun.is_stun(data)
    assert not stun.is_stun(data[:-4])  # length field no longer matches
    assert not stun.is_stun(data[:4] + b"\0\0\0\0" + data[8:])  # no magic cookie
    assert not stun.is_stun(data[:19])


# --------------------------------------------------------------------------------------------
# Round trips and strict parsing
# --------------------------------------------------------------------------------------------


@given(messages())
def test_encode_parse_roundtrip(msg: StunMessage) -> None:
    data = stun.encode(msg)
    assert len(data) % 4 == 0
    back = stun.parse(data)
    assert back == msg


@given(messages(), st.binary(min_size=1, max_size=32))
def test_message_integrity_roundtrip(msg: StunMessage, key: bytes) -> None:
    for kind in ("sha1", "sha256"):
        back = stun.parse(stun.encode(msg, integrity_key=key, integrity=kind))
        assert back.integrity == kind
        assert back.check_integrity(key)
        assert not back.check_integrity(key + b"x")
    assert not stun.parse(stun.encode(msg)).check_integrity(key)


@settings(max_examples=400)
@given(st.binary(max_size=1400))
def test_parse_any_bytes_raises_only_protocol_error(data: bytes) -> None:
    try:
        msg = stun.parse(data)
    except ProtocolError:
        return
    assert stun.is_stun(data)  # what parses also passes the quick check
    assert msg.transaction_id == data[8:20]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """Valid messages with attribute bodies, lengths or bytes changed (reaches deep paths)."""
    data = bytearray(stun.encode(draw(messages()), integrity_key=draw(st.none() | st.just(b"k"))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 2))
        if op == 0 and len(data) > 20:
            i = draw(st.integers(20, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data = data[: draw(st.integers(0, len(data)))]
            if len(data) >= 4:
                data[2:4] = (max(len(data) - 20, 0) & ~3).to_bytes(2, "big")
        else:
            extra = attr(draw(st.integers(0, 0xFFFF)), draw(st.binary(max_size=24)))
            data += extra
            if len(data) >= 20:
                data[2:4] = (len(data) - 20).to_bytes(2, "big")
    return bytes(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_parse_mutated_messages_raises_only_protocol_error(data: bytes) -> None:
    try:
        msg = stun.parse(data)
    except ProtocolError:
        return
    stun.encode(msg)  # whatever parses can be re-encoded


def test_parse_rejects_malformed_headers() -> None:
    ok = stun.encode(stun.request(TXID))
    with pytest.raises(ProtocolError, match="short"):
        stun.parse(ok[:19])
    with pytest.raises(ProtocolError, match="top bits"):
        stun.parse(b"\x40" + ok[1:])
    with pytest.raises(ProtocolError, match="cookie"):
        stun.parse(ok[:4] + b"\x00\x00\x00\x00" + ok[8:])
    with pytest.raises(ProtocolError, match="length"):
        stun.parse(ok + b"\0\0\0\0")
    with pytest.raises(ProtocolError, match="length"):
        stun.parse(header(0x0001, b"\0\0\0")[:-3] + b"\0\0\0" + b"\0")  # length 3: not /4
    with pytest.raises(ProtocolError, match="too long"):
        stun.parse(header(0x0001, attr(Attr.PADDING, bytes(MAX_MESSAGE_SIZE))))


def test_parse_rejects_bad_attributes() -> None:
    with pytest.raises(ProtocolError, match="overruns"):
        stun.parse(header(0x0101, struct.pack("!HH", Attr.SOFTWARE, 8) + b"abcd"))
    with pytest.raises(ProtocolError, match="length"):  # IPv4 family, IPv6 length
        stun.parse(header(0x0101, attr(Attr.XOR_MAPPED_ADDRESS, b"\0\x01" + bytes(18))))
    with pytest.raises(ProtocolError, match="family"):
        stun.parse(header(0x0101, attr(Attr.MAPPED_ADDRESS, b"\0\x03" + bytes(6))))
    with pytest.raises(ProtocolError, match="ERROR-CODE"):
        stun.parse(header(0x0111, attr(Attr.ERROR_CODE, b"\0\0\x07\x00")))
    with pytest.raises(ProtocolError, match="CHANGE-REQUEST"):
        stun.parse(header(0x0001, attr(Attr.CHANGE_REQUEST, b"\0\0\0\0\0")))
    with pytest.raises(ProtocolError, match="USERNAME"):
        stun.parse(header(0x0001, attr(Attr.USERNAME, b"\xff\xfe")))
    with pytest.raises(ProtocolError, match="UNKNOWN-ATTRIBUTES"):
        stun.parse(header(0x0111, attr(Attr.UNKNOWN_ATTRIBUTES, b"\0\x01\0")))


def test_fingerprint_is_checked_and_must_be_last() -> None:
    data = bytearray(stun.encode(stun.request(TXID, software="x")))
    assert stun.parse(bytes(data)).fingerprint
    expected = (zlib.crc32(bytes(data[:-8])) ^ 0x5354554E) & 0xFFFFFFFF
    assert int.from_bytes(data[-4:], "big") == expected
    data[-1] ^= 1
    with pytest.raises(ProtocolError, match="FINGERPRINT mismatch"):
        stun.parse(bytes(data))
    body = attr(Attr.FINGERPRINT, b"\0\0\0\0") + attr(Attr.SOFTWARE, b"late")
    with pytest.raises(ProtocolError, match="last"):
        stun.parse(header(0x0001, body))


def test_attributes_after_message_integrity_are_ignored() -> None:
    key = b"secret"
    data = stun.encode(stun.request(TXID, software="before"), integrity_key=key)
    # Insert an attribute after MESSAGE-INTEGRITY (before FINGERPRINT): it is ignored, and the
    # integrity still verifies (it covers only what precedes it).
    body = data[20:-8] + attr(Attr.RESPONSE_PORT, b"\x12\x34\0\0")
    msg = stun.parse(header(0x0001, body))
    assert msg.software == "before"
    assert msg.response_port is None
    assert msg.check_integrity(key)


def test_unknown_attributes_and_duplicates() -> None:
    body = (
        attr(Attr.SOFTWARE, b"first")
        + attr(Attr.SOFTWARE, b"second")
        + attr(0x7777, b"req")  # comprehension-required, unknown
        + attr(0xC001, b"opt")  # comprehension-optional, unknown: ignored
    )
    msg = stun.parse(header(0x0001, body))
    assert msg.software == "first"
    assert msg.unknown_required == (0x7777,)


@pytest.mark.parametrize(
    ("addr", "family", "size"), [(("192.0.2.33", 32853), 1, 8), (("2001:db8::e1", 32853), 2, 20)]
)
def test_xor_mapped_address_wire_form(addr: Address, family: int, size: int) -> None:
    msg = StunMessage(StunClass.SUCCESS, TXID, xor_mapped_address=addr)
    data = stun.encode(msg)
    atype, alen = struct.unpack_from("!HH", data, 20)
    assert (atype, alen) == (Attr.XOR_MAPPED_ADDRESS, size)
    value = data[24 : 24 + alen]
    assert value[1] == family
    assert int.from_bytes(value[2:4], "big") == addr[1] ^ 0x2112
    # the address is xored with the cookie (and the transaction id for IPv6)
    assert stun.parse(data).xor_mapped_address == addr


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.REQUEST, b"short"))
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.SUCCESS, TXID, xor_mapped_address=("nope", 1)))
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.SUCCESS, TXID, xor_mapped_address=("1.2.3.4", 70000)))
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.REQUEST, TXID, software="x" * 800))
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.REQUEST, TXID, padding=MAX_MESSAGE_SIZE))
    with pytest.raises(InvalidArgument):
        stun.encode(StunMessage(StunClass.ERROR, TXID, error=ErrorCode(200)))
    with pytest.raises(InvalidArgument):
        stun.encode(stun.request(TXID), integrity_key=b"k", integrity="md5")


# --------------------------------------------------------------------------------------------
# Cross-check with aioice's independent codec
# --------------------------------------------------------------------------------------------


@st.composite
def aioice_comparable(draw: st.DrawFn, family: st.SearchStrategy[str]) -> StunMessage:
    cls = draw(st.sampled_from([StunClass.REQUEST, StunClass.SUCCESS, StunClass.ERROR]))
    addr = st.tuples(family, ports)
    return StunMessage(
        cls=cls,
        transaction_id=draw(txids),
        mapped_address=draw(st.none() | addr),
        xor_mapped_address=draw(st.none() | addr),
        response_origin=draw(st.none() | addr),
        other_address=draw(st.none() | addr),
        change_request=draw(st.none() | st.builds(ChangeRequest, st.booleans(), st.booleans())),
        software=draw(st.none() | short_text),
        username=draw(st.none() | short_text),
        error=ErrorCode(draw(st.integers(300, 699)), draw(short_text))
        if cls == StunClass.ERROR
        else None,
        fingerprint=draw(st.booleans()),
    )


AIOICE_CLASS = {
    StunClass.REQUEST: aioice_stun.Class.REQUEST,
    StunClass.SUCCESS: aioice_stun.Class.RESPONSE,
    StunClass.ERROR: aioice_stun.Class.ERROR,
}


def as_aioice_attributes(msg: StunMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if msg.mapped_address is not None:
        out["MAPPED-ADDRESS"] = msg.mapped_address
    if msg.xor_mapped_address is not None:
        out["XOR-MAPPED-ADDRESS"] = msg.xor_mapped_address
    if msg.response_origin is not None:
        out["RESPONSE-ORIGIN"] = msg.response_origin
    if msg.other_address is not None:
        out["OTHER-ADDRESS"] = msg.other_address
    if msg.change_request is not None:
        cr = msg.change_request
        out["CHANGE-REQUEST"] = (4 if cr.change_ip else 0) | (2 if cr.change_port else 0)
    if msg.username is not None:
        out["USERNAME"] = msg.username
    if msg.error is not None:
        out["ERROR-CODE"] = (msg.error.code, msg.error.reason)
    if msg.software is not None:
        out["SOFTWARE"] = msg.software
    return out


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@given(data=st.data())
def test_aioice_parses_what_we_encode(family: str, data: st.DataObject) -> None:
    msg = data.draw(aioice_comparable(ipv4 if family == "ipv4" else ipv6))
    theirs = aioice_stun.parse_message(stun.encode(msg))
    assert theirs.message_method == aioice_stun.Method.BINDING
    assert theirs.message_class == AIOICE_CLASS[msg.cls]
    assert theirs.transaction_id == msg.transaction_id
    attrs = dict(theirs.attributes)
    has_fingerprint = attrs.pop("FINGERPRINT", None) is not None  # aioice verified the CRC
    assert has_fingerprint == msg.fingerprint
    assert attrs == as_aioice_attributes(msg)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@given(data=st.data(), key=st.none() | st.binary(min_size=1, max_size=20))
def test_we_parse_what_aioice_encodes(family: str, data: st.DataObject, key: bytes | None) -> None:
    msg = data.draw(aioice_comparable(ipv4 if family == "ipv4" else ipv6))
    theirs = aioice_stun.Message(
        aioice_stun.Method.BINDING,
        AIOICE_CLASS[msg.cls],
        transaction_id=msg.transaction_id,
        attributes=as_aioice_attributes(msg),
    )
    if key is not None:
        theirs.add_message_integrity(key)
    elif msg.fingerprint:
        theirs.add_fingerprint()
    ours = stun.parse(bytes(theirs))
    expected = msg if key is None else replace(msg, fingerprint=True, integrity="sha1")
    assert ours == expected
    if key is not None:
        assert ours.integrity == "sha1"
        assert ours.check_integrity(key)


def test_aioice_verifies_our_message_integrity() -> None:
    data = stun.encode(stun.request(TXID, username="alice:bob"), integrity_key=b"pw")
    theirs = aioice_stun.parse_message(data)
    assert theirs.check_message_integrity(b"pw")
    assert not theirs.check_message_integrity(b"other")


# --------------------------------------------------------------------------------------------
# Client transaction (fake clock)
# --------------------------------------------------------------------------------------------


def success(txid: bytes = TXID, mapped: Address = CLIENT, **kw: Any) -> StunMessage:
    return StunMessage(StunClass.SUCCESS, txid, xor_mapped_address=mapped, **kw)


def run_until_done(tx: BindingTransaction, start: float = 0.0, limit: float = 100.0) -> list[float]:
    """Drive the transaction by its timer alone; returns the transmission times."""
    sent: list[float] = []
    now = start
    while not tx.done and now <= limit:
        tx.handle_timer(now)
        sent += [now for _ in tx.datagrams_to_send(now)]
        at = tx.get_timer()
        if at is None:
            break
        assert at >= now
        now = at
    return sent


def test_retransmission_schedule_rfc8489() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    sent = run_until_done(tx)
    # RFC 8489 6.2.1: RTO 500 ms, Rc = 7, Rm = 16 -> 0, 0.5, 1.5, ... 31.5; failure at 39.5 s
    assert sent == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert isinstance(tx.error, StunTimeout)
    assert tx.transmissions == 7
    event = tx.next_event()
    assert event is not None
    assert event.error is tx.error
    assert tx.next_event() is None


def test_retransmission_schedule_with_custom_parameters() -> None:
    tx = BindingTransaction(TXID, SERVER, 10.0, rto=0.1, rc=3, rm=4)
    sent = run_until_done(tx, start=10.0)
    assert [round(t - 10.0, 6) for t in sent] == [0.0, 0.1, 0.3]
    assert tx.get_timer() is None
    assert isinstance(tx.error, StunTimeout)


def test_nothing_sent_before_due() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    assert len(tx.datagrams_to_send(0.0)) == 1
    assert tx.datagrams_to_send(0.49) == []
    assert tx.get_timer() == 0.5
    assert len(tx.datagrams_to_send(0.5)) == 1


def test_request_wire_form() -> None:
    tx = BindingTransaction(
        TXID, SERVER, 0.0, change_request=ChangeRequest(True, False), response_port=5000
    )
    ((data, dest),) = tx.datagrams_to_send(0.0)
    assert dest == SERVER
    msg = stun.parse(data)
    assert (msg.cls, msg.method, msg.transaction_id) == (StunClass.REQUEST, BINDING, TXID)
    assert msg.change_request == ChangeRequest(True, False)
    assert msg.response_port == 5000
    assert msg.fingerprint


def test_success_stops_retransmissions_and_measures_rtt() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    tx.datagrams_to_send(0.0)
    tx.datagrams_to_send(0.5)  # one retransmission
    other = ("192.0.2.7", 3479)
    assert tx.receive(
        success(response_origin=other, other_address=("192.0.2.8", 3479)), other, 0.62
    )
    assert tx.done
    assert tx.result is not None
    assert tx.result.mapped == CLIENT
    assert tx.result.source == other
    assert tx.result.response_origin == other
    assert tx.result.other_address == ("192.0.2.8", 3479)
    assert tx.result.rtt == pytest.approx(0.12)
    assert tx.result.transmissions == 2
    assert tx.get_timer() is None
    assert tx.datagrams_to_send(100.0) == []
    event = tx.next_event()
    assert event is not None
    assert event.result == tx.result
    assert tx.receive(success(mapped=("1.1.1.1", 1)), SERVER, 0.7)  # late duplicate: ours ...
    assert tx.result.mapped == CLIENT  # ... but ignored


def test_mapped_address_fallback_for_old_servers() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    msg = StunMessage(StunClass.SUCCESS, TXID, mapped_address=("192.0.2.1", 1234))
    assert tx.receive(msg, SERVER, 0.1)
    assert tx.result is not None
    assert tx.result.mapped == ("192.0.2.1", 1234)


def test_foreign_messages_are_not_consumed() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    assert not tx.receive(success(txid=bytes(12)), SERVER, 0.1)
    assert not tx.receive(StunMessage(StunClass.SUCCESS, TXID, method=0x003), SERVER, 0.1)
    assert not tx.receive(StunMessage(StunClass.REQUEST, TXID), SERVER, 0.1)
    assert not tx.done


def test_error_response_fails_with_code() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    err = StunMessage(
        StunClass.ERROR,
        TXID,
        error=ErrorCode(420, "Unknown Attribute"),
        unknown_attributes=(Attr.CHANGE_REQUEST,),
    )
    assert tx.receive(err, SERVER, 0.1)
    assert isinstance(tx.error, StunErrorResponse)
    assert tx.error.code == 420
    assert tx.error.unknown_attributes == (3,)
    assert "420" in str(tx.error)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (StunMessage(StunClass.ERROR, TXID), "without ERROR-CODE"),
        (StunMessage(StunClass.SUCCESS, TXID), "without a mapped address"),
        (
            StunMessage(
                StunClass.SUCCESS, TXID, xor_mapped_address=CLIENT, unknown_required=(0x7F00,)
            ),
            "comprehension-required",
        ),
    ],
)
def test_bad_responses_fail_with_protocol_error(msg: StunMessage, match: str) -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    assert tx.receive(msg, SERVER, 0.1)
    assert isinstance(tx.error, ProtocolError)
    assert match in str(tx.error)


def test_integrity_protected_transaction_ignores_unauthenticated_responses() -> None:
    key = b"short-term"
    tx = BindingTransaction(TXID, SERVER, 0.0, username="u", integrity_key=key)
    ((data, _),) = tx.datagrams_to_send(0.0)
    assert stun.parse(data).check_integrity(key)
    forged = stun.parse(stun.encode(success(), integrity_key=b"wrong"))
    assert tx.receive(forged, SERVER, 0.1)
    assert not tx.done  # ignored; retransmissions continue
    assert tx.get_timer() == 0.5
    genuine = stun.parse(stun.encode(success(), integrity_key=key))
    assert tx.receive(genuine, SERVER, 0.2)
    assert tx.result is not None


def test_cancel_and_bad_parameters() -> None:
    tx = BindingTransaction(TXID, SERVER, 0.0)
    tx.cancel(StunTimeout("caller gave up"))
    assert isinstance(tx.error, StunTimeout)
    assert tx.get_timer() is None
    for kw in ({"rto": 0.0}, {"rc": 0}, {"rm": 0}):
        with pytest.raises(InvalidArgument):
            BindingTransaction(TXID, SERVER, 0.0, **kw)


# --------------------------------------------------------------------------------------------
# Responder
# --------------------------------------------------------------------------------------------

P1: Address = ("198.51.100.1", 3478)
P2: Address = ("198.51.100.1", 3479)
A1: Address = ("198.51.100.2", 3478)
A2: Address = ("198.51.100.2", 3479)
GRID = ResponderAddresses(P1, A2)


def ask(
    responder: StunResponder,
    now: float = 0.0,
    local: Address | None = P1,
    source: Address = CLIENT,
    **kw: Any,
) -> tuple[stun.Reply, StunMessage]:
    data = stun.encode(stun.request(TXID, **kw))
    reply = responder.handle(data, source, local, now)
    assert reply is not None
    return reply, stun.parse(reply.data)


def test_responder_answers_binding() -> None:
    r = StunResponder(software="crust test")
    reply, msg = ask(r)
    assert reply.destination == CLIENT
    assert reply.source is None  # the socket it arrived on
    assert (msg.cls, msg.method, msg.transaction_id) == (StunClass.SUCCESS, BINDING, TXID)
    assert msg.xor_mapped_address == CLIENT
    assert msg.mapped_address is None
    assert msg.response_origin == P1
    assert msg.other_address is None
    assert msg.software == "crust test"
    assert msg.fingerprint
    assert r.stats["responses"] == 1


def test_responder_omits_response_origin_for_wildcard_sockets() -> None:
    _, msg = ask(StunResponder(), local=("0.0.0.0", 3478))
    assert msg.response_origin is None
    _, msg = ask(StunResponder(), local=None, source=("2001:db8::5", 999))
    assert msg.xor_mapped_address == ("2001:db8::5", 999)


@pytest.mark.parametrize(
    ("local", "change", "origin"),
    [
        (P1, ChangeRequest(False, False), P1),
        (P1, ChangeRequest(True, True), A2),
        (P1, ChangeRequest(False, True), P2),
        (P1, ChangeRequest(True, False), A1),
        (A2, ChangeRequest(True, True), P1),
        (P2, ChangeRequest(True, False), A2),
    ],
)
def test_responder_change_request(local: Address, change: ChangeRequest, origin: Address) -> None:
    reply, msg = ask(StunResponder(GRID), local=local, change_request=change)
    assert reply.source == origin
    assert msg.response_origin == origin
    # OTHER-ADDRESS: the endpoint with the other IP and the other port than the one asked
    other_ip = A1[0] if local[0] == P1[0] else P1[0]
    other_port = P2[1] if local[1] == P1[1] else P1[1]
    assert msg.other_address == (other_ip, other_port)


def test_responder_without_alternate_refuses_change_request() -> None:
    reply, msg = ask(StunResponder(), change_request=ChangeRequest(False, True))
    assert reply.destination == CLIENT
    assert msg.cls == StunClass.ERROR
    assert msg.error == ErrorCode(420, "Unknown Attribute")
    assert msg.unknown_attributes == (Attr.CHANGE_REQUEST,)
    _, ok = ask(StunResponder(), change_request=ChangeRequest(False, False))
    assert ok.cls == StunClass.SUCCESS


def test_responder_unknown_required_attribute_and_other_methods() -> None:
    r = StunResponder()
    data = header(0x0001, attr(0x7ABC, b"?") + attr(0xC0DE, b"optional"))
    reply = r.handle(data, CLIENT, P1, 0.0)
    assert reply is not None
    msg = stun.parse(reply.data)
    assert msg.error is not None
    assert msg.error.code == 420
    assert msg.unknown_attributes == (0x7ABC,)
    allocate = stun.encode(StunMessage(StunClass.REQUEST, TXID, method=0x003))
    reply = r.handle(allocate, CLIENT, P1, 0.0)
    assert reply is not None
    msg = stun.parse(reply.data)
    assert msg.error is not None
    assert msg.error.code == 400
    assert msg.method == 0x003
    assert r.stats["errors_sent"] == 2


def test_responder_drops_non_requests_and_garbage() -> None:
    r = StunResponder()
    for cls in (StunClass.INDICATION, StunClass.SUCCESS, StunClass.ERROR):
        assert r.handle(stun.encode(StunMessage(cls, TXID)), CLIENT, P1, 0.0) is None
    assert r.handle(b"\xc0" + bytes(40), CLIENT, P1, 0.0) is None
    bad = bytearray(stun.encode(stun.request(TXID)))
    bad[-1] ^= 0xFF  # fingerprint broken
    assert r.handle(bytes(bad), CLIENT, P1, 0.0) is None
    assert r.stats == {
        "requests": 0,
        "responses": 0,
        "errors_sent": 0,
        "not_stun": 1,
        "malformed": 1,
        "ignored": 3,
        "rate_limited": 0,
    }


def test_responder_response_port_and_padding() -> None:
    reply, msg = ask(StunResponder(), response_port=5555)
    assert reply.destination == (CLIENT[0], 5555)
    assert msg.xor_mapped_address == CLIENT
    reply, msg = ask(StunResponder(), response_port=0)
    assert msg.error is not None
    assert msg.error.code == 400
    reply, msg = ask(StunResponder(allow_response_port=False), response_port=5555)
    assert msg.unknown_attributes == (Attr.RESPONSE_PORT,)
    request_size = len(stun.encode(stun.request(TXID, padding=400)))
    reply, msg = ask(StunResponder(), padding=400)
    assert msg.padding is not None
    assert len(reply.data) == request_size  # padded like the request, never larger


def test_responder_rate_limit() -> None:
    r = StunResponder(rate=10.0, burst=5)
    answered = [r.handle(stun.encode(stun.request(TXID)), CLIENT, P1, 0.0) for _ in range(8)]
    assert sum(a is not None for a in answered) == 5
    assert r.stats["rate_limited"] == 3
    assert r.handle(stun.encode(stun.request(TXID)), CLIENT, P1, 0.05) is None  # half a token
    assert r.handle(stun.encode(stun.request(TXID)), CLIENT, P1, 0.2) is not None
    with pytest.raises(InvalidArgument):
        StunResponder(rate=0)


@settings(max_examples=300)
@given(st.binary(max_size=1400) | mutated())
def test_responder_never_raises_and_never_amplifies_much(data: bytes) -> None:
    r = StunResponder(GRID, software="crust")
    reply = r.handle(data, CLIENT, P1, 0.0)
    if reply is not None:
        assert len(reply.data) <= max(len(data), 20) + 128
        assert reply.destination[0] == CLIENT[0]


def test_responder_addresses_validation() -> None:
    with pytest.raises(InvalidArgument):
        ResponderAddresses(P1, P2)  # same IP
    with pytest.raises(InvalidArgument):
        ResponderAddresses(P1, A1)  # same port
    assert GRID.endpoints() == [P1, P2, A1, A2]
    assert GRID.index(("198.51.100.2", 3479)) == (1, 1)
    assert GRID.index(("198.51.100.9", 3478)) is None


def test_stun_errors_are_crust_errors() -> None:
    from crust.errors import CrustError

    assert issubclass(StunErrorResponse, ProtocolError)
    assert issubclass(StunTimeout, TimeoutError)
    assert issubclass(StunTimeout, CrustError)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1400) | mutated())
def test_dispatcher_never_raises_on_received_datagrams(data: bytes) -> None:
    """The asyncio dispatcher (no socket: a send function) swallows anything a remote sends."""
    import asyncio

    from crust.aio.stun import StunDispatcher

    sent: list[tuple[bytes, Address]] = []

    async def feed() -> bool:
        d = StunDispatcher(
            lambda b, a: sent.append((b, a)), local_address=P1, responder=StunResponder()
        )
        try:
            return d.datagram_received(data, CLIENT)
        finally:
            d.close()

    claimed = asyncio.run(feed())
    assert claimed == stun.is_stun(data)
    for reply, dest in sent:
        assert dest[0] == CLIENT[0]
        assert stun.parse(reply).transaction_id == data[8:20]
