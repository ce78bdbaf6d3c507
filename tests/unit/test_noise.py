"""Tests for crust.proto.noise (Noise_XX_25519_AESGCM_SHA256), incl. interop with noiseprotocol."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from crust.errors import CrustError, HandshakeError, InvalidArgument, ProtocolError
from crust.proto.noise import (
    DH_LEN,
    MAX_MESSAGE_LEN,
    PROTOCOL_NAME,
    TAG_LEN,
    CipherState,
    HandshakeState,
)

PROLOGUE = b"crust/test-network/v1"
MAX_PT = MAX_MESSAGE_LEN - TAG_LEN
FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- helpers


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _fixed_key(seed: int) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _np_conn(
    initiator: bool,
    prologue: bytes,
    static: X25519PrivateKey,
    ephemeral: X25519PrivateKey | None = None,
) -> Any:
    """A started noiseprotocol connection for our suite."""
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, _raw(static))
    if ephemeral is not None:
        conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, _raw(ephemeral))
    with warnings.catch_warnings():
        # noiseprotocol warns (correctly) that a preset ephemeral key is test-only.
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


def _pair(
    prologue_i: bytes = PROLOGUE, prologue_r: bytes = PROLOGUE
) -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState(True, prologue_i, X25519PrivateKey.generate())
    resp = HandshakeState(False, prologue_r, X25519PrivateKey.generate())
    return init, resp


def _handshake(
    init: HandshakeState, resp: HandshakeState
) -> tuple[CipherState, CipherState, CipherState, CipherState]:
    """Run XX between two crust states; return (i_send, i_recv, r_send, r_recv)."""
    assert resp.read_message(init.write_message(b"one")) == b"one"
    assert init.read_message(resp.write_message(b"two")) == b"two"
    assert resp.read_message(init.write_message(b"three")) == b"three"
    i_send, i_recv = init.split()
    r_send, r_recv = resp.split()
    return i_send, i_recv, r_send, r_recv


def _seal(cs: CipherState, plaintext: bytes) -> bytes:
    buf = bytearray(MAX_MESSAGE_LEN + 100)
    n = cs.encrypt_into(plaintext, memoryview(buf))
    assert n == len(plaintext) + TAG_LEN
    return bytes(buf[:n])


def _open(cs: CipherState, ciphertext: bytes) -> bytes:
    buf = bytearray(MAX_MESSAGE_LEN)
    n = cs.decrypt_into(ciphertext, memoryview(buf))
    assert n == len(ciphertext) - TAG_LEN
    return bytes(buf[:n])


def _only_protocol_errors(fn: Callable[[], object]) -> ProtocolError | HandshakeError | None:
    """Run ``fn``; return the CrustError it raised (None if none).

    Anything that is not a CrustError propagates and fails the test; the caller checks
    that a returned error is a ProtocolError (HandshakeError included).
    """
    try:
        fn()
    except CrustError as exc:
        err: CrustError = exc
    else:
        return None
    if not isinstance(err, (ProtocolError, HandshakeError)):
        pytest.fail(f"unexpected error type: {err!r}")
    return err


SIZES = [0, 1, 64, 1400, 16384, MAX_PT - 1, MAX_PT]


def _transport_interop(send: CipherState, recv: CipherState, peer: Any) -> None:
    """Several messages both ways between crust ciphers and a noiseprotocol peer."""
    for size in SIZES:
        msg = bytes((i * 7 + size) & 0xFF for i in range(size))
        # crust -> noiseprotocol, fast path and encrypt_with_ad alternately
        assert bytes(peer.decrypt(_seal(send, msg))) == msg
        assert bytes(peer.decrypt(send.encrypt_with_ad(b"", msg))) == msg
        # noiseprotocol -> crust
        assert _open(recv, bytes(peer.encrypt(msg))) == msg
        assert recv.decrypt_with_ad(b"", bytes(peer.encrypt(msg))) == msg
    assert send.nonce == recv.nonce == 2 * len(SIZES)


# --------------------------------------------------------------------------- interop


def test_constants() -> None:
    assert PROTOCOL_NAME == b"Noise_XX_25519_AESGCM_SHA256"
    assert (MAX_MESSAGE_LEN, TAG_LEN, DH_LEN) == (65535, 16, 32)


def test_interop_crust_initiator_noiseprotocol_responder() -> None:
    i_static, r_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    crust = HandshakeState(True, PROLOGUE, i_static)
    peer = _np_conn(False, PROLOGUE, r_static)

    assert bytes(peer.read_message(crust.write_message(b"hello responder"))) == b"hello responder"
    assert crust.read_message(bytes(peer.write_message(b"hello initiator"))) == b"hello initiator"
    assert crust.remote_static == r_static.public_key().public_bytes_raw()
    assert not crust.finished
    assert bytes(peer.read_message(crust.write_message(b"final payload"))) == b"final payload"
    assert crust.finished
    assert peer.handshake_finished
    assert crust.handshake_hash == bytes(peer.get_handshake_hash())
    assert crust.local_static_public == i_static.public_key().public_bytes_raw()

    send, recv = crust.split()
    _transport_interop(send, recv, peer)


def test_interop_noiseprotocol_initiator_crust_responder() -> None:
    i_static, r_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    peer = _np_conn(True, PROLOGUE, i_static)
    crust = HandshakeState(False, PROLOGUE, r_static)

    assert crust.read_message(bytes(peer.write_message(b"m1 payload"))) == b"m1 payload"
    assert crust.remote_static is None
    assert bytes(peer.read_message(crust.write_message(b"m2 payload"))) == b"m2 payload"
    assert crust.read_message(bytes(peer.write_message(b"m3 payload"))) == b"m3 payload"
    assert crust.finished
    assert crust.remote_static == i_static.public_key().public_bytes_raw()
    assert crust.handshake_hash == bytes(peer.get_handshake_hash())

    send, recv = crust.split()
    _transport_interop(send, recv, peer)


@pytest.mark.parametrize("crust_initiator", [True, False])
def test_deterministic_messages_match_noiseprotocol(crust_initiator: bool) -> None:
    """With fixed keys, crust emits exactly the bytes noiseprotocol emits."""
    keys = {name: _fixed_key(seed) for seed, name in enumerate(["is", "ie", "rs", "re"], 1)}
    payloads = [b"", b"second", b"third" * 100]

    def crust_side(initiator: bool) -> HandshakeState:
        s, e = ("is", "ie") if initiator else ("rs", "re")
        return HandshakeState(initiator, PROLOGUE, keys[s], ephemeral_key=keys[e])

    def np_side(initiator: bool) -> Any:
        s, e = ("is", "ie") if initiator else ("rs", "re")
        return _np_conn(initiator, PROLOGUE, keys[s], keys[e])

    ours = crust_side(crust_initiator)
    theirs = np_side(not crust_initiator)
    ref_i, ref_r = np_side(True), np_side(False)
    for index, payload in enumerate(payloads):
        ref_msg = bytes(
            ref_i.write_message(payload) if index % 2 == 0 else ref_r.write_message(payload)
        )
        (ref_r if index % 2 == 0 else ref_i).read_message(ref_msg)
        crust_writes = (index % 2 == 0) == crust_initiator
        if crust_writes:
            msg = ours.write_message(payload)
            assert msg == ref_msg
            assert bytes(theirs.read_message(msg)) == payload
        else:
            msg = bytes(theirs.write_message(payload))
            assert msg == ref_msg
            assert ours.read_message(msg) == payload
    assert ours.handshake_hash == bytes(ref_i.get_handshake_hash())
    send, recv = ours.split()
    assert send.encrypt_with_ad(b"", b"x") == bytes(
        (ref_i if crust_initiator else ref_r).encrypt(b"x")
    )
    assert recv.decrypt_with_ad(b"", bytes(theirs.encrypt(b"y"))) == b"y"


def test_message_layout_and_sizes() -> None:
    init, resp = _pair()
    m1 = init.write_message(b"abc")
    assert len(m1) == DH_LEN + 3
    assert m1[DH_LEN:] == b"abc"  # msg1 payload is in the clear
    resp.read_message(m1)
    m2 = resp.write_message(b"abc")
    assert len(m2) == DH_LEN + DH_LEN + TAG_LEN + 3 + TAG_LEN
    init.read_message(m2)
    m3 = init.write_message(b"")
    assert len(m3) == DH_LEN + TAG_LEN + TAG_LEN
    assert resp.read_message(m3) == b""


def test_crust_to_crust_transport_orientation() -> None:
    init, resp = _pair()
    i_send, i_recv, r_send, r_recv = _handshake(init, resp)
    assert init.handshake_hash == resp.handshake_hash
    assert init.remote_static == resp.local_static_public
    assert resp.remote_static == init.local_static_public
    for i in range(5):
        assert _open(r_recv, _seal(i_send, b"i->r %d" % i)) == b"i->r %d" % i
        assert _open(i_recv, _seal(r_send, b"r->i %d" % i)) == b"r->i %d" % i
        assert r_recv.decrypt_with_ad(b"ad", i_send.encrypt_with_ad(b"ad", b"z")) == b"z"


def test_max_size_handshake_payloads() -> None:
    init, resp = _pair()
    big1 = b"\x01" * (MAX_MESSAGE_LEN - DH_LEN)
    m1 = init.write_message(big1)
    assert len(m1) == MAX_MESSAGE_LEN
    assert resp.read_message(m1) == big1
    big2 = b"\x02" * (MAX_MESSAGE_LEN - 2 * DH_LEN - 2 * TAG_LEN)
    with pytest.raises(ProtocolError):
        resp.write_message(big2 + b"!")  # one byte too many; state unchanged
    m2 = resp.write_message(big2)
    assert len(m2) == MAX_MESSAGE_LEN
    assert init.read_message(m2) == big2
    big3 = b"\x03" * (MAX_MESSAGE_LEN - DH_LEN - 2 * TAG_LEN)
    assert resp.read_message(init.write_message(big3)) == big3
    assert init.finished
    assert resp.finished


# --------------------------------------------------------------------------- failures


def test_prologue_mismatch_crust_pair() -> None:
    init, resp = _pair(b"network-A", b"network-B")
    resp.read_message(init.write_message(b"hi"))  # msg1 is not authenticated yet
    m2 = resp.write_message(b"")
    with pytest.raises(HandshakeError):
        init.read_message(m2)
    assert not init.finished
    with pytest.raises(ProtocolError):  # a failed handshake stays dead
        init.write_message(b"")


def test_prologue_mismatch_against_noiseprotocol() -> None:
    crust = HandshakeState(True, b"network-A", X25519PrivateKey.generate())
    peer = _np_conn(False, b"network-B", X25519PrivateKey.generate())
    peer.read_message(crust.write_message())
    with pytest.raises(HandshakeError):
        crust.read_message(bytes(peer.write_message(b"payload")))


def test_tampering_with_any_byte_of_msg2_fails() -> None:
    keys = [_fixed_key(s) for s in (11, 12, 13, 14)]

    def fresh() -> tuple[HandshakeState, bytes]:
        init = HandshakeState(True, PROLOGUE, keys[0], ephemeral_key=keys[1])
        resp = HandshakeState(False, PROLOGUE, keys[2], ephemeral_key=keys[3])
        resp.read_message(init.write_message(b"m1"))
        return init, resp.write_message(b"m2 payload")

    _, m2 = fresh()
    for pos in range(len(m2)):
        for flip in (0x01, 0x80):
            init, _ = fresh()
            bad = bytearray(m2)
            bad[pos] ^= flip
            with pytest.raises(HandshakeError):
                init.read_message(bad)
    init, _ = fresh()
    with pytest.raises(HandshakeError):
        init.read_message(m2 + b"\x00")
    init, _ = fresh()
    with pytest.raises(ProtocolError):
        init.read_message(m2[: 2 * DH_LEN + 2 * TAG_LEN - 1])
    init, _ = fresh()
    assert init.read_message(m2) == b"m2 payload"


def test_tampering_with_any_byte_of_msg3_fails() -> None:
    keys = [_fixed_key(s) for s in (21, 22, 23, 24)]

    def fresh() -> tuple[HandshakeState, bytes]:
        init = HandshakeState(True, PROLOGUE, keys[0], ephemeral_key=keys[1])
        resp = HandshakeState(False, PROLOGUE, keys[2], ephemeral_key=keys[3])
        resp.read_message(init.write_message(b"m1"))
        init.read_message(resp.write_message(b"m2"))
        return resp, init.write_message(b"m3 payload")

    _, m3 = fresh()
    for pos in range(len(m3)):
        resp, _ = fresh()
        bad = bytearray(m3)
        bad[pos] ^= 0x40
        with pytest.raises(HandshakeError):
            resp.read_message(memoryview(bad))
        assert resp.remote_static is None
        with pytest.raises(ProtocolError):
            resp.split()
    resp, _ = fresh()
    assert resp.read_message(m3) == b"m3 payload"


@pytest.mark.parametrize("point", [bytes(32), b"\x01" + bytes(31)])
def test_low_order_ephemeral_rejected(point: bytes) -> None:
    resp = HandshakeState(False, PROLOGUE, X25519PrivateKey.generate())
    with pytest.raises(HandshakeError):
        resp.read_message(point + b"payload")

    init, resp = _pair()
    resp.read_message(init.write_message())
    m2 = resp.write_message()
    with pytest.raises(HandshakeError):
        init.read_message(point + m2[DH_LEN:])


def test_low_order_static_rejected() -> None:
    init, resp = _pair()
    resp.read_message(init.write_message())
    init.read_message(resp.write_message())
    init._s_pub = bytes(32)  # send an all-zero static key (encrypted, so tags stay valid)
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message())


def test_turn_order_enforced() -> None:
    init, resp = _pair()
    with pytest.raises(ProtocolError):
        init.read_message(bytes(64))
    with pytest.raises(ProtocolError):
        resp.write_message()
    m1 = init.write_message()
    with pytest.raises(ProtocolError):
        init.write_message()  # msg2 is the responder's
    resp.read_message(m1)
    with pytest.raises(ProtocolError):
        resp.read_message(m1)
    init.read_message(resp.write_message())
    with pytest.raises(ProtocolError):
        init.split()
    with pytest.raises(ProtocolError):
        _ = init.handshake_hash
    resp.read_message(init.write_message())
    for hs in (init, resp):
        assert hs.finished
        with pytest.raises(ProtocolError):
            hs.write_message()
        with pytest.raises(ProtocolError):
            hs.read_message(bytes(100))
        hs.split()
        with pytest.raises(ProtocolError):
            hs.split()  # transport keys are handed out once


def test_oversized_and_short_messages() -> None:
    resp = HandshakeState(False, PROLOGUE, X25519PrivateKey.generate())
    with pytest.raises(ProtocolError):
        resp.read_message(bytes(MAX_MESSAGE_LEN + 1))
    resp = HandshakeState(False, PROLOGUE, X25519PrivateKey.generate())
    with pytest.raises(ProtocolError):
        resp.read_message(bytes(DH_LEN - 1))
    init = HandshakeState(True, PROLOGUE, X25519PrivateKey.generate())
    with pytest.raises(ProtocolError):
        init.write_message(bytes(MAX_MESSAGE_LEN - DH_LEN + 1))
    init.write_message(b"")  # the refused write did not break the state


def test_forward_secrecy_fresh_keys_per_handshake() -> None:
    i_static, r_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    runs = []
    for _ in range(2):
        init = HandshakeState(True, PROLOGUE, i_static)
        resp = HandshakeState(False, PROLOGUE, r_static)
        runs.append((_handshake(init, resp), init.handshake_hash))
    (a, hash_a), (b, hash_b) = runs
    assert hash_a != hash_b
    assert a[0].encrypt_with_ad(b"", bytes(32)) != b[0].encrypt_with_ad(b"", bytes(32))
    # keys from one session cannot open the other session's traffic
    with pytest.raises(ProtocolError):
        b[3].decrypt_with_ad(b"", _seal(a[0], b"secret"))


# --------------------------------------------------------------------------- CipherState


def test_cipherstate_without_key_passes_through() -> None:
    cs = CipherState()
    assert not cs.has_key
    assert cs.encrypt_with_ad(b"ad", bytearray(b"plain")) == b"plain"
    assert cs.decrypt_with_ad(b"ad", memoryview(b"plain")) == b"plain"
    assert cs.nonce == 0
    with pytest.raises(ProtocolError):
        cs.encrypt_into(b"x", memoryview(bytearray(100)))
    with pytest.raises(ProtocolError):
        cs.decrypt_into(bytes(20), memoryview(bytearray(100)))
    with pytest.raises(ProtocolError):
        cs.rekey()
    with pytest.raises(InvalidArgument):
        CipherState(bytes(16))


def test_cipherstate_nonce_format() -> None:
    key = bytes(range(32))
    cs = CipherState(key)
    aead = AESGCM(key)
    for n in range(3):
        nonce = bytes(4) + n.to_bytes(8, "big")
        assert cs.encrypt_with_ad(b"ad", b"msg") == aead.encrypt(nonce, b"msg", b"ad")
    cs.nonce = 2**40 + 5
    nonce = bytes(4) + (2**40 + 5).to_bytes(8, "big")
    assert _seal(cs, b"hi") == aead.encrypt(nonce, b"hi", None)


def test_cipherstate_failed_decrypt_keeps_nonce_and_order_matters() -> None:
    key = bytes(range(32))
    tx, rx = CipherState(key), CipherState(key)
    c0, c1, c2 = (_seal(tx, b"msg%d" % i) for i in range(3))
    out = memoryview(bytearray(100))
    with pytest.raises(ProtocolError):
        rx.decrypt_into(c1, out)  # out of order
    assert rx.nonce == 0
    bad = bytearray(c0)
    bad[-1] ^= 1
    with pytest.raises(ProtocolError):
        rx.decrypt_into(bad, out)
    with pytest.raises(ProtocolError):
        rx.decrypt_with_ad(b"", bad)
    with pytest.raises(ProtocolError):
        rx.decrypt_into(c0[: TAG_LEN - 1], out)
    with pytest.raises(ProtocolError):
        rx.decrypt_into(c0, memoryview(bytearray(2)))  # does not fit the buffer
    assert rx.nonce == 0
    assert _open(rx, c0) == b"msg0"
    with pytest.raises(ProtocolError):
        rx.decrypt_into(c0, out)  # replay
    assert rx.nonce == 1
    assert rx.decrypt_with_ad(b"", c1) == b"msg1"
    assert _open(rx, c2) == b"msg2"
    assert rx.nonce == tx.nonce == 3


def test_cipherstate_buffers() -> None:
    key = bytes(32)
    tx, rx = CipherState(key), CipherState(key)
    with pytest.raises(InvalidArgument):
        tx.encrypt_into(b"abc", memoryview(bytearray(18)))
    assert tx.nonce == 0
    with pytest.raises(ProtocolError):
        tx.encrypt_into(bytes(MAX_PT + 1), memoryview(bytearray(MAX_MESSAGE_LEN + 1)))
    with pytest.raises(ProtocolError):
        tx.encrypt_with_ad(b"", bytes(MAX_PT + 1))
    with pytest.raises(ProtocolError):
        rx.decrypt_into(bytes(MAX_MESSAGE_LEN + 1), memoryview(bytearray(MAX_MESSAGE_LEN + 1)))
    # exact-size buffers and memoryview slices with other item sizes work
    out = bytearray(3 + TAG_LEN)
    assert tx.encrypt_into(memoryview(b"abc"), memoryview(out)) == 3 + TAG_LEN
    words = memoryview(bytearray(8)).cast("I")  # 2 items of 4 bytes
    assert rx.decrypt_into(bytes(out), words) == 3
    assert bytes(words.cast("B")[:3]) == b"abc"


def test_cipherstate_nonce_exhaustion() -> None:
    tx, rx = CipherState(bytes(32)), CipherState(bytes(32))
    tx.nonce = rx.nonce = 2**64 - 2
    assert _open(rx, _seal(tx, b"last")) == b"last"
    for cs in (tx, rx):
        assert cs.nonce == 2**64 - 1
    with pytest.raises(ProtocolError):
        tx.encrypt_with_ad(b"", b"x")
    with pytest.raises(ProtocolError):
        tx.encrypt_into(b"x", memoryview(bytearray(100)))
    with pytest.raises(ProtocolError):
        rx.decrypt_with_ad(b"", bytes(20))
    with pytest.raises(ProtocolError):
        rx.decrypt_into(bytes(20), memoryview(bytearray(100)))


def test_rekey_matches_noiseprotocol() -> None:
    i_static, r_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    crust = HandshakeState(True, PROLOGUE, i_static)
    peer = _np_conn(False, PROLOGUE, r_static)
    peer.read_message(crust.write_message())
    crust.read_message(bytes(peer.write_message()))
    peer.read_message(crust.write_message())
    send, recv = crust.split()
    assert bytes(peer.decrypt(_seal(send, b"before"))) == b"before"
    send.rekey()
    peer.rekey_inbound_cipher()
    assert send.nonce == 1  # REKEY does not reset the nonce
    assert bytes(peer.decrypt(_seal(send, b"after"))) == b"after"
    peer.rekey_outbound_cipher()
    recv.rekey()
    assert _open(recv, bytes(peer.encrypt(b"back"))) == b"back"


# --------------------------------------------------------------------------- fuzzing


def _reader_at(step: int) -> tuple[HandshakeState, bytes]:
    """A crust state about to read handshake message ``step`` and a valid such message."""
    init, resp = _pair()
    m1 = init.write_message(b"p1")
    if step == 0:
        return resp, m1
    resp.read_message(m1)
    m2 = resp.write_message(b"p2")
    if step == 1:
        return init, m2
    init.read_message(m2)
    return resp, init.write_message(b"p3")


_junk = st.one_of(
    st.binary(max_size=200),
    st.integers(min_value=MAX_MESSAGE_LEN - 2, max_value=MAX_MESSAGE_LEN + 2).map(bytes),
)


@FUZZ
@given(step=st.integers(min_value=0, max_value=2), data=_junk)
def test_fuzz_read_message_only_protocol_errors(step: int, data: bytes) -> None:
    hs, _ = _reader_at(step)
    exc = _only_protocol_errors(lambda: hs.read_message(data))
    if step > 0:  # random bytes never authenticate
        assert exc is not None


@FUZZ
@given(step=st.integers(min_value=0, max_value=2), edits=st.data())
def test_fuzz_mutated_messages(step: int, edits: st.DataObject) -> None:
    hs, valid = _reader_at(step)
    msg = bytearray(valid)
    for _ in range(edits.draw(st.integers(1, 4))):
        op = edits.draw(st.sampled_from(["flip", "cut", "grow"]))
        if op == "flip" and msg:
            pos = edits.draw(st.integers(0, len(msg) - 1))
            msg[pos] ^= edits.draw(st.integers(1, 255))
        elif op == "cut":
            del msg[edits.draw(st.integers(0, len(msg))) :]
        else:
            msg += edits.draw(st.binary(min_size=1, max_size=20))
    exc = _only_protocol_errors(lambda: hs.read_message(msg))
    if step > 0 and bytes(msg) != valid:
        assert exc is not None


@FUZZ
@given(data=_junk, nonce=st.sampled_from([0, 1, 2**64 - 2, 2**64 - 1]))
def test_fuzz_transport_decrypt_only_protocol_errors(data: bytes, nonce: int) -> None:
    for cs in (CipherState(bytes(32)), CipherState(bytes(range(32)))):
        cs.nonce = nonce
        out = memoryview(bytearray(MAX_MESSAGE_LEN))
        assert isinstance(_only_protocol_errors(partial(cs.decrypt_into, data, out)), ProtocolError)
        assert isinstance(
            _only_protocol_errors(partial(cs.decrypt_with_ad, b"ad", data)), ProtocolError
        )
        assert cs.nonce == nonce


@FUZZ
@given(step=st.integers(min_value=0, max_value=2), data=_junk)
def test_fuzz_wrong_turn_reads_are_protocol_errors(step: int, data: bytes) -> None:
    init, resp = _pair()
    writer = init if step % 2 == 0 else resp
    hs = [init, resp, init][step]
    if step >= 1:
        resp.read_message(init.write_message())
    if step >= 2:
        init.read_message(resp.write_message())
    assert hs is writer
    exc = _only_protocol_errors(lambda: hs.read_message(data))
    assert isinstance(exc, ProtocolError)
    assert not isinstance(exc, HandshakeError)
