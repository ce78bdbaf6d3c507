"""The lab's link emulator (tests/lab/linkemu.py): its scheduling, without sockets.

Time is a number passed in and randomness a scripted source (or a seeded ``random.Random``),
so every case is exact and repeatable.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.lab import linkemu
from tests.lab.linkemu import Direction, Emulator, Impairment, Schedule

NOW = 100.0


class Scripted:
    """A random source that returns the values it was given, in order."""

    def __init__(self, randoms: Iterable[float] = (), uniforms: Iterable[float] = ()) -> None:
        self.randoms = list(randoms)
        self.uniforms = list(uniforms)

    def random(self) -> float:
        return self.randoms.pop(0)

    def uniform(self, a: float, b: float) -> float:
        value = self.uniforms.pop(0)
        assert a <= value <= b
        return value

    def used_up(self) -> bool:
        return not self.randoms and not self.uniforms


def test_an_unimpaired_frame_leaves_at_once_and_draws_nothing() -> None:
    d = Direction()
    rng = Scripted()
    assert d.admit(60, NOW, rng) == [NOW]
    d.sent(60, held=False)
    c = d.counters
    assert (c.frames_in, c.bytes_in, c.frames_out, c.bytes_out, c.queued) == (1, 60, 1, 60, 0)


def test_delay_holds_a_frame_and_jitter_moves_it_both_ways_but_never_before_now() -> None:
    d = Direction(Impairment(delay=0.05, jitter=0.05))
    assert d.admit(10, NOW, Scripted(uniforms=[0.02])) == [pytest.approx(NOW + 0.07)]
    assert d.admit(10, NOW, Scripted(uniforms=[-0.03])) == [pytest.approx(NOW + 0.02)]
    assert d.admit(10, NOW, Scripted(uniforms=[-0.05])) == [NOW]  # clipped at zero delay
    assert d.counters.queued == 2  # the third left at once
    assert d.counters.max_queued == 2


def test_loss_drops_the_frame_and_counts_it() -> None:
    d = Direction(Impairment(delay=0.01, loss=0.05))
    assert d.admit(10, NOW, Scripted(randoms=[0.049])) == []
    assert d.admit(10, NOW, Scripted(randoms=[0.05])) == [NOW + 0.01]
    assert (d.counters.frames_in, d.counters.lost, d.counters.queued) == (2, 1, 1)


def test_duplication_sends_two_copies_each_with_its_own_delay() -> None:
    d = Direction(Impairment(delay=0.05, jitter=0.01, duplicate=0.02))
    rng = Scripted(randoms=[0.01], uniforms=[0.005, -0.01])
    assert d.admit(10, NOW, rng) == [pytest.approx(NOW + 0.055), pytest.approx(NOW + 0.04)]
    assert rng.used_up()
    assert (d.counters.duplicated, d.counters.queued) == (1, 2)
    d.sent(10, held=True)
    d.sent(10, held=True)
    assert (d.counters.frames_out, d.counters.queued) == (2, 0)


def test_a_reordered_frame_skips_the_delay() -> None:
    d = Direction(Impairment(delay=0.05, reorder=0.05))
    assert d.admit(10, NOW, Scripted(randoms=[0.04])) == [NOW]
    assert d.admit(10, NOW, Scripted(randoms=[0.06])) == [NOW + 0.05]
    assert (d.counters.reordered, d.counters.queued) == (1, 1)


def test_reordering_without_a_delay_means_nothing_and_draws_nothing() -> None:
    d = Direction(Impairment(reorder=0.5))
    rng = Scripted()
    assert d.admit(10, NOW, rng) == [NOW]
    assert d.counters.reordered == 0


def test_each_copy_of_a_duplicate_may_be_reordered_on_its_own() -> None:
    d = Direction(Impairment(delay=0.05, duplicate=1.0, reorder=0.5))
    # duplicate draw, then one reorder draw per copy: first copy at once, second delayed
    assert d.admit(10, NOW, Scripted(randoms=[0.0, 0.1, 0.9])) == [NOW, NOW + 0.05]
    assert (d.counters.duplicated, d.counters.reordered, d.counters.queued) == (1, 1, 1)


def test_the_queue_is_bounded_and_an_overflow_keeps_only_what_leaves_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linkemu, "MAX_QUEUED", 2)
    d = Direction(Impairment(delay=0.05, duplicate=1.0, reorder=0.5))
    assert d.admit(10, NOW, Scripted(randoms=[0.0, 0.9, 0.9])) == [NOW + 0.05] * 2
    # full: the delayed copy is lost, the reordered one still leaves
    assert d.admit(10, NOW, Scripted(randoms=[0.0, 0.1, 0.9])) == [NOW]
    assert (d.counters.overflowed, d.counters.queued, d.counters.max_queued) == (1, 2, 2)


def test_a_failed_send_is_counted_and_frees_its_place_in_the_queue() -> None:
    d = Direction(Impairment(delay=0.01))
    d.admit(10, NOW, Scripted())
    d.sent(10, held=True, ok=False)
    assert (d.counters.send_errors, d.counters.frames_out, d.counters.queued) == (1, 0, 0)


def test_schedule_releases_by_time_and_equal_times_in_arrival_order() -> None:
    s: Schedule[str] = Schedule()
    assert s.next_due() is None
    s.push(3.0, "late")
    s.push(1.0, "first")
    s.push(2.0, "x")
    s.push(2.0, "y")
    assert (len(s), s.next_due()) == (4, 1.0)
    assert s.pop_due(0.5) == []
    assert s.pop_due(2.0) == ["first", "x", "y"]
    assert s.next_due() == 3.0
    assert s.pop_due(10.0) == ["late"]
    assert len(s) == 0


def _run_link(imp: Impairment, frames: int, seed: int) -> tuple[list[int], Direction]:
    """Frames 0..frames-1, one per millisecond, through one direction: the order they leave."""
    d = Direction(imp)
    rng = random.Random(seed)
    s: Schedule[int] = Schedule()
    out: list[int] = []
    for i in range(frames):
        now = i / 1000
        for seq in s.pop_due(now):
            out.append(seq)
            d.sent(100, held=True)
        for due in d.admit(100, now, rng):
            if due <= now:
                out.append(i)
                d.sent(100, held=False)
            else:
                s.push(due, i)
    for seq in s.pop_due(float("inf")):
        out.append(seq)
        d.sent(100, held=True)
    return out, d


def test_a_delayed_link_without_jitter_keeps_the_order() -> None:
    out, d = _run_link(Impairment(delay=0.03), 2000, seed=1)
    assert out == list(range(2000))
    # 30 ms of frames at one per millisecond (31 when float rounding makes one leave late)
    assert d.counters.max_queued in (30, 31)


def test_the_fault_suite_impairment_has_the_asked_rates_and_reorders() -> None:
    """The lab fault test's setting, 20 000 frames: the rates come out as asked, every frame
    that is not lost leaves (twice when duplicated), and many leave out of order."""
    imp = Impairment(delay=0.05, jitter=0.05, loss=0.05, duplicate=0.02, reorder=0.05)
    n = 20_000
    out, d = _run_link(imp, n, seed=7)
    c = d.counters
    assert c.lost / n == pytest.approx(0.05, abs=0.006)
    assert c.duplicated / (n - c.lost) == pytest.approx(0.02, abs=0.004)
    copies = n - c.lost + c.duplicated
    assert c.reordered / copies == pytest.approx(0.05, abs=0.006)
    assert len(out) == c.frames_out == copies
    assert c.queued == 0
    seen = set(out)
    assert len(seen) == n - c.lost
    assert len(out) - len(seen) == c.duplicated
    overtaken = sum(1 for x, y in itertools.pairwise(out) if y < x)
    assert overtaken > n // 10  # jitter as large as the delay mixes the frames thoroughly


def test_the_same_seed_gives_the_same_fates() -> None:
    imp = Impairment(delay=0.02, jitter=0.02, loss=0.1, duplicate=0.1, reorder=0.1)
    assert _run_link(imp, 500, seed=3)[0] == _run_link(imp, 500, seed=3)[0]
    assert _run_link(imp, 500, seed=3)[0] != _run_link(imp, 500, seed=4)[0]


def test_impairment_from_a_request() -> None:
    imp = Impairment.from_request(
        {"delay_ms": 50, "jitter_ms": 5.5, "loss_pct": 5, "duplicate_pct": 2, "reorder_pct": 1}
    )
    assert imp == Impairment(0.05, 0.0055, 0.05, 0.02, 0.01)
    assert Impairment.from_request({}) == Impairment()


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"loss_pct": 101}, "loss_pct"),
        ({"duplicate_pct": -1}, "duplicate_pct"),
        ({"reorder_pct": "5"}, "reorder_pct"),
        ({"delay_ms": True}, "delay_ms"),
        ({"jitter_ms": float("nan")}, "jitter_ms"),
        ({"delay_ms": 1e9}, "delay_ms"),
    ],
)
def test_a_bad_impairment_names_the_field(request_: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Impairment.from_request(request_)


json_values = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.lists(st.integers(), max_size=2)
)


@given(st.dictionaries(st.sampled_from(["delay_ms", "loss_pct", "reorder_pct", "x"]), json_values))
def test_impairment_from_any_request_is_valid_or_a_value_error(request_: dict[str, object]) -> None:
    try:
        imp = Impairment.from_request(request_)
    except ValueError:
        return
    assert 0 <= imp.loss <= 1 and 0 <= imp.reorder <= 1 and 0 <= imp.delay <= 60


@given(st.binary(max_size=64))
def test_the_control_channel_answers_any_line_without_raising(line: bytes) -> None:
    answer = Emulator()._request(line)
    json.dumps(answer)
    assert answer["ok"] in (True, False)


def test_control_requests_without_sockets() -> None:
    emu = Emulator()
    assert emu._request(b'{"cmd": "stats"}') == {"ok": True, "stats": {}}
    assert emu._request(b'{"cmd": "seed", "seed": 5}') == {"ok": True}
    first = emu.rng.random()
    emu._request(b'{"cmd": "seed", "seed": 5}')
    assert emu.rng.random() == first
    bad = emu._request(b'{"cmd": "nope"}')
    assert bad["ok"] is False and "nope" in str(bad["error"])
    bad = emu._request(b'{"a": "x", "b": "y", "loss_pct": 200}')
    assert bad["ok"] is False and "loss_pct" in str(bad["error"])
