"""Validated configuration: one frozen dataclass; a bad field raises ConfigError naming it."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

from crust.contact import Contact
from crust.errors import ConfigError
from crust.identity import PeerId

MiB = 1024 * 1024
ROLES = ("auto", "node", "client")
CERT_MODES = ("self-signed", "private-ca", "public-ca")
MAX_NETWORK_NAME = 64


def default_cache_path() -> Path:
    """The per-user bootstrap cache file."""
    return platformdirs.user_cache_path("crust") / "bootstrap_cache.json"


def default_identity_path() -> Path:
    """The per-user identity file used by the CLI."""
    return platformdirs.user_data_path("crust") / "identity.pem"


MAX_QUIC_DATAGRAM = 16_384
"""aioquic writes a STREAM frame's length as a 2-byte varint (< 16384), so larger packets
would carry corrupt frames."""


@dataclass(frozen=True)
class Config:
    """Everything a :class:`crust.Service` can be told. Every field has a safe default."""

    network_name: str = "crust"
    listen: tuple[str, ...] = ("tcp://0.0.0.0:0", "quic://0.0.0.0:0")
    hard_coded_contacts: tuple[str, ...] = ()
    bootstrap_cache: Path | None = field(default_factory=default_cache_path)
    bootstrap_cache_size: int = 200
    service_discovery: bool = True
    service_discovery_port: int = 5484
    port_mapping: bool = True
    hole_punching: bool = True
    relay: bool = True
    role: str = "auto"
    quic_certificates: str = "self-signed"
    quic_ca_file: Path | None = None
    quic_certificate_file: Path | None = None
    quic_private_key_file: Path | None = None
    quic_max_datagram_size: int | None = None
    """Largest UDP payload QUIC sends; None: automatic (see docs/design.md, QUIC)."""
    max_message_size: int = 2 * MiB
    heartbeat_interval: float = 20.0
    heartbeat_timeout: float = 120.0
    whitelist: tuple[str, ...] = ()
    blacklist: tuple[str, ...] = ()
    # -- beyond API.md: limits and timings a demanding user tunes --
    handshake_timeout: float = 10.0
    connect_timeout: float = 20.0
    connect_stagger: float = 0.25
    """Happy-Eyeballs delay between starting successive connection attempts."""
    tcp_head_start: float = 0.05
    """When a peer's TCP and QUIC contacts are raced, QUIC attempts start this much later."""
    birthday_sockets: int = 256
    """Symmetric NATs: extra UDP sockets opened for birthday probing (0: never)."""
    birthday_probes: int = 2500
    """Symmetric NATs: probes sent to random ports of the other side (paced at 1000/s)."""
    port_prediction: int = 8
    """Symmetric NATs with sequential port allocation: ports of our next mappings predicted
    and advertised to the other side of a punch (0: never; at most 16)."""
    punch_delay: float = 1.0
    """``connect(peer_id)``: start a hole punch this long after direct attempts began (at once
    when there is no known contact or they all failed)."""
    duplicate_probe_timeout: float = 2.0
    """How long an existing connection may take to answer before a new one replaces it."""
    send_queue_size: int = 16 * MiB
    """Bytes of queued outgoing messages per peer before drops (priority >= 2) or waits."""
    event_queue_size: int = 4096
    """Undelivered events before crust stops reading from the network (backpressure)."""
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    max_pending_handshakes: int = 256
    relay_max_circuits: int = 64
    """Relayed connections this node carries at once (``relay = true``)."""
    relay_max_circuits_per_peer: int = 8
    """Circuits one peer may have opened through this node at once."""
    relay_max_bytes: int = 256 * MiB
    """Bytes one circuit may carry (both directions together) before it is closed."""
    relay_max_seconds: float = 3600.0
    """Lifetime of one circuit."""
    relay_rate: int = 4 * MiB
    """Bytes per second one circuit may carry (token bucket)."""
    max_peer_bytes_per_second: int = 1024 * MiB
    """Bytes per second one connection may send us on average (everything it sends:
    handshake, messages, control, relayed traffic); a peer beyond it and its burst is cut
    off (``AbuseDetected(kind="flood")``), and its peer id and new connections from its
    address are refused for a minute. Generous by default: lower it to what your
    application expects from a peer."""
    max_peer_burst_bytes: int = 1024 * MiB
    """Bytes one connection may send at once above that rate (its token bucket's size;
    at least one read, 256 KiB; keep it above ``max_message_size``)."""
    keylog_file: Path | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            checker = _CHECKS.get(f.name)
            if checker is not None:
                new = checker(f.name, value)
                if new is not value:
                    object.__setattr__(self, f.name, new)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("must be greater than heartbeat_interval", "heartbeat_timeout")
        if self.quic_certificates in ("private-ca", "public-ca"):
            for name in ("quic_certificate_file", "quic_private_key_file"):
                if getattr(self, name) is None:
                    raise ConfigError(
                        f"required when quic_certificates is {self.quic_certificates!r}", name
                    )
        if self.quic_certificates == "private-ca" and self.quic_ca_file is None:
            raise ConfigError("required when quic_certificates is 'private-ca'", "quic_ca_file")
        if self.quic_certificates != "private-ca" and self.quic_ca_file is not None:
            raise ConfigError("only used when quic_certificates is 'private-ca'", "quic_ca_file")

    @classmethod
    def for_testing(cls, **overrides: Any) -> Config:
        """A config that never touches the real network: loopback listeners, no beacon,
        no port mapping, no cache file, fast heartbeats."""
        base: dict[str, Any] = {
            "listen": ("tcp://127.0.0.1:0", "quic://127.0.0.1:0"),
            "service_discovery": False,
            "port_mapping": False,
            "bootstrap_cache": None,
            "heartbeat_interval": 1.0,
            "heartbeat_timeout": 5.0,
            "handshake_timeout": 5.0,
            "connect_timeout": 10.0,
        }
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a TOML file whose keys are the field names (top level or a [crust] table)."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", "config") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}", "config") from exc
        if set(data) == {"crust"} and isinstance(data["crust"], dict):
            data = data["crust"]
        return cls.from_mapping(data)

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError("unknown configuration field", key)
        return cls(**data)


