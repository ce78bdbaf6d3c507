"""The session machine with no sockets and a fake clock."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.errors import (
    HandshakeTimeout,
    NetworkMismatch,
    PeerAuthenticationError,
    ProtocolError,
    VersionMismatch,
)
from crust.events import MessageReceived
from crust.identity import Identity
from crust.proto.session import (
    ECHO_REPLY_MAX,
    HEADER_LEN,
    MAX_PLAINTEXT,
    PREEMPT_LIMIT,
    CloseCode,
    Closed,
    HandshakeCompleted,
    PongReceived,
    Selected,
    Session,
    State,
    echo_request,
    encode_echo_reply,
    parse_echo_reply,
)
from crust.testing.pair import FakeClock, SessionPair, make_params


def closed(events: Sequence[object]) -> Closed:
    found = [e for e in events if isinstance(e, Closed)]
    assert len(found) == 1, events
    return found[0]


def established_pair(**kw: object) -> SessionPair:
    pair = SessionPair(**kw)  # type: ignore[arg-type]
    pair.pump()
    assert pair.a.established and pair.b.established
    return pair


# ------------------------------------------------------------------ handshake


def test_handshake_authenticates_both_sides() -> None:
    pair = established_pair()
    done_a = [e for e in pair.events_a if isinstance(e, HandshakeCompleted)]
    done_b = [e for e in pair.events_b if isinstance(e, HandshakeCompleted)]
    assert done_a[0].peer_id == pair.params_b.identity.peer_id
    assert done_b[0].peer_id == pair.params_a.identity.peer_id
    assert pair.a.handshake_hash == pair.b.handshake_hash


def test_hello_carries_bounded_contacts_and_observed_address() -> None:
    pa = make_params()
    pa.hello_extra["contacts"] = ["tcp://192.0.2.1:1"] * 100 + [7]
    pair = SessionPair(pa)
    pair.b = Session(pair.params_b, initiator=False, now=0.0, observed="tcp://192.0.2.9:5")
    pair.pump()
    hello_b = pair.b.remote_hello
    assert len(hello_b["contacts"]) == 32
    assert all(isinstance(c, str) for c in hello_b["contacts"])
    assert pair.a.remote_hello["observed"] == "tcp://192.0.2.9:5"


def test_network_mismatch_fails_on_both_sides() -> None:
    pair = SessionPair(make_params("alpha"), make_params("beta"))
    pair.pump()
    assert isinstance(closed(pair.events_a).error, NetworkMismatch)
    assert isinstance(closed(pair.events_b).error, NetworkMismatch)


def test_forged_network_tag_still_fails_the_handshake() -> None:
    """Rewriting the clear header to the responder's network does not help: the prologue
    holds the real network name."""
    pa, pb = make_params("alpha"), make_params("beta")
    pair = SessionPair(pa, pb)
    pair.wire_a_to_b = lambda d: pb.header + d[HEADER_LEN:] if d.startswith(b"CRST") else d
    pair.pump()
    assert isinstance(closed(pair.events_a).error, ProtocolError)
    assert not pair.a.established


def test_unknown_version_is_refused() -> None:
    pair = SessionPair()
    pair.wire_a_to_b = lambda d: d[:4] + b"\x09" + d[5:] if d.startswith(b"CRST") else d
    pair.pump()
    assert isinstance(closed(pair.events_b).error, VersionMismatch)
    assert isinstance(closed(pair.events_a).error, VersionMismatch)


def test_pinned_peer_id_mismatch() -> None:
    pair = SessionPair(expected_peer=Identity.generate().peer_id)
    pair.pump()
    assert isinstance(closed(pair.events_a).error, PeerAuthenticationError)
    assert not pair.a.established


def test_pinned_peer_id_match() -> None:
    pb = make_params()
    pair = SessionPair(params_b=pb, expected_peer=pb.identity.peer_id)
    pair.pump()
    assert pair.a.established


def test_identity_not_bound_to_noise_key_is_rejected() -> None:
    """A peer that claims someone else's id (signature made for another Noise key) fails."""
    victim = make_params()
    attacker = make_params()
    attacker.static_signature = victim.static_signature
    attacker.identity = victim.identity
    pair = SessionPair(attacker, make_params())
    # the attacker's hello claims the victim's id with the victim's signature, but the
    # signature covers the victim's Noise key, not the attacker's
    pair.params_a.identity = victim.identity
    pair.pump()
    assert isinstance(closed(pair.events_b).error, PeerAuthenticationError)


def test_not_a_crust_peer() -> None:
    s = Session(make_params(), initiator=False, now=0.0)
    s.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0.0)
    assert isinstance(closed(list(s.events)).error, ProtocolError)


