"""Signed messages: what a signature covers, and proofs a receiver keeps and checks offline.

A message sent with ``signed=True`` carries an Ed25519 signature by the sender's identity key
over :func:`signing_input`: a domain string, the sender's and receiver's peer ids, the
connection's Noise handshake hash (unique to one connection), a sequence number that
increases with every signed message the sender sends on that connection, the network name
and the data.  The receiver delivers it with a :class:`SignedMessage` proof; anyone holding
the proof can check it later with :func:`verify_proof` (no connection or key needed beyond
the sender's public peer id, which the proof names).

Pure computation (no IO): the session machine in :mod:`crust.proto.session` uses it too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crust.errors import ProtocolError
from crust.identity import PeerId

DOMAIN = b"crust signed message v1\x00"
PROOF_MAGIC = b"CRSP\x01"
SIGNATURE_LEN = 64
CONNECTION_ID_LEN = 32
MAX_NETWORK_NAME = 1024
SEQ = struct.Struct(">Q")
SIGNED_HEADER = struct.Struct(">Q64s")
"""What a signed message carries before its data on the wire: sequence u64, signature."""
SIGNED_HEADER_LEN = SIGNED_HEADER.size
_PROOF_HEAD = struct.Struct(">32s32s32sQ64sH")


def signing_input(
    sender: PeerId,
    receiver: PeerId,
    connection: bytes,
    sequence: int,
    network: str,
    data: bytes,
) -> bytes:
    """The exact bytes the sender signs."""
    net = network.encode("utf-8")
    return b"".join(
        (
            DOMAIN,
            bytes(sender),
            bytes(receiver),
            connection,
            SEQ.pack(sequence),
            struct.pack(">H", len(net)),
            net,
            data,
        )
    )


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """A signed message as received: everything :func:`verify_proof` needs.

    ``connection`` is the Noise handshake hash of the connection it came on (both ends
    compute the same value); ``sequence`` orders the sender's signed messages on it.
    """

    sender: PeerId
    receiver: PeerId
    network: str
    connection: bytes
    sequence: int
    data: bytes
    signature: bytes

    def to_bytes(self) -> bytes:
        net = self.network.encode("utf-8")
        return (
            PROOF_MAGIC
            + _PROOF_HEAD.pack(
                bytes(self.sender),
                bytes(self.receiver),
                self.connection,
                self.sequence,
                self.signature,
                len(net),
            )
            + net
            + self.data
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedMessage:
        """Parse a proof written by :meth:`to_bytes`; raises ProtocolError on any bad input
        (it does not check the signature: see :func:`verify_proof`)."""
        raw = bytes(raw)
        if not raw.startswith(PROOF_MAGIC):
            raise ProtocolError("not a crust signed message proof")
        pos = len(PROOF_MAGIC)
        if len(raw) < pos + _PROOF_HEAD.size:
            raise ProtocolError("truncated signed message proof")
        sender, receiver, conn, seq, sig, net_len = _PROOF_HEAD.unpack_from(raw, pos)
        pos += _PROOF_HEAD.size
        if net_len > MAX_NETWORK_NAME or len(raw) < pos + net_len:
            raise ProtocolError("bad network name in signed message proof")
        try:
            network = raw[pos : pos + net_len].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("network name in signed message proof is not UTF-8") from exc
        pos += net_len
        return cls(PeerId(sender), PeerId(receiver), network, conn, seq, raw[pos:], sig)

    def signing_input(self) -> bytes:
        return signing_input(
            self.sender, self.receiver, self.connection, self.sequence, self.network, self.data
        )


def verify_proof(
    proof: SignedMessage | bytes,
    *,
    sender: PeerId | None = None,
    receiver: PeerId | None = None,
    network: str | None = None,
) -> bool:
    """True when ``proof`` carries a valid signature of its sender over its content.

    ``sender``/``receiver``/``network``, when given, must also match what the proof names
    (a proof for another receiver or network is not a proof for this one).  Raises
    ProtocolError only for malformed proof bytes.
    """
    if not isinstance(proof, SignedMessage):
        proof = SignedMessage.from_bytes(proof)
    if sender is not None and proof.sender != sender:
        return False
    if receiver is not None and proof.receiver != receiver:
        return False
    if network is not None and proof.network != network:
        return False
    if len(proof.signature) != SIGNATURE_LEN or len(proof.connection) != CONNECTION_ID_LEN:
        return False
    return proof.sender.verify(proof.signature, proof.signing_input())


__all__ = ["SignedMessage", "signing_input", "verify_proof"]
