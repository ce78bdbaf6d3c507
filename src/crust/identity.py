"""Peer identities: an Ed25519 key pair whose public key is the peer id."""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from functools import total_ordering
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from crust.errors import ConfigError

PEER_ID_LEN = 32
_TEXT_LEN = 52  # base32 of 32 bytes without padding


@total_ordering
class PeerId:
    """A peer's identity: the 32 raw bytes of its Ed25519 public key.

    Text form: lowercase base32 without padding (52 characters). PeerIds order by their bytes.
    """

    __slots__ = ("_bytes", "_hash", "_text")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray) or len(raw) != PEER_ID_LEN:
            raise ConfigError(f"a peer id is {PEER_ID_LEN} bytes", field="peer_id")
        self._bytes = bytes(raw)
        self._hash = hash(self._bytes)
        self._text: str | None = None

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse the text form; raises ConfigError when malformed."""
        if not isinstance(text, str) or len(text) != _TEXT_LEN:
            raise ConfigError(f"not a peer id (want {_TEXT_LEN} base32 characters)", "peer_id")
        try:
            raw = base64.b32decode(text.upper() + "====", casefold=False)
        except (ValueError, TypeError) as exc:
            raise ConfigError("not a peer id (bad base32)", field="peer_id") from exc
        if len(raw) != PEER_ID_LEN or base64.b32encode(raw).decode().rstrip("=").lower() != text:
            raise ConfigError("not a peer id (non-canonical base32)", field="peer_id")
        return cls(raw)

    def __bytes__(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        text = self._text
        if text is None:  # computed once: logs, contacts and events all print peer ids
            text = self._text = base64.b32encode(self._bytes).decode("ascii").rstrip("=").lower()
        return text

    def __repr__(self) -> str:
        return f"PeerId({str(self)[:12]}…)"

    def short(self) -> str:
        """The first 8 characters of the text form, for logs and tables."""
        return str(self)[:8]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerId) and other._bytes == self._bytes

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self._bytes < other._bytes

    def __hash__(self) -> int:
        return self._hash

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this peer's Ed25519 signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(self._bytes).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class Identity:
    """An Ed25519 key pair. ``peer_id`` is its public half."""

    __slots__ = ("_key", "peer_id")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerId(raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Deterministic identity from a 32-byte seed (tests, key derivation)."""
        if len(seed) != 32:
            raise ConfigError("an identity seed is 32 bytes", field="identity")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key as PKCS#8 PEM, readable by the owner only (0600), atomically."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=target.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Read a key written by :meth:`save`; ConfigError when missing or malformed."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", field="identity") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not a PEM private key", field="identity") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key", field="identity")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the identity at ``path``, creating (and saving) a new one when absent."""
        if not Path(path).exists():
            ident = cls.generate()
            ident.save(path)
            return ident
        return cls.load(path)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id!r})"