@pytest.mark.parametrize(
    ("observed", "address"),
    [
        ("tcp://198.18.0.10:20001", ("198.18.0.10", 20001)),
        ("tcp://[2001:db8::7]:1", ("2001:db8::7", 1)),
    ],
)
def test_address_echo_answers_the_observed_address_and_closes(
    observed: str, address: tuple[str, int]
) -> None:
    """Port prediction over TCP: a header with the echo version asks which address the
    responder sees; it answers and closes cleanly (no error, no session, no identity)."""
    params = make_params("alpha")
    s = Session(params, initiator=False, now=0.0, observed=observed)
    s.receive_data(echo_request("alpha") + b"ignored", 0.0)
    reply = b"".join(bytes(d) for d in s.data_to_send())
    assert len(reply) <= ECHO_REPLY_MAX
    assert parse_echo_reply(reply) == address
    for cut in range(len(reply)):
        assert parse_echo_reply(reply[:cut]) is None  # a reply read in pieces
    event = closed(list(s.events))
    assert event.error is None and event.code == CloseCode.NORMAL
    assert s.state is State.CLOSED and s.peer_id is None


def test_address_echo_of_another_network_is_refused() -> None:
    s = Session(make_params("alpha"), initiator=False, now=0.0, observed="tcp://192.0.2.1:5")
    s.receive_data(echo_request("beta"), 0.0)
    reply = b"".join(bytes(d) for d in s.data_to_send())
    with pytest.raises(NetworkMismatch):
        parse_echo_reply(reply)
    assert isinstance(closed(list(s.events)).error, NetworkMismatch)


def test_an_old_responder_refuses_the_echo_version() -> None:
    with pytest.raises(ProtocolError, match="status 2"):
        parse_echo_reply(bytes([2]))
    for bad in (bytes([3, 5, 0, 1]), encode_echo_reply(("192.0.2.1", 1)) + b"x"):
        with pytest.raises(ProtocolError):
            parse_echo_reply(bad)
    with pytest.raises(ProtocolError, match="port 0"):
        parse_echo_reply(bytes([3, 4, 0, 0, 1, 2, 3, 4]))


@given(st.binary(max_size=40))
def test_any_echo_reply_bytes_parse_or_protocol_error(data: bytes) -> None:
    try:
        got = parse_echo_reply(data)
    except ProtocolError:
        return
    if got is not None:
        assert 0 < got[1] < 65536


def test_handshake_timeout() -> None:
    clock = FakeClock()
    pair = SessionPair(clock=clock)
    pair.connected = False
    pair.pump()
    pair.tick(pair.params_a.handshake_timeout + 0.1)
    assert isinstance(closed(pair.events_a).error, HandshakeTimeout)
    assert isinstance(closed(pair.events_b).error, HandshakeTimeout)


# ------------------------------------------------------------------ messages


def test_messages_in_order_all_sizes() -> None:
    pair = established_pair()
    rng = random.Random(1)
    sizes = [0, 1, 64, 1000, MAX_PLAINTEXT - 6, MAX_PLAINTEXT, 200_000, 2 * 1024 * 1024]
    sent = [rng.randbytes(n) for n in sizes] + [
        rng.randbytes(rng.randrange(5000)) for _ in range(300)
    ]
    for m in sent:
        assert pair.a.send_message(m, 0)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == sent
    assert all(m.peer == pair.params_a.identity.peer_id for m in pair.messages_b())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.binary(max_size=3000), min_size=1, max_size=20),
    st.integers(min_value=1, max_value=500),
)
def test_any_stream_boundaries(messages: list[bytes], step: int) -> None:
    def chunker(data: bytes) -> list[bytes]:
        return [data[i : i + step] for i in range(0, len(data), step)]

    pair = SessionPair(chunker=chunker)
    pair.pump()
    for m in messages:
        pair.a.send_message(m, 3)
        pair.b.send_message(m, 3)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == messages
    assert [m.data for m in pair.messages_a()] == messages


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(  # sizes: small ones, and ones spanning several records
                st.integers(min_value=0, max_value=2000),
                st.integers(min_value=60_000, max_value=200_000),
            ),
            st.sampled_from([0, 1, 5]),  # priority: larger ones preempted mid-message
            st.booleans(),  # signed
        ),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from([1 << 20, 65_537, 4096, 777]),  # read size
    st.integers(min_value=1, max_value=4),  # messages queued per pump
    st.integers(min_value=0, max_value=2**32),  # seed of the message contents
)
def test_large_interleaved_messages_arrive_intact(
    specs: list[tuple[int, int, bool]], step: int, batch: int, seed: int
) -> None:
    """Fragmented messages of several priorities, signed or not, cut at any read size: each
    arrives whole and intact, in order per priority (the receiver decrypts a record that is
    one fragment straight into the message's buffer, any other record as usual)."""

    def chunker(data: bytes) -> list[bytes]:
        return [data[i : i + step] for i in range(0, len(data), step)]

    rnd = random.Random(seed)  # contents from a seed: Hypothesis draws sizes, not bytes
    pair = SessionPair(chunker=chunker)
    pair.pump()
    sent: dict[int, list[bytes]] = {}
    for i, (size, prio, signed) in enumerate(specs):
        data = rnd.randbytes(size)
        pair.a.send_message(data, prio, signed=signed)
        sent.setdefault(prio, []).append(data)
        if i % batch == batch - 1:
            pair.pump()
    pair.pump()
    got: dict[int, list[bytes]] = {}
    for m in pair.messages_b():
        got.setdefault(m.priority, []).append(m.data)
    assert got == sent
    assert not pair.b.closed


