"""Identity, peer ids, contacts and configuration validation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crust import Config, Contact, Identity, PeerId
from crust.errors import ConfigError


def test_peer_id_text_round_trip_and_order() -> None:
    ids = [Identity.generate().peer_id for _ in range(20)]
    for pid in ids:
        text = str(pid)
        assert len(text) == 52 and text == text.lower() and "=" not in text
        assert PeerId.parse(text) == pid
        assert PeerId(bytes(pid)) == pid
    assert sorted(ids) == sorted(ids, key=bytes)
    assert len({*ids}) == 20


@pytest.mark.parametrize("bad", ["", "abc", "A" * 52, "1" * 52, "a" * 53, "8" * 52])
def test_peer_id_parse_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        PeerId.parse(bad)


@given(st.text(max_size=80))
def test_peer_id_parse_any_text(text: str) -> None:
    try:
        pid = PeerId.parse(text)
    except ConfigError:
        return
    assert str(pid) == text


def test_identity_save_load_0600(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "sub" / "id.pem"
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load(path)
    assert again.peer_id == ident.peer_id
    sig = again.sign(b"m")
    assert ident.peer_id.verify(sig, b"m")
    assert not ident.peer_id.verify(sig, b"other")
    assert Identity.load_or_create(path).peer_id == ident.peer_id


def test_identity_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="identity"):
        Identity.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="identity"):
        Identity.load(bad)


def test_contact_parse_and_format() -> None:
    pid = Identity.generate().peer_id
    c = Contact.parse(f"tcp://[::1]:5483#{pid}")
    assert (c.scheme, c.host, c.port, c.peer_id) == ("tcp", "::1", 5483, pid)
    assert str(c) == f"tcp://[::1]:5483#{pid}"
    assert str(Contact.parse("quic://10.0.0.1:9")) == "quic://10.0.0.1:9"
    assert Contact.parse("tcp://example.org:80").host == "example.org"


@pytest.mark.parametrize(
    ("bad", "part"),
    [
        ("udp://1.2.3.4:5", "scheme"),
        ("tcp://1.2.3.4", "HOST:PORT"),
        ("tcp://1.2.3.4:70000", "port"),
        ("tcp://::1:5", "brackets"),
        ("tcp://[zz]:5", "IPv6"),
        ("tcp://1.2.3.999:5", "IPv4"),
        ("tcp://1.2.3.4:5#nope", "peer id"),
        ("1.2.3.4:5", "SCHEME"),
        ("tcp://bad_host!:5", "host"),
    ],
)
def test_contact_errors_name_the_part(bad: str, part: str) -> None:
    with pytest.raises(ConfigError, match=part):
        Contact.parse(bad)


@given(st.text(max_size=120))
def test_contact_parse_any_text(text: str) -> None:
    try:
        c = Contact.parse(text)
    except ConfigError:
        return
    assert Contact.parse(str(c)) == c


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("network_name", ""),
        ("network_name", "x" * 65),
        ("listen", "tcp://0.0.0.0:0"),
        ("listen", ["udp://0.0.0.0:0"]),
        ("listen", ["tcp://localhost:0"]),
        ("hard_coded_contacts", ["tcp://1.2.3.4"]),
        ("bootstrap_cache_size", -1),
        ("service_discovery", "yes"),
        ("service_discovery_port", 0),
        ("role", "server"),
        ("quic_certificates", "none"),
        ("max_message_size", 0),
        ("heartbeat_interval", float("nan")),
        ("heartbeat_timeout", 0.5),
        ("blacklist", ["not-a-cidr"]),
        ("whitelist", ["10.0.0.0/33"]),
        ("max_connections", True),
        ("quic_max_datagram_size", 1199),
        ("quic_max_datagram_size", 16_385),
        ("quic_max_datagram_size", "1350"),
        ("relay_max_circuits", -1),
        ("relay_max_circuits_per_peer", 0),
        ("relay_max_bytes", 1024),
        ("relay_max_seconds", 0.0),
        ("relay_rate", 1.5),
    ],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        Config.for_testing(**{field: value})
    assert info.value.field == field


def test_quic_max_datagram_size_default_is_automatic() -> None:
    assert Config().quic_max_datagram_size is None
    assert Config.for_testing(quic_max_datagram_size=1452).quic_max_datagram_size == 1452


def test_private_ca_needs_files() -> None:
    with pytest.raises(ConfigError) as info:
        Config.for_testing(quic_certificates="private-ca")
    assert info.value.field == "quic_certificate_file"


def test_for_testing_touches_no_real_network() -> None:
    cfg = Config.for_testing()
    assert all("127.0.0.1" in x or "[::1]" in x for x in cfg.listen)
    assert not cfg.service_discovery and not cfg.port_mapping and cfg.bootstrap_cache is None


def test_load_toml(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('network_name = "lab"\nlisten = ["tcp://127.0.0.1:0"]\nheartbeat_interval = 2\n')
    cfg = Config.load(p)
    assert cfg.network_name == "lab" and cfg.listen == ("tcp://127.0.0.1:0",)
    assert cfg.heartbeat_interval == 2.0
    p.write_text("[crust]\nrole = 'node'\n")
    assert Config.load(p).role == "node"
    p.write_text("netwrk_name = 'x'\n")
    with pytest.raises(ConfigError) as info:
        Config.load(p)
    assert info.value.field == "netwrk_name"
    p.write_text("network_name = \n")
    with pytest.raises(ConfigError, match="TOML"):
        Config.load(p)
    p.write_text("max_message_size = 'big'\n")
    with pytest.raises(ConfigError) as info:
        Config.load(p)
    assert info.value.field == "max_message_size"