# ---------------------------------------------------------------- validators


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"must be true or false, not {v!r}", name)
    return v


def _int_range(lo: int, hi: int) -> Any:
    def check(name: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"must be an integer, not {v!r}", name)
        if not lo <= v <= hi:
            raise ConfigError(f"must be between {lo} and {hi}, not {v}", name)
        return v

    return check


def _or_none(check: Any) -> Any:
    def or_none(name: str, v: Any) -> Any:
        return None if v is None else check(name, v)

    return or_none


def _seconds(lo: float, hi: float) -> Any:
    def check(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"must be a number of seconds, not {v!r}", name)
        if not math.isfinite(v) or not lo <= v <= hi:
            raise ConfigError(f"must be between {lo} and {hi} seconds, not {v}", name)
        return float(v)

    return check


def _choice(options: tuple[str, ...]) -> Any:
    def check(name: str, v: Any) -> str:
        if v not in options:
            raise ConfigError(f"must be one of {', '.join(options)}; got {v!r}", name)
        return str(v)

    return check


def _path_or_none(name: str, v: Any) -> Path | None:
    if v is None:
        return None
    if isinstance(v, str | Path) and str(v):
        return Path(v)
    raise ConfigError(f"must be a file path or None, not {v!r}", name)


def _cache_path(name: str, v: Any) -> Path | None:
    """Like a path, but ``false`` also disables the cache (TOML has no null)."""
    if v is False:
        return None
    return _path_or_none(name, v)


def _str_tuple(name: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str) or not isinstance(v, list | tuple):
        raise ConfigError("must be a list of strings", name)
    if not all(isinstance(x, str) for x in v):
        raise ConfigError("must be a list of strings", name)
    return tuple(v)