def test_priorities_order_queued_messages() -> None:
    pair = established_pair()
    for i in range(5):
        pair.a.send_message(b"low%d" % i, 9)
    for i in range(5):
        pair.a.send_message(b"high%d" % i, 0)
    pair.a.send_message(b"mid", 4)
    pair.pump()
    got = [(m.priority, m.data) for m in pair.messages_b()]
    assert got == (
        [(0, b"high%d" % i) for i in range(5)]
        + [(4, b"mid")]
        + [(9, b"low%d" % i) for i in range(5)]
    )


def test_urgent_message_overtakes_a_large_one_in_progress() -> None:
    pair = established_pair()
    big = bytes(900 * 1024)  # below PREEMPT_LIMIT: may be interleaved
    pair.a.send_message(big, 200)
    first = pair.a.data_to_send(limit=100_000)  # part of the big message leaves
    for chunk in first:
        pair.b.receive_data(chunk, pair.clock.now)
    pair.a.send_message(b"urgent", 0)
    pair.pump()
    order = [m.data for m in pair.messages_b()]
    assert order == [b"urgent", big]


def test_no_preemption_beyond_the_partial_limit() -> None:
    """With PREEMPT_LIMIT bytes of messages half sent, a new urgent message waits: the
    receiver's reassembly memory stays bounded."""
    pair = established_pair()
    big = bytes(PREEMPT_LIMIT)
    pair.a.send_message(big, 200)
    for chunk in pair.a.data_to_send(limit=100_000):
        pair.b.receive_data(chunk, pair.clock.now)
    pair.a.send_message(b"urgent", 0)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == [big, b"urgent"]


def test_full_queue_drops_oldest_low_priority_never_0_or_1() -> None:
    pa = make_params(send_queue_size=64 * 1024)
    pair = SessionPair(pa)
    pair.pump()
    chunk = bytes(10_000)
    for _ in range(20):  # 200 kB of priority 0 and 1: never dropped, queue goes over
        assert pair.a.send_message(chunk, 0)
        assert pair.a.send_message(chunk, 1)
    assert pair.a.queue_full
    assert pair.a.send_message(b"x" * 100, 7) is False  # nothing droppable: itself dropped
    assert pair.a.dropped == {7: 1}
    pair.pump()
    assert len(pair.messages_b()) == 40

    for i in range(10):
        pair.a.send_message(b"%d" % i + bytes(10_000), 5)
    # queue is over the limit: the next ones push out the oldest priority >= 5 messages
    assert pair.a.send_message(b"new5" + bytes(10_000), 5)
    assert pair.a.dropped[5] >= 1
    # a less urgent message never displaces more urgent ones: it is dropped itself
    assert pair.a.send_message(b"new9" + bytes(10_000), 9) is False
    assert pair.a.dropped[9] == 1
    pair.pump()
    got = [m.data[:4] for m in pair.messages_b()[40:]]
    assert got[-1] == b"new5"
    assert b"0\x00\x00\x00" not in got  # the oldest went first
    assert len(got) + pair.a.dropped[5] == 11


def test_send_larger_than_max_is_refused_locally() -> None:
    pair = established_pair(params_a=make_params(max_message_size=1000))
    with pytest.raises(ProtocolError):
        pair.a.send_message(bytes(1001), 0)
    assert pair.a.established


def test_incoming_larger_than_max_closes_with_protocol_error() -> None:
    pair = established_pair(params_b=make_params(max_message_size=100_000))
    pair.a.send_message(bytes(100), 0)
    pair.a.send_message(bytes(100_001), 0)
    pair.pump()
    assert len(pair.messages_b()) == 1
    assert isinstance(closed(pair.events_b).error, ProtocolError)
    ev_a = closed(pair.events_a)
    assert ev_a.by_peer and ev_a.code == CloseCode.PROTOCOL_ERROR


def test_tampered_record_closes_with_protocol_error() -> None:
    pair = established_pair()
    pair.wire_a_to_b = lambda d: d[:-1] + bytes([d[-1] ^ 1])
    pair.a.send_message(b"hello", 0)
    pair.pump()
    assert pair.messages_b() == []
    assert isinstance(closed(pair.events_b).error, ProtocolError)


