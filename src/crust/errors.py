"""The one exception tree of crust.

Every error crust raises on purpose is a :class:`CrustError`.  Foreign exceptions
(``OSError``, ``cryptography.exceptions.InvalidTag``, aioquic errors …) are mapped at
the boundary with ``raise ... from exc`` so callers only ever need to catch these.
"""

from __future__ import annotations

from collections.abc import Sequence


class CrustError(Exception):
    """Base class of every crust error."""


class ConfigError(CrustError, ValueError):
    """A configuration value, contact string or argument is invalid.

    ``field`` names the offending field (or part of a contact) when known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class InvalidArgument(CrustError, ValueError):
    """A value passed to a crust call is out of range or of the wrong kind."""


class ProtocolError(CrustError):
    """The remote sent bytes that break the protocol (malformed, oversized, out of order)."""


class OversizedInput(ProtocolError):
    """The remote announced or sent more than a limit allows (a length prefix, a message, a
    handshake message or hello): refused before anything of that size is allocated."""


class HandshakeError(ProtocolError):
    """The cryptographic handshake failed (a failed handshake is a broken protocol run)."""


class PeerAuthenticationError(HandshakeError):
    """The remote could not prove the identity it claims or that we pinned."""


class NetworkMismatch(HandshakeError):
    """The remote belongs to another ``network_name``."""


class VersionMismatch(HandshakeError):
    """The remote speaks a protocol version we do not support."""


class ConnectError(CrustError):
    """A connection could not be established.

    When several attempts were raced, ``errors`` holds every attempt's error.
    """

    def __init__(self, message: str, errors: Sequence[BaseException] = ()) -> None:
        if errors:
            detail = "; ".join(f"{type(e).__name__}: {e}" for e in errors)
            message = f"{message} ({detail})"
        super().__init__(message)
        self.errors: tuple[BaseException, ...] = tuple(errors)


class ConnectTimeout(ConnectError, TimeoutError):
    """A connection attempt took longer than allowed."""


class HandshakeTimeout(HandshakeError, TimeoutError):
    """The remote did not complete the handshake in time."""


class Refused(ConnectError):
    """The remote refused the connection (limit reached, blacklisted, duplicate)."""


class NotConnected(CrustError):
    """There is no connection to that peer."""


class ConnectionClosed(CrustError):
    """The connection was closed while the operation was in progress."""


class MessageTooLarge(CrustError, ValueError):
    """A message is larger than ``max_message_size``."""


class BootstrapFailed(CrustError):
    """No bootstrap contact could be reached.

    ``attempts`` holds every attempt as ``(contact, error)`` (a cached node's contacts are
    joined by commas); ``errors`` holds the errors alone, in the same order.
    """

    def __init__(self, message: str, attempts: Sequence[tuple[str, BaseException]] = ()) -> None:
        super().__init__(message)
        self.attempts: tuple[tuple[str, BaseException], ...] = tuple(attempts)
        self.errors: tuple[BaseException, ...] = tuple(e for _, e in self.attempts)


class PortMappingError(CrustError):
    """A port mapping (UPnP IGD, NAT-PMP, PCP) could not be made."""


class HolePunchFailed(ConnectError):
    """A coordinated hole punch did not produce a connection."""


class Blacklisted(CrustError):
    """The peer or address is blacklisted (or not whitelisted)."""


class LimitExceeded(CrustError):
    """A configured resource limit (connections, handshakes, queue) was hit."""


class ServiceClosed(CrustError):
    """The service is not running (not started yet or already closed)."""
