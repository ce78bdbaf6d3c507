"""Events a :class:`crust.Service` reports, as frozen dataclasses named in the past tense."""

from __future__ import annotations

from dataclasses import dataclass

from crust.identity import PeerId
from crust.signing import SignedMessage


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class ListenerStarted(Event):
    endpoint: str
    """The contact string of the bound listener (the real port, not 0)."""


@dataclass(frozen=True, slots=True)
class ListenerFailed(Event):
    endpoint: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class BootstrapConnected(Event):
    peer: PeerId


@dataclass(frozen=True, slots=True)
class BootstrapFailed(Event):
    error: BaseException


@dataclass(frozen=True, slots=True)
class PeerConnected(Event):
    peer: PeerId
    transport: str
    """``"tcp"`` or ``"quic"``."""
    path: str
    """``"direct"``, ``"punched"``, ``"mapped"`` or ``"relayed"``."""
    outbound: bool
    """True when this side dialled the connection that was kept."""
    remote: str = ""
    """The remote address as a contact string."""


@dataclass(frozen=True, slots=True)
class PeerLost(Event):
    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    peer: PeerId
    data: bytes
    priority: int
    signature: bytes | None = None
    """The sender's Ed25519 signature when it sent with ``signed=True`` (already verified)."""
    proof: SignedMessage | None = None
    """For a signed message: the proof to keep (``proof.to_bytes()``) and check later with
    :func:`crust.signing.verify_proof`."""


_new = object.__new__
_set_peer = MessageReceived.__dict__["peer"].__set__
_set_data = MessageReceived.__dict__["data"].__set__
_set_priority = MessageReceived.__dict__["priority"].__set__
_set_signature = MessageReceived.__dict__["signature"].__set__
_set_proof = MessageReceived.__dict__["proof"].__set__


def message_received(peer: PeerId, data: bytes, priority: int) -> MessageReceived:
    """``MessageReceived(peer, data, priority)`` for the receive path: the same frozen event,
    built through its slots directly (a frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` per field, which was half the cost of receiving a small message)."""
    ev = _new(MessageReceived)
    _set_peer(ev, peer)
    _set_data(ev, data)
    _set_priority(ev, priority)
    _set_signature(ev, None)
    _set_proof(ev, None)
    return ev


@dataclass(frozen=True, slots=True)
class ConnectFailed(Event):
    target: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class LanPeerDiscovered(Event):
    peer: PeerId
    contacts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExternalAddressChanged(Event):
    endpoint: str


@dataclass(frozen=True, slots=True)
class PortMappingGranted(Event):
    protocol: str
    internal: str
    external: str
    lifetime: float


@dataclass(frozen=True, slots=True)
class AbuseDetected(Event):
    address: str
    peer: PeerId | None
    kind: str
    """What happened: ``"garbage"``, ``"oversized"``, ``"impersonation"``, ``"timeout"``,
    ``"flood"``, ``"limit"``, ``"handshake"``, ``"forged-signature"`` (docs/api.md)."""


__all__ = [
    "AbuseDetected",
    "BootstrapConnected",
    "BootstrapFailed",
    "ConnectFailed",
    "Event",
    "ExternalAddressChanged",
    "LanPeerDiscovered",
    "ListenerFailed",
    "ListenerStarted",
    "MessageReceived",
    "PeerConnected",
    "PeerLost",
    "PortMappingGranted",
    "ReachabilityChecked",
]


@dataclass(frozen=True, slots=True)
class ReachabilityChecked(Event):
    """A connected peer dialled our listeners back from another address: ``contacts`` are the
    ones it reached (empty: none, so not reachable from outside). The first success makes us a
    node (``Service.role``)."""

    peer: PeerId
    reachable: bool
    contacts: tuple[str, ...] = ()
