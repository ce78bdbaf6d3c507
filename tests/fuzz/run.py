"""Run one fuzz target for a bounded time: ``python -m tests.fuzz.run TARGET SECONDS``.

With atheris installed (``pip install -e '.[fuzz]'``) the target runs under libFuzzer with
crust's modules instrumented for coverage, starting from the target's seed corpus; a
crashing input is written to ``--artifacts`` (default ``fuzz-artifacts/``).  Without
atheris (or with ``--engine hypothesis``) the same target runs under Hypothesis, batch
after batch of generated and mutated inputs, until the time is up.

``TARGET`` is a name from :data:`tests.fuzz.targets.TARGETS`, or ``all``: every target in
one run, the first input byte choosing which.  Prints one JSON line with what ran; the
exit status is 0 when nothing but ProtocolError came out of the target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Target = Callable[[bytes], None]


def _load(name: str) -> tuple[Target, list[bytes]]:
    from tests.fuzz.targets import SEEDS, TARGETS

    if name != "all" and name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}: choose among all, {', '.join(TARGETS)}")
    if name != "all":
        return TARGETS[name], SEEDS[name]
    names = sorted(TARGETS)

    def every(data: bytes) -> None:
        if data:
            TARGETS[names[data[0] % len(names)]](data[1:])

    seeds = [bytes([i]) + s for i, n in enumerate(names) for s in SEEDS[n]]
    return every, seeds


def run_atheris(name: str, seconds: float, artifacts: Path) -> dict[str, Any]:
    import atheris

    with atheris.instrument_imports(include=["crust"]):
        target, seeds = _load(name)
    artifacts.mkdir(parents=True, exist_ok=True)
    corpus = Path(tempfile.mkdtemp(prefix=f"crust-fuzz-{name}-"))
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)
    args = [
        sys.argv[0],
        f"-max_total_time={max(1, round(seconds))}",
        "-rss_limit_mb=2048",
        "-timeout=20",
        "-max_len=8192",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/{name}-",
        str(corpus),
    ]
    print(json.dumps({"target": name, "engine": "atheris", "seconds": seconds}), flush=True)
    atheris.Setup(args, target)
    atheris.Fuzz()  # libFuzzer exits the process when the time is up or on a crash
    raise AssertionError("atheris.Fuzz returned")


def run_hypothesis(name: str, seconds: float) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    target, seeds = _load(name)

    def mutated(draw: st.DrawFn) -> bytes:
        seed = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(0, 8))):
            if not seed:
                break
            pos = draw(st.integers(0, len(seed) - 1))
            match draw(st.integers(0, 3)):
                case 0:
                    seed[pos] = draw(st.integers(0, 255))
                case 1:
                    del seed[pos : pos + draw(st.integers(1, 16))]
                case 2:
                    seed[pos:pos] = draw(st.binary(min_size=1, max_size=16))
                case _:
                    del seed[pos:]
        return bytes(seed)

    inputs = st.one_of(st.binary(max_size=2048), st.composite(mutated)())

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def batch(data: bytes) -> None:
        target(data)

    started = time.monotonic()
    batches = 0
    while True:
        batch()
        batches += 1
        if time.monotonic() - started >= seconds:
            break
    return {
        "target": name,
        "engine": "hypothesis",
        "seconds": round(time.monotonic() - started, 2),
        "examples": batches * 200,
    }


def main(argv: list[str] | None = None) -> int:
    # nothing of crust is imported before atheris instruments it
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run")
    parser.add_argument("target", help="a target of tests/fuzz/targets.py, or all")
    parser.add_argument("seconds", type=float, nargs="?", default=60.0)
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 24 * 3600:
        parser.error("seconds must be in (0, 86400]")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
    if engine == "atheris":
        run_atheris(args.target, args.seconds, args.artifacts.resolve())
    print(json.dumps(run_hypothesis(args.target, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
