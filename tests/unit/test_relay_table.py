"""proto/relay.py: the node's circuit table (admission, routing, windows, limits)."""

from __future__ import annotations

import pytest

from crust import errors
from crust.proto.relay import MAX_CHUNK, RelayLimits, RelayTable


def opened(limits: RelayLimits | None = None) -> tuple[RelayTable, int]:
    t = RelayTable(limits or RelayLimits())
    b_cid = t.open("A", 7, "B", now=0.0)
    assert t.accept("B", b_cid) == ("A", 7)
    return t, b_cid


def test_data_and_credit_are_routed_both_ways() -> None:
    t, b_cid = opened()
    assert t.route_data("A", 7, 1000, now=0.0) == ("B", b_cid)
    assert t.route_data("B", b_cid, 10, now=0.0) == ("A", 7)
    assert t.route_credit("B", b_cid, 1000, now=0.0)[:2] == ("A", 7)
    assert t.route_credit("A", 7, 10, now=0.0)[:2] == ("B", b_cid)
    with pytest.raises(errors.ProtocolError, match="bad relay credit"):
        t.route_credit("B", b_cid, 1, now=0.0)  # nothing of A's is in flight any more


def test_data_before_accept_or_on_unknown_circuits_is_refused() -> None:
    t = RelayTable()
    b_cid = t.open("A", 1, "B", now=0.0)
    with pytest.raises(errors.ProtocolError):
        t.route_data("A", 1, 10, now=0.0)
    with pytest.raises(errors.ProtocolError):
        t.route_data("A", 99, 10, now=0.0)
    with pytest.raises(errors.ProtocolError):
        t.accept("A", b_cid)  # only B accepts
    with pytest.raises(errors.ProtocolError):
        t.open("A", 1, "B", now=0.0)  # number in use
    for bad in (0, -1, 2**31, True):
        with pytest.raises(errors.ProtocolError):
            t.open("A", bad, "B", now=0.0)


def test_the_window_bounds_what_the_node_holds() -> None:
    t, _ = opened(RelayLimits(window=2 * MAX_CHUNK))
    t.route_data("A", 7, MAX_CHUNK, now=0.0)
    t.route_data("A", 7, MAX_CHUNK, now=0.0)
    with pytest.raises(errors.ProtocolError, match="window"):
        t.route_data("A", 7, 1, now=0.0)
    with pytest.raises(errors.ProtocolError, match="too large"):
        opened()[0].route_data("A", 7, MAX_CHUNK + 1, now=0.0)


def test_byte_and_lifetime_limits() -> None:
    t, _ = opened(RelayLimits(max_bytes=1500))
    t.route_data("A", 7, 1000, now=0.0)
    with pytest.raises(errors.LimitExceeded, match="byte limit"):
        t.route_data("A", 7, 1000, now=0.0)
    t2, _ = opened(RelayLimits(max_seconds=10))
    with pytest.raises(errors.LimitExceeded, match="lifetime"):
        t2.route_data("A", 7, 1, now=11.0)
    assert sorted(t2.expired(now=11.0)) == sorted([("A", 7), ("B", 1)])
    assert t2.circuits == 0


def test_bandwidth_is_paced_by_holding_back_credit() -> None:
    t, b_cid = opened(RelayLimits(rate=1000.0, window=4000))
    t.route_data("A", 7, 4000, now=0.0)
    assert t.route_credit("B", b_cid, 4000, now=0.0)[2] == 0.0  # within the burst
    t.route_data("A", 7, 2000, now=0.0)
    _, _, delay = t.route_credit("B", b_cid, 2000, now=0.0)
    assert delay == pytest.approx(2.0)  # 2000 bytes over budget at 1000 B/s


def test_circuit_counts_are_limited() -> None:
    t = RelayTable(RelayLimits(max_circuits=3, max_circuits_per_peer=2))
    t.open("A", 1, "B", now=0.0)
    t.open("A", 2, "C", now=0.0)
    with pytest.raises(errors.LimitExceeded, match="for this peer"):
        t.open("A", 3, "D", now=0.0)
    t.open("D", 1, "E", now=0.0)
    with pytest.raises(errors.LimitExceeded, match="too many circuits"):
        t.open("F", 1, "G", now=0.0)


def test_close_and_drop_tell_the_other_end() -> None:
    t, b_cid = opened()
    assert t.close("B", b_cid) == ("A", 7)
    assert t.close("B", b_cid) is None
    t.open("A", 8, "B", now=0.0)
    t.open("C", 1, "A", now=0.0)
    assert sorted(t.drop("A"), key=str) == sorted([("B", 2), ("C", 1)], key=str)
    assert t.circuits == 0
