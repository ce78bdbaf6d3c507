"""Signed messages in the session machine (fake clock, no sockets) and offline proofs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crust.errors import ProtocolError
from crust.events import MessageReceived
from crust.identity import Identity
from crust.proto.session import (
    MAX_PLAINTEXT,
    Closed,
    Kind,
    SignatureRejected,
    State,
)
from crust.signing import (
    SIGNED_HEADER,
    SIGNED_HEADER_LEN,
    SignedMessage,
    signing_input,
    verify_proof,
)
from crust.testing.pair import SessionPair


def established_pair() -> SessionPair:
    pair = SessionPair()
    pair.pump()
    assert pair.a.established and pair.b.established
    return pair


def rejected(pair: SessionPair) -> list[SignatureRejected]:
    return [e for e in pair.events_b if isinstance(e, SignatureRejected)]


def inject(pair: SessionPair, kind: int, body: bytes, priority: int = 0) -> None:
    """Make ``a`` send a raw frame (as a hostile peer holding the keys could)."""
    pair.a._control.append((kind, body))
    pair.pump()


@pytest.mark.parametrize("size", [0, 1, 1000, 20_000, MAX_PLAINTEXT, 300_000])
def test_signed_message_is_delivered_with_a_verifiable_proof(size: int) -> None:
    pair = established_pair()
    data = bytes(i % 251 for i in range(size))
    assert pair.a.send_message(data, 3, signed=True)
    pair.pump()
    [msg] = pair.messages_b()
    assert msg.data == data and msg.priority == 3
    assert msg.signature is not None and len(msg.signature) == 64
    proof = msg.proof
    assert proof is not None
    assert proof.sender == pair.params_a.identity.peer_id
    assert proof.receiver == pair.params_b.identity.peer_id
    assert proof.network == "crust"
    assert proof.connection == pair.a.handshake_hash == pair.b.handshake_hash
    assert proof.sequence == 1
    assert verify_proof(proof)
    # kept as bytes and checked later, offline
    raw = proof.to_bytes()
    assert SignedMessage.from_bytes(raw) == proof
    assert verify_proof(raw, sender=proof.sender, receiver=proof.receiver, network="crust")
    assert pair.a.signed_sent == 1 and pair.b.signed_received == 1


def test_unsigned_messages_carry_no_signature() -> None:
    pair = established_pair()
    pair.a.send_message(b"plain", 0)
    pair.pump()
    [msg] = pair.messages_b()
    assert msg.signature is None and msg.proof is None


def test_sequence_follows_wire_order_across_priorities_and_interleaving() -> None:
    pair = established_pair()
    big = bytes(900 * 1024)
    pair.a.send_message(big, 200, signed=True)
    first = pair.a.data_to_send(limit=100_000)  # the big one starts: it gets sequence 1
    for chunk in first:
        pair.b.receive_data(chunk, pair.clock.now)
    pair.a.send_message(b"urgent", 0, signed=True)
    pair.a.send_message(b"plain", 0)
    pair.pump()
    msgs = pair.messages_b()
    assert [m.data for m in msgs] == [b"urgent", b"plain", big]
    seqs = [m.proof.sequence if m.proof else None for m in msgs]
    assert seqs == [2, None, 1]
    assert all(verify_proof(m.proof) for m in msgs if m.proof)
    assert not rejected(pair)


def test_forged_signature_is_rejected_and_counted() -> None:
    pair = established_pair()
    impostor = Identity.generate()
    inp = signing_input(
        pair.params_a.identity.peer_id,
        pair.params_b.identity.peer_id,
        pair.a.handshake_hash,
        1,
        "crust",
        b"pay 100",
    )
    body = SIGNED_HEADER.pack(1, impostor.sign(inp)) + b"pay 100"
    inject(pair, Kind.SMSG, body)
    assert pair.messages_b() == []
    assert [(r.reason, r.sequence) for r in rejected(pair)] == [("forged", 1)]
    assert pair.b.signature_failures == 1
    assert pair.b.state is State.ESTABLISHED  # the message is dropped, not the connection
    # a genuine message after it still goes through (the forged one used sequence 1)
    pair.a._sign_seq = 1
    pair.a.send_message(b"ok", 0, signed=True)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == [b"ok"]


def test_mismatched_data_is_rejected() -> None:
    pair = established_pair()
    me = pair.params_a.identity
    good = me.sign(
        signing_input(
            me.peer_id, pair.params_b.identity.peer_id, pair.a.handshake_hash, 1, "crust", b"a"
        )
    )
    inject(pair, Kind.SMSG, SIGNED_HEADER.pack(1, good) + b"b")
    assert pair.messages_b() == [] and len(rejected(pair)) == 1


def test_signature_for_another_receiver_or_network_is_rejected() -> None:
    pair = established_pair()
    me = pair.params_a.identity
    other = Identity.generate().peer_id
    for receiver, network in ((other, "crust"), (pair.params_b.identity.peer_id, "other")):
        sig = me.sign(signing_input(me.peer_id, receiver, pair.a.handshake_hash, 5, network, b"x"))
        inject(pair, Kind.SMSG, SIGNED_HEADER.pack(5, sig) + b"x")
    assert pair.messages_b() == []
    assert [r.reason for r in rejected(pair)] == ["forged", "replayed"]


def test_replayed_sequence_is_rejected() -> None:
    pair = established_pair()
    pair.a.send_message(b"once", 0, signed=True)
    pair.pump()
    [msg] = pair.messages_b()
    assert msg.proof is not None
    # the peer sends the very same signed body again (valid signature, old sequence)
    inject(pair, Kind.SMSG, SIGNED_HEADER.pack(msg.proof.sequence, msg.proof.signature) + b"once")
    assert len(pair.messages_b()) == 1
    assert [(r.reason, r.sequence) for r in rejected(pair)] == [("replayed", 1)]
    assert pair.b.signature_failures == 1


def test_replay_from_another_connection_is_rejected() -> None:
    """A proof from one connection does not verify on another (the handshake hash differs),
    even with a sequence the new connection has not seen."""
    first = established_pair()
    first.a.send_message(b"transfer", 0, signed=True)
    first.pump()
    [msg] = first.messages_b()
    assert msg.proof is not None
    second = SessionPair(first.params_a, first.params_b)
    second.pump()
    assert second.a.handshake_hash != first.a.handshake_hash
    inject(second, Kind.SMSG, SIGNED_HEADER.pack(1, msg.proof.signature) + b"transfer")
    assert second.messages_b() == []
    assert [r.reason for r in rejected(second)] == ["forged"]


def test_replayed_large_message_is_rejected_when_it_starts() -> None:
    pair = established_pair()
    pair.a.send_message(b"x", 0, signed=True)
    pair.a.send_message(b"y", 0, signed=True)
    pair.pump()
    pair.a._sign_seq = 1  # a buggy or hostile sender reuses sequence 2
    big = bytes(200_000)
    pair.a.send_message(big, 1, signed=True)
    pair.pump()
    assert [m.data for m in pair.messages_b()] == [b"x", b"y"]
    assert [(r.reason, r.sequence) for r in rejected(pair)] == [("replayed", 2)]


def test_proof_tampering_is_detected() -> None:
    pair = established_pair()
    pair.a.send_message(b"contract", 0, signed=True)
    pair.pump()
    [msg] = pair.messages_b()
    proof = msg.proof
    assert proof is not None
    raw = bytearray(proof.to_bytes())
    raw[-1] ^= 1  # the data
    assert not verify_proof(bytes(raw))
    assert not verify_proof(proof, sender=proof.receiver)
    assert not verify_proof(proof, network="elsewhere")
    assert not verify_proof(
        SignedMessage(
            proof.sender,
            proof.receiver,
            proof.network,
            proof.connection,
            proof.sequence + 1,
            proof.data,
            proof.signature,
        )
    )


def test_short_signed_frames_are_protocol_errors() -> None:
    pair = established_pair()
    inject(pair, Kind.SMSG, bytes(SIGNED_HEADER_LEN - 1))
    [ev] = [e for e in pair.events_b if isinstance(e, Closed)]
    assert isinstance(ev.error, ProtocolError)
    pair = established_pair()
    inject(pair, Kind.SFIRST, struct.pack(">I", 100_000) + bytes(10))
    [ev] = [e for e in pair.events_b if isinstance(e, Closed)]
    assert isinstance(ev.error, ProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_proof_bytes_only_protocol_errors(raw: bytes) -> None:
    try:
        proof = SignedMessage.from_bytes(raw)
    except ProtocolError:
        return
    assert verify_proof(proof) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_proof_body_after_magic_only_protocol_errors(tail: bytes) -> None:
    try:
        ok = verify_proof(b"CRSP\x01" + tail)
    except ProtocolError:
        return
    assert ok is False  # no random tail carries a valid signature


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([Kind.SMSG, Kind.SFIRST]), st.binary(max_size=300))
def test_any_signed_frame_body_only_protocol_errors_or_rejection(kind: int, body: bytes) -> None:
    pair = established_pair()
    inject(pair, kind, body)
    for ev in pair.events_b:
        if isinstance(ev, Closed):
            assert isinstance(ev.error, ProtocolError)
        assert not isinstance(ev, MessageReceived)
