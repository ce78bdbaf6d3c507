"""The key log: Noise transport keys handed out by the sans-IO core, and the file writer."""

from __future__ import annotations

import io
import logging
import re
import stat
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crust.aio.keylog import NOISE_LABEL, KeyLog, _AliasingSecretsLog, noise_line
from crust.errors import ConfigError, ProtocolError
from crust.proto.noise import CipherState, HandshakeState, TransportKeys
from crust.proto.session import HEADER_LEN
from crust.testing.pair import SessionPair, make_params

LINE = re.compile(r"^CRUST_NOISE( [0-9a-f]{64}){4}\n$")


def _handshake() -> tuple[HandshakeState, HandshakeState, bytes]:
    init = HandshakeState(True, b"prologue", X25519PrivateKey.generate())
    resp = HandshakeState(False, b"prologue", X25519PrivateKey.generate())
    msg1 = init.write_message()
    resp.read_message(msg1)
    init.read_message(resp.write_message(b"r"))
    resp.read_message(init.write_message(b"i"))
    return init, resp, msg1


def _nonce(n: int) -> bytes:
    return struct.pack(">4xQ", n)


def test_split_keys_match_the_ciphers_of_both_sides() -> None:
    init, resp, msg1 = _handshake()
    keys_i = init.split_keys()
    keys_r = resp.split_keys()
    assert keys_i == keys_r
    assert keys_i.initiator_ephemeral == msg1[:32]  # sent in clear in message 1
    assert keys_i.handshake_hash == init.handshake_hash == resp.handshake_hash
    assert keys_i.initiator_to_responder != keys_i.responder_to_initiator
    # the initiator's send key encrypts what the responder's receive cipher accepts
    sealed = AESGCM(keys_i.initiator_to_responder).encrypt(_nonce(0), b"hi", None)
    assert CipherState(keys_r.initiator_to_responder).decrypt_with_ad(b"", sealed) == b"hi"


def test_split_and_split_keys_agree_and_hand_keys_out_once() -> None:
    init, resp, _ = _handshake()
    send, _recv = init.split()
    keys = resp.split_keys()
    sealed = send.encrypt_with_ad(b"", b"data")
    assert AESGCM(keys.initiator_to_responder).decrypt(_nonce(0), sealed, None) == b"data"
    with pytest.raises(ProtocolError):
        init.split_keys()
    with pytest.raises(ProtocolError):
        resp.split()


def test_split_keys_before_the_end_of_the_handshake_fails() -> None:
    init = HandshakeState(True, b"", X25519PrivateKey.generate())
    init.write_message()
    with pytest.raises(ProtocolError):
        init.split_keys()


def test_transport_keys_repr_hides_the_keys() -> None:
    keys = TransportKeys(bytes(range(32)), b"h" * 32, b"\xaa" * 32, b"\xbb" * 32)
    text = repr(keys)
    assert "aa" * 8 not in text and "bb" * 8 not in text and "68" * 8 not in text


def test_session_hands_the_logged_keys_to_its_hook() -> None:
    logged_a: list[TransportKeys] = []
    logged_b: list[TransportKeys] = []
    pair = SessionPair(make_params(keylog=logged_a.append), make_params(keylog=logged_b.append))
    first = bytes(pair.a._out[0])  # header + message 1, not sent yet
    pair.pump()
    assert pair.a.established and pair.b.established
    assert len(logged_a) == 1 and logged_a == logged_b
    keys = logged_a[0]
    assert keys.initiator_ephemeral == first[HEADER_LEN + 2 : HEADER_LEN + 34]
    assert keys.handshake_hash == pair.a.handshake_hash
    # a record from a decrypts with the logged initiator->responder key, nonce = record count
    assert pair.a.send_message(b"logged", 0)
    record = b"".join(pair.a.data_to_send())
    assert pair.a._send is not None
    (length,) = struct.unpack_from(">H", record)
    nonce = _nonce(pair.a._send.nonce - 1)
    plain = AESGCM(keys.initiator_to_responder).decrypt(nonce, record[2 : 2 + length], None)
    assert plain.endswith(b"logged")


def test_sessions_without_a_hook_keep_no_keys() -> None:
    pair = SessionPair()
    pair.pump()
    assert pair.a.established
    assert pair.params_a.keylog is None


def test_keylog_file_is_private_appends_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.log"
    path.write_text("CLIENT_RANDOM earlier line\n")
    path.chmod(0o600)
    init, _resp, _ = _handshake()
    keys = init.split_keys()
    with caplog.at_level(logging.WARNING, logger="crust.keylog"):
        log = KeyLog.open(path)
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)
    log.write_noise(keys)
    log.close()
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == "CLIENT_RANDOM earlier line\n"
    assert LINE.match(lines[1])
    assert lines[1] == noise_line(keys)
    fields = lines[1].split()
    assert fields[0] == NOISE_LABEL
    assert bytes.fromhex(fields[1]) == keys.initiator_ephemeral
    assert bytes.fromhex(fields[3]) == keys.initiator_to_responder
    assert bytes.fromhex(fields[4]) == keys.responder_to_initiator


def test_new_keylog_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new.log"
    KeyLog.open(path).close()
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_unopenable_keylog_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        KeyLog.open(tmp_path / "missing-dir" / "keys.log")
    assert info.value.field == "keylog_file"


def test_writing_after_close_is_silent(tmp_path: Path) -> None:
    log = KeyLog.open(tmp_path / "k.log")
    log.close()
    init, _resp, _ = _handshake()
    log.write_noise(init.split_keys())  # no exception: the connection must not fail


def test_tls_lines_are_also_written_under_the_first_client_random() -> None:
    out = io.StringIO()
    first = "11" * 32
    aliasing = _AliasingSecretsLog(out, first)
    aliasing.write(f"CLIENT_TRAFFIC_SECRET_0 {'22' * 32} {'33' * 48}\n")
    aliasing.write(f"SERVER_TRAFFIC_SECRET_0 {first} {'44' * 48}\n")
    aliasing.flush()
    assert out.getvalue().splitlines() == [
        f"CLIENT_TRAFFIC_SECRET_0 {'22' * 32} {'33' * 48}",
        f"CLIENT_TRAFFIC_SECRET_0 {first} {'33' * 48}",
        f"SERVER_TRAFFIC_SECRET_0 {first} {'44' * 48}",
    ]
