"""proto/beacon.py and proto/gossip.py: codec, signatures, replay window, answers (fake clock)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crust import errors
from crust.identity import Identity, PeerId
from crust.proto import beacon as bc
from crust.proto import gossip
from crust.proto.punch import MAGIC as PUNCH_MAGIC

NOW = 1_800_000_000.0
CONTACTS = ("tcp://10.1.0.2:5483", "quic://10.1.0.2:5483")


def counter_rand() -> Callable[[int], bytes]:
    return random.Random(7).randbytes


def machine(
    ident: Identity, network: str = "crust", contacts: tuple[str, ...] = CONTACTS
) -> bc.Beacon:
    return bc.Beacon(ident, network, contacts, counter_rand())


def beacon(
    ident: Identity,
    *,
    kind: bc.Kind = bc.Kind.ANNOUNCE,
    network: str = "crust",
    ts: float = NOW,
    contacts: tuple[str, ...] = CONTACTS,
) -> bytes:
    return bc.encode(ident, kind, network, int(ts * 1000), b"n" * 8, contacts)


def events(m: bc.Beacon) -> list[bc.PeerAnnounced]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


SRC = ("10.1.0.2", 5484)


def test_round_trip_and_signature() -> None:
    ident = Identity.generate()
    data = beacon(ident, kind=bc.Kind.QUERY)
    msg = bc.parse(data)
    assert msg.kind is bc.Kind.QUERY
    assert msg.peer == ident.peer_id
    assert msg.contacts == CONTACTS
    assert msg.timestamp_ms == int(NOW * 1000)
    assert msg.verify()
    tampered = bytearray(data)
    tampered[-SIG_TAMPER_OFFSET] ^= 1
    assert not bc.parse(bytes(tampered)).verify()


SIG_TAMPER_OFFSET = 70  # inside the signed part (the last contact), not the signature


def test_header_is_distinct_from_quic_stun_and_punch() -> None:
    data = beacon(Identity.generate())
    assert not data[0] & 0x40
    assert data[4:8] != bytes.fromhex("2112a442")
    assert not data.startswith(PUNCH_MAGIC)
    assert bc.is_beacon(data)
    assert not bc.is_beacon(PUNCH_MAGIC + bytes(17))


def test_contacts_are_bounded_when_encoding() -> None:
    many = tuple(f"tcp://10.0.{i // 250}.{i % 250 + 1}:5483" for i in range(40))
    msg = bc.parse(bc.encode(Identity.generate(), bc.Kind.ANNOUNCE, "crust", 1, b"x" * 8, many))
    assert len(msg.contacts) == bc.MAX_CONTACTS
    assert len(beacon(Identity.generate(), contacts=many)) <= bc.MAX_DATAGRAM


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:10],
        lambda d: d[:-1],
        lambda d: d + b"x",
        lambda d: b"\x2bcX" + d[3:],
        lambda d: d[:3] + b"\x09" + d[4:],
        lambda d: d[:4] + b"\x07" + d[5:],
        lambda d: d[: bc._HEAD.size - 1] + b"\xff" + d[bc._HEAD.size :],
        lambda d: d + bytes(bc.MAX_DATAGRAM),
    ],
)
def test_malformed_beacons_raise_protocol_error(mutate: Callable[[bytes], bytes]) -> None:
    with pytest.raises(errors.ProtocolError):
        bc.parse(mutate(beacon(Identity.generate())))


def test_contact_with_peer_id_or_hostname_is_rejected() -> None:
    ident = Identity.generate()
    for bad in (f"tcp://10.0.0.1:1#{ident.peer_id}", "tcp://example.org:1", "tcp://10.0.0.1:0"):
        with pytest.raises(errors.ProtocolError):
            bc.parse(bc.encode(ident, bc.Kind.ANNOUNCE, "crust", 1, b"x" * 8, [bad]))


@given(st.binary(max_size=1600))
def test_parse_any_bytes_raises_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(errors.ProtocolError):
        bc.parse(data)


@given(st.binary(max_size=400))
def test_parse_bytes_after_valid_header_raises_only_protocol_error(tail: bytes) -> None:
    head = beacon(Identity.from_seed(bytes(32)))[: bc._HEAD.size]
    with contextlib.suppress(errors.ProtocolError):
        bc.parse(head + tail).verify()


def test_new_peer_is_reported_once_and_again_when_contacts_change() -> None:
    me, other = Identity.generate(), Identity.generate()
    m = machine(me)
    m.receive_datagram(beacon(other), SRC, NOW)
    [ev] = events(m)
    assert ev.peer == other.peer_id and ev.contacts == CONTACTS and ev.address == SRC
    m.receive_datagram(beacon(other, ts=NOW + 1), SRC, NOW + 1)
    assert events(m) == []
    moved = ("tcp://10.1.0.9:5483",)
    m.receive_datagram(beacon(other, ts=NOW + 2, contacts=moved), SRC, NOW + 2)
    assert [e.contacts for e in events(m)] == [moved]
    assert m.counters.accepted == 3
    assert m.peers() == {other.peer_id: moved}


def test_contacts_on_the_source_address_come_first() -> None:
    m = machine(Identity.generate())
    contacts = ("tcp://192.168.5.5:1", "tcp://10.1.0.2:2")
    m.receive_datagram(beacon(Identity.generate(), contacts=contacts), SRC, NOW)
    [ev] = events(m)
    assert ev.contacts == ("tcp://10.1.0.2:2", "tcp://192.168.5.5:1")


def test_forged_other_network_stale_and_replayed_are_rejected_and_counted() -> None:
    me, other, liar = Identity.generate(), Identity.generate(), Identity.generate()
    m = machine(me)
    # forged: other's peer id, liar's signature
    good = beacon(other)
    forged = good[: -bc.SIG_LEN] + liar.sign(bc.SIG_CONTEXT + good[: -bc.SIG_LEN])
    m.receive_datagram(forged, SRC, NOW)
    # another network
    m.receive_datagram(beacon(other, network="elsewhere"), SRC, NOW)
    # stale and from the future
    m.receive_datagram(beacon(other, ts=NOW - bc.REPLAY_WINDOW - 1), SRC, NOW)
    m.receive_datagram(beacon(other, ts=NOW + bc.REPLAY_WINDOW + 1), SRC, NOW)
    # garbage
    m.receive_datagram(b"\x2bcb\x01junk", SRC, NOW)
    assert events(m) == [] and m.peers() == {}
    # accepted once, then replayed (the same datagram, and an older one)
    m.receive_datagram(good, SRC, NOW)
    assert len(events(m)) == 1
    m.receive_datagram(good, SRC, NOW + 5)
    m.receive_datagram(beacon(other, ts=NOW - 1), SRC, NOW + 5)
    assert events(m) == []
    c = m.counters
    assert (c.forged, c.other_network, c.stale, c.malformed, c.replayed, c.accepted) == (
        1,
        1,
        2,
        1,
        2,
        1,
    )
    assert c.as_dict()["beacon_forged"] == 1


def test_own_beacon_is_ignored() -> None:
    me = Identity.generate()
    m = machine(me)
    m.start(NOW)
    [mine] = m.datagrams_to_send(NOW)
    m.receive_datagram(mine, SRC, NOW)
    assert events(m) == [] and m.counters.accepted == 0


def test_start_queries_then_reannounces_with_jitter() -> None:
    m = machine(Identity.generate())
    m.start(NOW)
    [q] = m.datagrams_to_send(NOW)
    assert bc.parse(q).kind is bc.Kind.QUERY
    timer = m.get_timer()
    assert timer is not None
    assert NOW + 0.75 * bc.ANNOUNCE_INTERVAL <= timer <= NOW + 1.25 * bc.ANNOUNCE_INTERVAL
    m.handle_timer(timer - 1)
    assert m.datagrams_to_send(timer - 1) == []
    m.handle_timer(timer)
    [a] = m.datagrams_to_send(timer)
    msg = bc.parse(a)
    assert msg.kind is bc.Kind.ANNOUNCE and msg.verify()
    assert msg.timestamp_ms > bc.parse(q).timestamp_ms


def test_queries_are_answered_after_a_short_random_delay_and_rate_limited() -> None:
    m = machine(Identity.generate())
    m.start(NOW)
    m.datagrams_to_send(NOW)
    announce_at = m.get_timer()
    askers = [Identity.generate() for _ in range(5)]
    m.receive_datagram(beacon(askers[0], kind=bc.Kind.QUERY), SRC, NOW)
    timer = m.get_timer()
    assert timer is not None and NOW <= timer <= NOW + bc.ANSWER_DELAY_MAX
    # more queries before the answer left share that answer
    for a in askers[1:3]:
        m.receive_datagram(beacon(a, kind=bc.Kind.QUERY), SRC, NOW)
    assert m.get_timer() == timer
    m.handle_timer(timer)
    out = m.datagrams_to_send(timer)
    assert [bc.parse(d).kind for d in out] == [bc.Kind.ANNOUNCE]
    assert m.counters.answers == 1
    # the re-announce moved after the answer
    nxt_announce = m.get_timer()
    assert announce_at is not None and nxt_announce is not None
    assert nxt_announce >= timer + 0.75 * bc.ANNOUNCE_INTERVAL
    # a query right after waits for the minimum gap
    m.receive_datagram(beacon(askers[3], kind=bc.Kind.QUERY, ts=timer), SRC, timer)
    nxt = m.get_timer()
    assert nxt is not None and nxt >= timer + bc.ANSWER_MIN_GAP
    m.handle_timer(nxt)
    assert len(m.datagrams_to_send(nxt)) == 1
    # announcements are not answered
    m.receive_datagram(beacon(askers[4], ts=nxt), SRC, nxt)
    assert m.get_timer() is not None and m.get_timer() > nxt + 1  # type: ignore[operator]


def test_input_flood_is_dropped_before_verification() -> None:
    m = machine(Identity.generate())
    junk = beacon(Identity.generate(), network="other")
    for _ in range(bc.MAX_INPUT_RATE + 50):
        m.receive_datagram(junk, SRC, NOW)
    assert m.counters.rate_limited == 50
    m.receive_datagram(junk, SRC, NOW + 1.0)
    assert m.counters.rate_limited == 50


def test_peer_table_is_bounded_and_expires() -> None:
    m = bc.Beacon(Identity.generate(), "crust", CONTACTS, counter_rand(), max_peers=3)
    idents = [Identity.generate() for _ in range(5)]
    for ident in idents:
        m.receive_datagram(beacon(ident), SRC, NOW)
    assert set(m.peers()) == {i.peer_id for i in idents[2:]}
    m.handle_timer(NOW + 3 * m.interval + 1)
    assert m.peers() == {}


def test_set_contacts_announces_at_once() -> None:
    m = machine(Identity.generate())
    m.start(NOW)
    m.datagrams_to_send(NOW)
    m.set_contacts(CONTACTS, NOW + 1)
    assert m.datagrams_to_send(NOW + 1) == []
    m.set_contacts(("tcp://10.9.9.9:1",), NOW + 2)
    [d] = m.datagrams_to_send(NOW + 2)
    assert bc.parse(d).contacts == ("tcp://10.9.9.9:1",)


# ===================================================================== gossip


def test_gossip_round_trip_and_bounds() -> None:
    peers = {
        Identity.generate().peer_id: [f"tcp://10.0.0.{i}:1", "quic://10.0.0.1:2"] for i in range(40)
    }
    payload = gossip.encode(peers)
    assert payload["t"] == "gp"
    parsed = gossip.parse(payload)
    assert len(parsed) == gossip.MAX_ENTRIES
    for peer, contacts in parsed.items():
        assert list(contacts) == peers[peer]


def test_gossip_contacts_lose_their_pin() -> None:
    peer = Identity.generate().peer_id
    parsed = gossip.parse({"t": "gp", "p": [[bytes(peer), [f"tcp://10.0.0.1:1#{peer}"]]]})
    assert parsed[peer] == ("tcp://10.0.0.1:1",)


@pytest.mark.parametrize(
    "payload",
    [
        {"t": "gp"},
        {"t": "gp", "p": "x"},
        {"t": "gp", "p": [[b"x" * 31, ["tcp://10.0.0.1:1"]]]},
        {"t": "gp", "p": [[b"x" * 32, []]]},
        {"t": "gp", "p": [[b"x" * 32, ["tcp://host.example:1"]]]},
        {"t": "gp", "p": [[b"x" * 32, ["tcp://10.0.0.1:1"] * 9]]},
        {"t": "gp", "p": [[b"x" * 32, [7]]]},
        {"t": "gp", "p": [[b"x" * 32, ["tcp://10.0.0.1:1"]]] * 33},
    ],
)
def test_bad_gossip_raises_protocol_error(payload: dict[str, object]) -> None:
    with pytest.raises(errors.ProtocolError):
        gossip.parse(payload)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=20,
)


@given(_json)
def test_gossip_parse_of_anything_raises_only_protocol_error(value: object) -> None:
    with contextlib.suppress(errors.ProtocolError):
        gossip.parse({"t": "gp", "p": value})


def test_gossip_limiter() -> None:
    lim = gossip.GossipLimiter(min_gap=5.0, max_peers=2)
    a, b, c = (PeerId(bytes([i]) * 32) for i in (1, 2, 3))
    assert lim.allow(a, 0.0)
    assert not lim.allow(a, 4.9)
    assert lim.allow(a, 5.0)
    assert lim.allow(b, 0.0) and lim.allow(c, 0.0)
    assert lim.allow(a, 5.1)  # a was evicted by the bound


def test_cli_json_encodes_lan_peer_discovered() -> None:
    from crust.cli.protocol import dumps, encode_event
    from crust.events import LanPeerDiscovered

    peer = Identity.generate().peer_id
    contacts = (f"tcp://10.1.0.2:7000#{peer}", f"quic://10.1.0.2:7000#{peer}")
    line = encode_event(LanPeerDiscovered(peer, contacts))
    assert line == {"event": "lan_peer_discovered", "peer": str(peer), "contacts": list(contacts)}
    assert '"lan_peer_discovered"' in dumps(line)


def test_bootstrap_tries_lan_peers_last() -> None:
    from crust.bootstrap import Bootstrapper
    from crust.config import Config

    me, lan = Identity.generate().peer_id, Identity.generate().peer_id

    async def connect(target: object) -> PeerId:
        raise AssertionError("not dialled here")

    boot = Bootstrapper(
        Config.for_testing(hard_coded_contacts=("tcp://192.0.2.1:1",)),
        me,
        connect=connect,
        emit=lambda e: None,
        spawn=lambda c: c.close(),
    )
    assert [a.contacts for a in boot.attempts()] == [("tcp://192.0.2.1:1",)]
    pinned = (f"tcp://10.1.0.3:7000#{lan}", f"quic://10.1.0.3:7000#{lan}")
    boot.lan_peers = lambda: {lan: pinned, me: (f"tcp://10.1.0.4:7000#{me}",)}
    assert [a.contacts for a in boot.attempts()] == [("tcp://192.0.2.1:1",), pinned]


@given(st.lists(st.text(max_size=40), max_size=4))
def test_any_contact_text_in_a_signed_beacon_raises_only_protocol_error(texts: list[str]) -> None:
    data = bc.encode(Identity.from_seed(bytes(32)), bc.Kind.ANNOUNCE, "crust", 1, b"x" * 8, texts)
    with contextlib.suppress(errors.ProtocolError):
        bc.parse(data)


@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_any_contact_text_in_gossip_raises_only_protocol_error(texts: list[str]) -> None:
    with contextlib.suppress(errors.ProtocolError):
        gossip.parse({"t": "gp", "p": [[bytes(32), texts]]})


_contactish = st.builds(
    lambda scheme, host, port, pin: f"{scheme}://{host}:{port}{pin}",
    st.sampled_from(["tcp", "quic", "udp", "TCP", ""]),
    st.one_of(
        st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
        st.ip_addresses().map(str),
        st.text(max_size=12),
    ),
    st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6)),
    st.sampled_from(["", "#", "#abc", f"#{PeerId(bytes(32))}"]),
)


@given(st.lists(_contactish, min_size=1, max_size=4))
def test_contact_like_text_raises_only_protocol_error(texts: list[str]) -> None:
    data = bc.encode(Identity.from_seed(bytes(32)), bc.Kind.ANNOUNCE, "crust", 1, b"x" * 8, texts)
    with contextlib.suppress(errors.ProtocolError):
        bc.parse(data)
    with contextlib.suppress(errors.ProtocolError):
        gossip.parse({"t": "gp", "p": [[bytes(32), texts]]})
