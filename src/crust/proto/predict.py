"""Port prediction for NATs that allocate new mappings sequentially (sans-IO).

A symmetric NAT gives every new flow (another destination, or another local socket) a mapping
of its own, so the port a node saw us at is useless to anyone else.  Some of these NATs take
the ports from a counter: each new mapping gets the previous one's port plus a fixed step
(``delta``).  Their next mappings can then be predicted: a side behind such a NAT measures its
allocation -- the ports of a few mappings it creates in quick succession, in the order it
created them -- and tells the other side the ports its own next mappings will most likely get;
the other side probes those ports, which opens its own NAT (or firewall) towards exactly them.

This module only does arithmetic on what the caller measured: :func:`measure` turns time-stamped
samples into an :class:`Allocation` (or None: random, too few, too slow, too large a step), and
:meth:`Allocation.predict` lists the next ports.  Time comes in as ``now``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SAMPLES = 3
"""Two equal steps: three random ports within a small step of each other happen about once in
a million measurements."""
MAX_SAMPLES = 8
"""Only the newest samples count (older ones describe a counter that has moved on)."""
MAX_DELTA = 16
"""The largest step still called "a small fixed delta"."""
MAX_STEP = 64
"""The largest step between two samples (other flows through the NAT took the ports between:
each step must be a multiple of ``delta``)."""
SAMPLE_WINDOW = 3.0
"""Seconds: samples further apart than this are not one measurement."""
MAX_AGE = 10.0
"""Seconds: a measurement older than this predicts nothing (the counter has moved on)."""
MAX_PREDICTED = 16
"""Ports predicted (and advertised, and probed by the other side) at most, per protocol."""

_LOW_PORT = 1024
_PORTS = 65536 - _LOW_PORT


@dataclass(frozen=True, slots=True)
class PortSample:
    """A new mapping's external ``port``, observed at ``at`` (samples are given in the order
    the mappings were created)."""

    port: int
    at: float


@dataclass(frozen=True, slots=True)
class Allocation:
    """A measured sequential allocation: the next new mapping gets ``last + delta``, the one
    after it ``last + 2 * delta``, and so on."""

    delta: int
    last: int
    """The port of the newest mapping measured."""
    at: float
    """When it was observed."""
    samples: int

    def fresh(self, now: float, max_age: float = MAX_AGE) -> bool:
        return 0.0 <= now - self.at <= max_age

    def predict(self, count: int, skip: int = 0) -> tuple[int, ...]:
        """The ports of the next ``count`` new mappings after ``skip`` others (at most
        :data:`MAX_PREDICTED`), wrapping within 1024..65535 as NATs do."""
        count = max(0, min(count, MAX_PREDICTED))
        return tuple(_wrap(self.last + self.delta * k) for k in range(1 + skip, 1 + skip + count))


def _wrap(port: int) -> int:
    return _LOW_PORT + (port - _LOW_PORT) % _PORTS


def _step(a: int, b: int) -> int:
    """``b - a`` as a signed step, across the wrap of the port range."""
    d = (b - a) % _PORTS
    return d - _PORTS if d > _PORTS // 2 else d


def measure(
    samples: Sequence[PortSample],
    *,
    min_samples: int = MIN_SAMPLES,
    max_delta: int = MAX_DELTA,
    window: float = SAMPLE_WINDOW,
) -> Allocation | None:
    """The allocation the samples show, or None when they show no small fixed step.

    Rules: at least ``min_samples`` of the newest :data:`MAX_SAMPLES`, all within ``window``
    seconds and in time order, all ports in 1024..65535 and distinct; every step goes the same
    way, is at most :data:`MAX_STEP` and a multiple of the smallest one, which is ``delta``
    (at most ``max_delta``).  Steps larger than ``delta`` are other flows that took ports in
    between, which the prediction tolerates by advertising several ports.
    """
    if min_samples < 2:
        raise ValueError("port prediction needs at least two samples")
    recent = list(samples)[-MAX_SAMPLES:]
    if len(recent) < min_samples:
        return None
    if any(not _LOW_PORT <= s.port <= 65535 for s in recent):
        return None
    if any(b.at < a.at for a, b in itertools.pairwise(recent)):
        return None
    if recent[-1].at - recent[0].at > window:
        return None
    if len({s.port for s in recent}) != len(recent):
        return None
    steps = [_step(a.port, b.port) for a, b in itertools.pairwise(recent)]
    if not (all(s > 0 for s in steps) or all(s < 0 for s in steps)):
        return None
    if any(abs(s) > MAX_STEP for s in steps):
        return None
    delta = min(steps, key=abs)
    if abs(delta) > max_delta or any(s % delta for s in steps):
        return None
    last = recent[-1]
    return Allocation(delta=delta, last=last.port, at=last.at, samples=len(recent))
