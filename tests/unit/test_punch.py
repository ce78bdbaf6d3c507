"""proto/punch.py: datagrams, connection info, candidates and the punch schedule (fake clock)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crust import errors
from crust.identity import Identity
from crust.proto import punch as pp

TOKEN = bytes(range(16))


def test_datagrams_round_trip() -> None:
    for kind in (pp.Kind.PROBE, pp.Kind.ACK, pp.Kind.ECHO_REQUEST):
        d = pp.parse(pp.encode(kind, TOKEN))
        assert (d.kind, d.token, d.address) == (kind, TOKEN, None)
    for addr in (("198.18.0.10", 7100), ("2001:db8::1", 65535)):
        d = pp.parse(pp.encode(pp.Kind.ECHO_REPLY, TOKEN, addr))
        assert d.address == addr


def test_echo_request_is_never_smaller_than_its_reply() -> None:
    request = pp.encode(pp.Kind.ECHO_REQUEST, TOKEN)
    reply = pp.encode(pp.Kind.ECHO_REPLY, TOKEN, ("2001:db8::1", 1))
    assert len(request) >= len(reply)


def test_punch_datagrams_are_neither_quic_nor_stun() -> None:
    data = pp.encode(pp.Kind.PROBE, TOKEN)
    assert not data[0] & 0x40  # QUIC's fixed bit is clear
    assert data[4:8] != bytes.fromhex("2112a442")  # not STUN's magic cookie


@pytest.mark.parametrize(
    "data",
    [
        b"",
        pp.MAGIC,
        pp.MAGIC + b"\x09" + TOKEN,  # unknown kind
        pp.encode(pp.Kind.PROBE, TOKEN) + b"x",  # trailing
        pp.MAGIC + b"\x03" + TOKEN,  # echo request without padding
        pp.MAGIC + b"\x04" + TOKEN + b"\x04\x00\x00" + bytes(4),  # port 0
        pp.MAGIC + b"\x04" + TOKEN + b"\x05\x00\x01" + bytes(4),  # family 5
    ],
)
def test_malformed_datagrams(data: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        pp.parse(data)


@given(st.binary(max_size=80))
def test_any_bytes_parse_or_protocol_error(data: bytes) -> None:
    for candidate in (data, pp.MAGIC + data):
        with contextlib.suppress(errors.ProtocolError):
            pp.parse(candidate)


@given(st.binary(max_size=300))
def test_any_bytes_as_connection_info(data: bytes) -> None:
    try:
        info = pp.PublicConnectionInfo.from_bytes(data)
    except errors.ProtocolError:
        return
    assert len(info.candidates) <= pp.MAX_CANDIDATES


def test_connection_info_round_trip_and_cleaning() -> None:
    pid = Identity.generate().peer_id
    info = pp.PublicConnectionInfo(pid, ("quic://198.18.0.10:7100", "tcp://10.1.0.2:7101"), TOKEN)
    assert pp.PublicConnectionInfo.from_bytes(info.to_bytes()) == info
    import msgpack

    dirty = msgpack.packb(
        {
            "v": 1,
            "id": bytes(pid),
            "n": TOKEN,
            "c": [
                "quic://198.18.0.10:7100",
                "quic://198.18.0.10:7100",  # duplicate
                "tcp://example.com:1",  # a name
                "tcp://0.0.0.0:5",  # wildcard
                "quic://224.0.0.1:5",  # multicast
                7,
                "garbage",
                *[f"tcp://198.18.0.1:{p}" for p in range(1, 40)],
            ],
        }
    )
    got = pp.PublicConnectionInfo.from_bytes(dirty)
    assert got.candidates[0] == "quic://198.18.0.10:7100"
    assert len(got.candidates) == pp.MAX_CANDIDATES
    assert not any("example" in c or "0.0.0.0" in c or "224." in c for c in got.candidates)
    with pytest.raises(errors.ProtocolError, match="too large"):
        pp.PublicConnectionInfo.from_bytes(bytes(pp.MAX_INFO_BYTES + 1))


def test_shared_token_is_symmetric_and_distinct() -> None:
    a, b = bytes(16), bytes([1] * 16)
    assert pp.shared_token(a, b) == pp.shared_token(b, a)
    assert pp.shared_token(a, b) != pp.shared_token(a, bytes([2] * 16))


def plan(dialer: bool = True, **kw: object) -> pp.PunchPlan:
    return pp.PunchPlan(
        token=TOKEN,
        tcp=[("198.18.0.11", 7200)],
        quic=[("198.18.0.11", 7201), ("10.2.0.2", 7201)],
        start=100.0,
        dialer=dialer,
        **kw,  # type: ignore[arg-type]
    )


def test_nothing_before_the_start_then_probes_and_tcp() -> None:
    p = plan()
    assert p.get_timer() == 100.0
    assert p.actions() == []
    p.handle_timer(100.0)
    acts = p.actions()
    probes = [a for a in acts if isinstance(a, pp.SendProbe)]
    assert {a.address for a in probes} == {("198.18.0.11", 7201), ("10.2.0.2", 7201)}
    assert [a for a in acts if isinstance(a, pp.DialTcp)] == [pp.DialTcp(("198.18.0.11", 7200))]
    assert p.get_timer() == pytest.approx(100.05)
    p.handle_timer(100.05)
    assert not any(isinstance(a, pp.DialTcp) for a in p.actions())  # TCP retries every 2 s
    p.handle_timer(102.0)
    assert any(isinstance(a, pp.DialTcp) for a in p.actions())


def test_probe_gets_an_ack_and_the_dialer_dials_once() -> None:
    p = plan(dialer=True)
    p.handle_timer(100.0)
    p.actions()
    probe = pp.parse(pp.encode(pp.Kind.PROBE, TOKEN))
    p.datagram_received(probe, ("198.18.0.11", 40000), 100.01)
    acts = p.actions()
    assert pp.SendProbe(("198.18.0.11", 40000), pp.encode(pp.Kind.ACK, TOKEN)) in acts
    assert pp.DialQuic(("198.18.0.11", 40000)) in acts
    p.datagram_received(probe, ("198.18.0.11", 40000), 100.02)
    assert pp.DialQuic(("198.18.0.11", 40000)) not in p.actions()  # once per address


def test_foreign_tokens_are_ignored() -> None:
    p = plan()
    p.handle_timer(100.0)
    p.actions()
    other = pp.parse(pp.encode(pp.Kind.PROBE, bytes(16)))
    p.datagram_received(other, ("198.18.0.66", 1), 100.01)
    assert p.actions() == [] and p.working == []


def test_the_other_side_dials_from_round_two() -> None:
    p = plan(dialer=False)
    p.handle_timer(100.0)
    ack = pp.parse(pp.encode(pp.Kind.ACK, TOKEN))
    p.datagram_received(ack, ("198.18.0.11", 7201), 100.1)
    assert not any(isinstance(a, pp.DialQuic) for a in p.actions())
    p.handle_timer(102.0)  # round 2
    assert pp.DialQuic(("198.18.0.11", 7201)) in p.actions()


def test_round_three_predicts_ports_of_public_candidates_only() -> None:
    p = plan()
    p.handle_timer(104.0)
    targets = {a.address for a in p.actions() if isinstance(a, pp.SendProbe)}
    assert ("198.18.0.11", 7202) in targets and ("198.18.0.11", 7197) in targets
    assert ("10.2.0.3", 7201) not in targets and ("10.2.0.2", 7202) not in targets


def test_probes_are_bounded_and_the_plan_expires() -> None:
    p = plan(params=pp.PunchParams(max_probes=25))
    now = 100.0
    while not p.done:
        p.handle_timer(now)
        now = p.get_timer() or now
    acts_total = p.probes_sent
    assert acts_total == 25
    assert now <= p.deadline
    p2 = plan()
    p2.handle_timer(p2.deadline)
    assert p2.actions() == [pp.PunchExpired()] and p2.get_timer() is None


def test_finish_stops_everything() -> None:
    p = plan()
    p.finish()
    p.handle_timer(100.0)
    assert p.actions() == [] and p.get_timer() is None


def test_birthday_roles() -> None:
    assert pp.birthday_roles(True, False) == "prime"
    assert pp.birthday_roles(False, True) == "spray"
    assert pp.birthday_roles(True, True) is None
    assert pp.birthday_roles(False, False) is None


def test_birthday_spray_is_paced_and_bounded() -> None:
    ports = list(range(2000, 2300))
    spray = pp.BirthdaySpray(TOKEN, "198.18.0.11", ports, start=10.0, rate=100.0)
    assert spray.get_timer() == 10.0
    first = spray.handle_timer(10.0)
    assert [p.address for p in first] == [("198.18.0.11", 2000)]
    assert len(spray.handle_timer(10.5)) == 50  # due: 50 more (0.5 s at 100/s)
    assert len(spray.handle_timer(100.0)) == 50  # a late timer never bursts more than 50
    while spray.get_timer() is not None:
        spray.handle_timer(1000.0)
    assert spray.sent == len(ports)
    assert all(pp.parse(p.datagram).token == TOKEN for p in first)
