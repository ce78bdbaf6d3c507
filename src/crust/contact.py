"""Contact strings: ``SCHEME://HOST:PORT[#PEER_ID]``."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

import ifaddr

from crust.errors import ConfigError
from crust.identity import PeerId

SCHEMES = ("tcp", "quic")
MAX_CONTACT_LEN = 300


@dataclass(frozen=True, slots=True)
class Contact:
    """A parsed contact. ``host`` is an IP literal (no brackets) or a DNS name."""

    scheme: str
    host: str
    port: int
    peer_id: PeerId | None = None
    name: str | None = field(default=None, compare=False, repr=False)
    """The DNS name ``host`` was resolved from (QUIC's public-ca mode checks the listener's
    certificate against it); not part of the contact's identity."""

    @classmethod
    def parse(cls, text: str, *, field: str = "contact") -> Contact:
        """Parse a contact string; ConfigError naming the bad part when malformed."""
        if not isinstance(text, str):
            raise ConfigError(f"a contact is a string, not {type(text).__name__}", field)
        return _parse_cached(text, field)

    @staticmethod
    def _parse(text: str, field: str) -> Contact:
        if len(text) > MAX_CONTACT_LEN:
            raise ConfigError("contact too long", field)
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise ConfigError(f"{text!r}: missing SCHEME:// (tcp or quic)", field)
        if scheme not in SCHEMES:
            raise ConfigError(f"{text!r}: unknown scheme {scheme!r} (tcp or quic)", field)
        rest, hash_sep, pid_text = rest.partition("#")
        peer_id = None
        if hash_sep:
            try:
                peer_id = PeerId.parse(pid_text)
            except ConfigError as exc:
                raise ConfigError(f"{text!r}: bad peer id after '#'", field) from exc
        if rest.startswith("["):
            host, bracket, port_text = rest[1:].partition("]")
            if not bracket or not port_text.startswith(":"):
                raise ConfigError(f"{text!r}: IPv6 host must be [ADDR]:PORT", field)
            port_text = port_text[1:]
            try:
                if ipaddress.ip_address(host).version != 6:
                    raise ValueError
            except ValueError as exc:
                raise ConfigError(f"{text!r}: bad IPv6 address {host!r}", field) from exc
        else:
            host, colon, port_text = rest.rpartition(":")
            if not colon or not host:
                raise ConfigError(f"{text!r}: missing HOST:PORT", field)
            if ":" in host:
                raise ConfigError(f"{text!r}: IPv6 addresses go in brackets", field)
            _check_host(host, text, field)
        if not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
            raise ConfigError(f"{text!r}: bad port {port_text!r}", field)
        return Contact(scheme, host, int(port_text), peer_id)

    @classmethod
    def from_address(
        cls, scheme: str, address: tuple[str, int], peer_id: PeerId | None = None
    ) -> Contact:
        host = address[0].partition("%")[0]
        return cls(scheme, host, int(address[1]), peer_id)

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    @property
    def family_v6(self) -> bool:
        return ":" in self.host

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def with_peer(self, peer_id: PeerId | None) -> Contact:
        return Contact(self.scheme, self.host, self.port, peer_id, self.name)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = f"#{self.peer_id}" if self.peer_id is not None else ""
        return f"{self.scheme}://{host}:{self.port}{suffix}"


def _check_host(host: str, text: str, field: str) -> None:
    if all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise ConfigError(f"{text!r}: bad IPv4 address {host!r}", field) from exc
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ConfigError(f"{text!r}: bad host name {host!r}", field)


def format_address(scheme: str, address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A contact string for a socket address (scope ids dropped)."""
    return str(Contact.from_address(scheme, (address[0], address[1])))


def expand_wildcard(host: str) -> list[str]:
    """This host's addresses for a wildcard listen address (loopback last)."""
    if host not in ("0.0.0.0", "::"):
        return [host]
    want_v6 = host == "::"
    found: list[str] = []
    loopback: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if want_v6 != ip.is_IPv6:
                continue
            addr = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                parsed = ipaddress.ip_address(addr)
            except ValueError:
                continue
            if parsed.is_link_local:
                continue
            (loopback if parsed.is_loopback else found).append(str(parsed))
    return found + loopback


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str, field: str) -> Contact:
    """Contacts are immutable and the service parses the same few over and over (every
    handshake, introduction and gossip round): parse each text once."""
    return Contact._parse(text, field)