def _contacts(name: str, v: Any) -> tuple[str, ...]:
    items = _str_tuple(name, v)
    for item in items:
        Contact.parse(item, field=name)
    return items


def _listen(name: str, v: Any) -> tuple[str, ...]:
    items = _contacts(name, v)
    for item in items:
        c = Contact.parse(item, field=name)
        if c.peer_id is not None:
            raise ConfigError(f"{item!r}: a listen address takes no #peer id", name)
        if not c.is_ip:
            raise ConfigError(f"{item!r}: listen on an IP address, not a host name", name)
    return items


def _network_name(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError("must be a non-empty string", name)
    if len(v.encode("utf-8")) > MAX_NETWORK_NAME or not v.isprintable():
        raise ConfigError(f"must be printable and at most {MAX_NETWORK_NAME} bytes", name)
    return v


def _acl(name: str, v: Any) -> tuple[str, ...]:
    items = _str_tuple(name, v)
    for item in items:
        parse_acl_entry(item, field=name)
    return items


def parse_acl_entry(
    item: str, field: str = "blacklist"
) -> PeerId | ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A white/blacklist entry: a peer id, an IP address or a CIDR."""
    if not isinstance(item, str):
        raise ConfigError(f"{item!r}: not a peer id or CIDR", field)
    try:
        return ipaddress.ip_network(item, strict=False)
    except ValueError:
        pass
    try:
        return PeerId.parse(item)
    except ConfigError:
        raise ConfigError(f"{item!r}: not a peer id, IP address or CIDR", field) from None


_CHECKS: dict[str, Any] = {
    "network_name": _network_name,
    "listen": _listen,
    "hard_coded_contacts": _contacts,
    "bootstrap_cache": _cache_path,
    "bootstrap_cache_size": _int_range(0, 100_000),
    "service_discovery": _bool,
    "service_discovery_port": _int_range(1, 65535),
    "port_mapping": _bool,
    "hole_punching": _bool,
    "relay": _bool,
    "role": _choice(ROLES),
    "quic_certificates": _choice(CERT_MODES),
    "quic_ca_file": _path_or_none,
    "quic_certificate_file": _path_or_none,
    "quic_private_key_file": _path_or_none,
    "quic_max_datagram_size": _or_none(_int_range(1200, MAX_QUIC_DATAGRAM)),
    "max_message_size": _int_range(1, 1024 * MiB),
    "heartbeat_interval": _seconds(0.01, 86400),
    "heartbeat_timeout": _seconds(0.05, 86400 * 7),
    "whitelist": _acl,
    "blacklist": _acl,
    "handshake_timeout": _seconds(0.05, 3600),
    "connect_timeout": _seconds(0.05, 3600),
    "connect_stagger": _seconds(0.0, 60),
    "tcp_head_start": _seconds(0.0, 60),
    "punch_delay": _seconds(0.0, 60),
    "birthday_sockets": _int_range(0, 1024),
    "birthday_probes": _int_range(0, 64512),
    "port_prediction": _int_range(0, 16),
    "duplicate_probe_timeout": _seconds(0.01, 600),
    "send_queue_size": _int_range(64 * 1024, 64 * 1024 * MiB),
    "event_queue_size": _int_range(16, 10_000_000),
    "max_connections": _int_range(1, 1_000_000),
    "max_connections_per_ip": _int_range(1, 1_000_000),
    "max_pending_handshakes": _int_range(1, 1_000_000),
    "relay_max_circuits": _int_range(0, 1_000_000),
    "relay_max_circuits_per_peer": _int_range(1, 1_000_000),
    "relay_max_bytes": _int_range(64 * 1024, 1 << 50),
    "relay_max_seconds": _seconds(1.0, 86400 * 365),
    "relay_rate": _int_range(64 * 1024, 1 << 40),
    "max_peer_bytes_per_second": _int_range(1024, 1 << 40),
    "max_peer_burst_bytes": _int_range(256 * 1024, 1 << 40),
    "keylog_file": _path_or_none,
}
