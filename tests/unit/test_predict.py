"""proto/predict.py: measuring a sequential port allocation and predicting the next ports
(fake clock: sample times are plain numbers)."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crust import errors
from crust.identity import Identity
from crust.proto import predict as pr
from crust.proto import punch as pp

TOKEN = bytes(range(16))


def samples(*ports: int, start: float = 50.0, gap: float = 0.01) -> list[pr.PortSample]:
    return [pr.PortSample(p, start + i * gap) for i, p in enumerate(ports)]


@pytest.mark.parametrize(
    ("ports", "delta"),
    [
        ((20000, 20001, 20002), 1),
        ((40000, 40003, 40006, 40009), 3),
        ((30010, 30008, 30006), -2),  # counting down
        ((65534, 65535, 1024), 1),  # across the wrap of the port range
        ((20000, 20001, 20004, 20005), 1),  # other flows took 20002 and 20003
        ((20000, 20002, 20003), 1),  # one port taken by another flow in between
        ((5000, 5016, 5032), 16),
    ],
)
def test_sequential_allocations_are_measured(ports: tuple[int, ...], delta: int) -> None:
    a = pr.measure(samples(*ports))
    assert a is not None
    assert (a.delta, a.last, a.samples) == (delta, ports[-1], len(ports))
    assert a.at == pytest.approx(50.0 + 0.01 * (len(ports) - 1))


@pytest.mark.parametrize(
    "ports",
    [
        (20000, 20001),  # too few samples
        (20000, 20001, 20001),  # a repeated port: not a new mapping each time
        (20000, 20000, 20000),  # port-preserving / stable: nothing to predict
        (20000, 20001, 20000),  # back and forth
        (20000, 20017, 20034),  # step 17: not a small delta
        (20000, 20100, 20200),  # far apart
        (31337, 4711, 60001),  # random
        (20000, 20004, 20006, 20009),  # steps 4, 2, 3: 3 is not a multiple of 2
        (80000, 80001, 80002),  # not ports
        (100, 101, 102),  # well-known range: NATs do not allocate there
    ],
)
def test_other_allocations_predict_nothing(ports: tuple[int, ...]) -> None:
    assert pr.measure(samples(*ports)) is None


def test_samples_must_be_quick_and_in_time_order() -> None:
    assert pr.measure(samples(20000, 20001, 20002, gap=1.0)) is not None
    assert pr.measure(samples(20000, 20001, 20002, gap=2.0)) is None  # 4 s > window
    late_first = [pr.PortSample(20000, 10.0), pr.PortSample(20001, 9.0), pr.PortSample(20002, 11)]
    assert pr.measure(late_first) is None
    # only the newest MAX_SAMPLES count: an old random sample is forgotten
    old = [pr.PortSample(4711, 0.0)]
    assert pr.measure(old + samples(*range(20000, 20000 + pr.MAX_SAMPLES))) is not None
    with pytest.raises(ValueError, match="two samples"):
        pr.measure(samples(1, 2, 3), min_samples=1)


def test_prediction_lists_the_next_ports_and_is_bounded() -> None:
    a = pr.measure(samples(20000, 20003, 20006))
    assert a is not None
    assert a.predict(4) == (20009, 20012, 20015, 20018)
    assert a.predict(2, skip=1) == (20012, 20015)  # one mapping will be used by something else
    assert len(a.predict(1000)) == pr.MAX_PREDICTED
    assert a.predict(0) == ()
    assert a.predict(-3) == ()
    down = pr.measure(samples(1030, 1028, 1026))
    assert down is not None
    assert down.predict(3) == (1024, 65534, 65532)  # wraps within 1024..65535
    assert a.fresh(a.at + 1.0)
    assert not a.fresh(a.at + pr.MAX_AGE + 0.1)
    assert not a.fresh(a.at - 1.0)


@given(
    st.lists(st.tuples(st.integers(-10, 70000), st.floats(-1e3, 1e3, allow_nan=False)), max_size=12)
)
def test_measure_never_raises_and_predicts_valid_ports(raw: list[tuple[int, float]]) -> None:
    got = pr.measure([pr.PortSample(p, t) for p, t in raw])
    if got is None:
        return
    assert 0 < abs(got.delta) <= pr.MAX_DELTA
    for port in got.predict(pr.MAX_PREDICTED):
        assert 1024 <= port <= 65535


@given(st.integers(1024, 65535), st.integers(-16, 16).filter(bool), st.integers(3, 8))
def test_any_fixed_small_step_is_found(first: int, delta: int, n: int) -> None:
    ports = [1024 + (first - 1024 + delta * i) % (65536 - 1024) for i in range(n)]
    got = pr.measure(samples(*ports))
    assert got is not None
    assert got.delta == delta
    assert got.predict(1) == (1024 + (ports[-1] - 1024 + delta) % (65536 - 1024),)


# ----------------------------------------------------------------------------- on the wire


def test_predicted_addresses_are_cleaned_and_bound_to_known_hosts() -> None:
    items = [
        "quic://198.18.0.10:20001",
        "tcp://198.18.0.10:30001",
        "quic://198.18.0.99:20002",  # another host: a third party, never probed
        "quic://10.1.0.2:20003",  # a LAN address
        "udp://198.18.0.10:1",
        5,
        *[f"quic://198.18.0.10:{21000 + i}" for i in range(40)],
    ]
    tcp, quic = pp.split_predicted(items, ["198.18.0.10", "10.1.0.2"])
    assert tcp == [("198.18.0.10", 30001)]
    assert quic[0] == ("198.18.0.10", 20001)
    assert len(quic) == pr.MAX_PREDICTED
    assert all(host == "198.18.0.10" for host, _ in quic)
    assert pp.split_predicted(items, []) == ([], [])


def test_connection_info_carries_predictions() -> None:
    pid = Identity.generate().peer_id
    predicted = ("quic://198.18.0.10:20001", "quic://198.18.0.10:20002")
    info = pp.PublicConnectionInfo(pid, ("quic://198.18.0.10:7100",), TOKEN, predicted)
    assert pp.PublicConnectionInfo.from_bytes(info.to_bytes()) == info
    plain = pp.PublicConnectionInfo(pid, ("quic://198.18.0.10:7100",), TOKEN)
    assert "p" not in msgpack.unpackb(plain.to_bytes())  # no predictions: the old form
    assert pp.PublicConnectionInfo.from_bytes(plain.to_bytes()).predicted == ()
    body = {"v": 1, "id": bytes(pid), "c": [], "n": TOKEN, "p": "quic://198.18.0.10:1"}
    with pytest.raises(errors.ProtocolError, match="predicted"):
        pp.PublicConnectionInfo.from_bytes(msgpack.packb(body))
    body["p"] = [f"quic://198.18.0.10:{20000 + i}" for i in range(100)] + [None, "x"]
    got = pp.PublicConnectionInfo.from_bytes(msgpack.packb(body))
    assert len(got.predicted) == 2 * pr.MAX_PREDICTED


@given(
    st.fixed_dictionaries(
        {"v": st.just(1), "id": st.binary(min_size=32, max_size=32), "n": st.just(TOKEN)},
        optional={
            "c": st.lists(st.text(max_size=30), max_size=5),
            "p": st.one_of(
                st.lists(
                    st.one_of(st.text(max_size=40), st.integers(0, 2**32), st.none()), max_size=40
                ),
                st.text(max_size=10),
                st.integers(-(2**31), 2**31),
            ),
        },
    )
)
def test_any_predictions_in_connection_info_parse_or_protocol_error(
    body: dict[str, object],
) -> None:
    with contextlib.suppress(errors.ProtocolError):
        info = pp.PublicConnectionInfo.from_bytes(msgpack.packb(body))
        assert len(info.predicted) <= 2 * pr.MAX_PREDICTED


# ----------------------------------------------------------------------------- in the plan


def test_predicted_ports_are_probed_first_from_round_one_and_bounded() -> None:
    predicted = [("198.18.0.10", 20001 + i) for i in range(8)]
    plan = pp.PunchPlan(
        token=TOKEN,
        tcp=[],
        quic=[("198.18.0.10", 7100), ("10.1.0.2", 7100), ("198.18.0.10", 20001)],
        start=0.0,
        dialer=True,
        params=pp.PunchParams(max_prediction_probes=20),
        predicted=predicted,
    )
    plan.handle_timer(0.0)
    sent = [a.address for a in plan.actions() if isinstance(a, pp.SendProbe)]
    # predictions first and in order (each is a new flow through our own NAT), then the rest,
    # without sending twice to an address that is both
    assert sent == [*predicted, ("198.18.0.10", 7100), ("10.1.0.2", 7100)]
    for i in range(1, 10):
        plan.handle_timer(0.05 * i)
    probes = [a.address for a in plan.actions() if isinstance(a, pp.SendProbe)]
    assert sum(1 for a in probes if a in predicted) == 20 - 8  # the prediction budget
    assert plan.prediction_probes_sent == 20
    assert probes.count(("198.18.0.10", 7100)) == 9  # the ordinary probes go on
    # a probe from a predicted port works like any other path
    plan.datagram_received(pp.parse(pp.encode(pp.Kind.PROBE, TOKEN)), predicted[3], 0.5)
    acts = plan.actions()
    assert pp.SendProbe(predicted[3], pp.encode(pp.Kind.ACK, TOKEN)) in acts
    assert pp.DialQuic(predicted[3]) in acts


def test_predicted_tcp_ports_are_dialled_first_every_round() -> None:
    plan = pp.PunchPlan(
        token=TOKEN,
        tcp=[("198.18.0.10", 7101)],
        quic=[],
        start=0.0,
        dialer=True,
        predicted_tcp=[("198.18.0.10", 30001), ("198.18.0.10", 30002)],
    )
    plan.handle_timer(0.0)
    dials = [a.address for a in plan.actions() if isinstance(a, pp.DialTcp)]
    assert dials == [("198.18.0.10", 30001), ("198.18.0.10", 30002), ("198.18.0.10", 7101)]
    plan.handle_timer(1.0)
    assert not [a for a in plan.actions() if isinstance(a, pp.DialTcp)]
    plan.handle_timer(2.0)
    assert len([a for a in plan.actions() if isinstance(a, pp.DialTcp)]) == 3
    only_predicted = pp.PunchPlan(
        token=TOKEN, tcp=[], quic=[], start=0.0, dialer=True, predicted_tcp=[("1.2.3.4", 5)]
    )
    assert only_predicted.get_timer() == 0.0
    only_predicted.handle_timer(0.0)
    assert pp.DialTcp(("1.2.3.4", 5)) in only_predicted.actions()