def test_replayed_record_is_rejected() -> None:
    pair = established_pair()
    pair.a.send_message(b"once", 0)
    record = b"".join(pair.a.data_to_send())
    pair.b.receive_data(record, 0.0)
    pair.b.receive_data(record, 0.0)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == [b"once"]
    assert isinstance(closed(pair.events_b).error, ProtocolError)


# ------------------------------------------------------------------ liveness and close


def test_heartbeat_measures_rtt() -> None:
    pair = established_pair()
    pair.tick(pair.params_a.heartbeat_interval + 0.01)
    pongs = [e for e in pair.events_a if isinstance(e, PongReceived)]
    assert pongs and pair.a.rtt is not None and pair.a.rtt >= 0


def test_dead_peer_detected_by_heartbeat_timeout() -> None:
    pair = established_pair(params_a=make_params(heartbeat_interval=1.0, heartbeat_timeout=3.0))
    pair.connected = False  # the network goes silent
    for _ in range(2):
        pair.tick(1.0)
    assert pair.a.established
    pair.tick(1.5)
    ev = closed(pair.events_a)
    assert ev.code == CloseCode.TIMEOUT and ev.error is None
    assert pair.a.closed


def test_live_peer_is_not_timed_out() -> None:
    params = make_params(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    pair = established_pair(
        params_a=params, params_b=make_params(heartbeat_interval=1.0, heartbeat_timeout=3.0)
    )
    for _ in range(20):
        pair.tick(0.5)
    assert pair.a.established and pair.b.established


def test_clean_close_sends_queued_messages_first() -> None:
    pair = established_pair()
    for i in range(100):
        pair.a.send_message(b"m%d" % i + bytes(5000), 3)
    pair.a.close(CloseCode.NORMAL, "bye", pair.clock.now)
    pair.pump()
    assert len(pair.messages_b()) == 100
    ev_b = closed(pair.events_b)
    assert ev_b.by_peer and ev_b.reason == "bye"
    ev_a = closed(pair.events_a)
    assert not ev_a.by_peer and ev_a.error is None
    assert pair.a.state is State.CLOSED and pair.b.state is State.CLOSED


def test_clean_close_loses_nothing_in_either_direction() -> None:
    """Both sides have messages queued when one closes: the closer's go before its CLOSE,
    the other side's go before its answering CLOSE, and the closer still delivers them."""
    pair = established_pair()
    sent_a = [b"a%d" % i + bytes(3000) for i in range(50)]
    sent_b = [b"b%d" % i + bytes(3000) for i in range(50)]
    for ma, mb in zip(sent_a, sent_b, strict=True):
        pair.a.send_message(ma, 2)
        pair.b.send_message(mb, 2)
    pair.a.close(CloseCode.REPLACED, "moving", pair.clock.now)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == sent_a
    assert [m.data for m in pair.messages_a()] == sent_b
    assert closed(pair.events_a).error is None and closed(pair.events_b).by_peer


def test_select_and_control_frames() -> None:
    pair = established_pair()
    pair.b.select()
    pair.b.send_control({"t": "hint", "n": 1})
    pair.pump()
    assert any(isinstance(e, Selected) for e in pair.events_a)


# ------------------------------------------------------------------ hostile bytes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_any_bytes_in_handshake_only_protocol_errors(data: bytes) -> None:
    s = Session(make_params(), initiator=False, now=0.0)
    s.receive_data(data, 0.0)  # never raises
    for ev in s.events:
        if isinstance(ev, Closed):
            assert isinstance(ev.error, ProtocolError)
    s2 = Session(make_params(), initiator=True, now=0.0)
    s2.receive_data(data, 0.0)
    for ev in s2.events:
        if isinstance(ev, Closed):
            assert isinstance(ev.error, ProtocolError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=3000))
def test_any_bytes_after_handshake_only_protocol_errors(data: bytes) -> None:
    pair = established_pair()
    pair.b.receive_data(data, 0.0)
    evs = list(pair.b.events)
    assert not any(isinstance(e, MessageReceived) for e in evs)
    for ev in evs:
        if isinstance(ev, Closed):
            assert isinstance(ev.error, ProtocolError)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_authenticated_plaintext_only_protocol_errors(plaintext: bytes) -> None:
    """Even a peer holding the keys (a buggy or hostile one) can only cause ProtocolError."""
    pair = established_pair()
    send = pair.a._send
    assert send is not None
    record = bytearray(2 + len(plaintext) + 16)
    record[0:2] = (len(plaintext) + 16).to_bytes(2, "big")
    send.encrypt_into(plaintext, memoryview(record)[2:])
    pair.b.receive_data(bytes(record), 0.0)
    for ev in pair.b.events:
        if isinstance(ev, Closed):
            assert isinstance(ev.error, ProtocolError)
