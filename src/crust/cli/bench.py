"""``crust bench``: the loopback benchmark suite, every figure against a baseline.

The benchmark modules live in the source checkout's ``benchmarks/`` package, not in the
installed ``crust`` package: they carry their own baselines (plain asyncio TCP, bare
aioquic, py-libp2p) and are development tools.  ``crust bench`` finds that package with
:func:`find_source` (``--source``, else the current directory, else the checkout an
editable install of crust points into), puts the checkout on ``sys.path`` and runs each
suite's ``run(quick, progress=..., repeats=...)``.  A suite whose module is missing, or
whose optional dependency is not installed, is reported as skipped with the reason; it
never produces a number it did not measure.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import crust

SUITES: dict[str, str] = {
    "tcp": "benchmarks.bench_tcp",
    "quic": "benchmarks.bench_quic",
    "libp2p": "benchmarks.bench_libp2p",
    "relay": "benchmarks.bench_relay",
}
"""Suite name -> module in the checkout's ``benchmarks`` package."""

BASELINE_NAMES = {
    "tcp": "plain asyncio TCP",
    "quic": "bare aioquic",
    "libp2p": "py-libp2p noise+yamux",
    "relay": "crust direct TCP",
}

SMOKE_PLAN: dict[str, int] = {
    "total_bytes": 1 << 20,
    "max_messages": 2_000,
    "repeats": 1,
    "latency_count": 4,
    "latency_warmup": 1,
    "connect_count": 4,
    "connect_warmup": 1,
    "cycles_count": 8,
    "concurrency": 2,
}
"""``--smoke``: the fields of a suite's ``Plan`` shrunk to check the harness works end to
end in seconds.  The figures of a smoke run mean nothing."""


class SourceNotFound(click.ClickException):
    pass


def _has_benchmarks(root: Path) -> bool:
    return (root / "benchmarks" / "__init__.py").is_file()


def find_source(explicit: Path | None = None) -> Path:
    """The checkout holding ``benchmarks/``: ``explicit``, else the current directory (or
    one of its parents), else the checkout the imported ``crust`` package lives in."""
    if explicit is not None:
        root = explicit.resolve()
        if not _has_benchmarks(root):
            raise SourceNotFound(f"--source: no benchmarks/ package in {root}")
        return root
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if _has_benchmarks(candidate):
            return candidate
    pkg = Path(crust.__file__).resolve().parent  # <checkout>/src/crust
    for candidate in pkg.parents:
        if _has_benchmarks(candidate):
            return candidate
    raise SourceNotFound(
        "crust bench runs from a source checkout: no benchmarks/ package found in the "
        "current directory or next to the installed crust; pass --source DIR"
    )


def _load(root: Path, module: str) -> ModuleType | str:
    """Import ``module`` from the checkout at ``root``; the reason as a string when the
    module (or something it needs) is not there."""
    if str(root) not in sys.path:
        # spawned worker processes inherit sys.path, so they find the modules too
        sys.path.insert(0, str(root))
    pkg = importlib.import_module("benchmarks")
    pkg_file = Path(getattr(pkg, "__file__", "") or "").resolve()
    if pkg_file.parent != root / "benchmarks":
        return f"another benchmarks package is already imported ({pkg_file})"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return f"{module} is not in this checkout ({root / 'benchmarks'})"
        return f"{module} needs {exc.name!r}, which is not installed ({exc})"


def _shrink(mod: ModuleType) -> None:
    """Replace the suite's quick plan by the smoke plan (only the fields it has)."""
    plan: Any = getattr(mod, "QUICK")  # noqa: B009 - the suites are untyped here
    names = {f.name for f in dataclasses.fields(plan)}
    smaller = dataclasses.replace(plan, **{k: v for k, v in SMOKE_PLAN.items() if k in names})
    setattr(mod, "QUICK", smaller)  # noqa: B010


def run_suites(
    root: Path,
    names: list[str],
    *,
    quick: bool,
    smoke: bool,
    repeats: int | None,
    progress: Callable[[str, str], None],
) -> dict[str, Any]:
    """Run the suites ``names`` from the checkout at ``root``; the JSON-ready results."""
    started = time.time()
    suites: dict[str, Any] = {}
    for name in names:
        loaded = _load(root, SUITES[name])
        if isinstance(loaded, str):
            progress(name, f"skipped: {loaded}")
            suites[name] = {"skipped": loaded}
            continue
        if smoke:
            _shrink(loaded)
        try:
            result = loaded.run(
                quick or smoke,
                progress=lambda msg, n=name: progress(n, msg.strip()),
                repeats=repeats,
            )
        except ModuleNotFoundError as exc:  # an optional dependency is not installed
            progress(name, f"skipped: {exc}")
            suites[name] = {"skipped": str(exc)}
            continue
        except Exception as exc:  # a suite that cannot run at all is reported, not fatal
            progress(name, f"failed: {exc}")
            suites[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        suites[name] = result
    figures: list[dict[str, Any]] = []
    for name, result in suites.items():
        for fig in result.get("figures", []):
            figures.append({"suite": name, "baseline_name": BASELINE_NAMES[name], **fig})
    _pair_with_tcp(figures)
    for f in figures:
        _add_rates(f)
    return {
        "benchmark": "crust bench",
        "mode": "smoke" if smoke else "quick" if quick else "full",
        "source": str(root),
        "crust_version": crust.__version__,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "notes": [
            "ratio = crust / baseline, both measured in this run on 127.0.0.1",
            "a suite that could not run is listed with 'skipped' or 'error', never a number",
        ],
        "suites": suites,
        "figures": figures,
    }


BASELINE_RUNS = {"tcp": "plain", "quic": "bare", "relay": "direct"}
"""The key of the baseline's runs in a suite's bulk figure details."""


def _add_rates(f: dict[str, Any]) -> None:
    """Bulk figures: tx and rx rates in messages/s and MB/s, for crust and the baseline,
    from the medians of the runs the suite recorded.  tx: the sender's first send until the
    receiver's acknowledgement of the last message reached it (the sender's own clock; the
    time its last send call returned only says how fast the send queue fills); rx: the
    receiver's first message until its last one."""
    details = f["details"]
    runs, count, total = details.get("runs"), details.get("messages"), details.get("bytes")
    if not isinstance(runs, dict) or not count or not total or f["suite"] not in BASELINE_RUNS:
        return
    rates: dict[str, dict[str, float]] = {}
    for who, kind in (("crust", "crust"), ("baseline", BASELINE_RUNS[f["suite"]])):
        one = runs.get(kind) or []
        tx = [r["sender_until_ack_s"] for r in one if r.get("sender_until_ack_s", 0) > 0]
        rx = [
            r["receiver_first_to_last_s"] for r in one if r.get("receiver_first_to_last_s", 0) > 0
        ]
        if not tx or not rx:
            continue
        tx_s, rx_s = sorted(tx)[len(tx) // 2], sorted(rx)[len(rx) // 2]
        rates[who] = {
            "tx_msgs_per_s": count / tx_s,
            "tx_mb_per_s": total / tx_s / 1e6,
            "rx_msgs_per_s": count / rx_s,
            "rx_mb_per_s": total / rx_s / 1e6,
        }
    if rates:
        f["rates"] = rates


def _pair_with_tcp(figures: list[dict[str, Any]]) -> None:
    """Baseline-only figures (py-libp2p) name the crust figure of the same run they are
    compared with (``details.crust_key``, a TCP suite key): fill in crust and the ratio."""
    tcp = {f["key"]: f for f in figures if f["suite"] == "tcp"}
    for f in figures:
        key = f["details"].get("crust_key") if f["crust"] is None else None
        if key is None:
            continue
        mine = tcp.get(key)
        if mine is None or mine["crust"] is None:
            f["details"]["crust_missing"] = f"no crust figure {key!r} in this run (run tcp too)"
            continue
        f["crust"] = mine["crust"]
        if f["baseline"]:
            f["ratio"] = f["crust"] / f["baseline"]
            target = f["details"].get("target_ratio")
            if isinstance(target, (int, float)):
                f["met"] = f["ratio"] >= target


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit in ("MB/s", "MiB/s"):
        return f"{value:,.1f} {unit}"
    return f"{value:,.0f} {unit}"


def render(results: dict[str, Any], console: Console) -> None:
    """The results as one rich table, then the skipped suites and the errors."""
    table = Table(
        title=f"crust bench ({results['mode']})",
        caption="ratio = crust / baseline, measured in the same run on loopback",
    )
    for col, justify in (
        ("suite", "left"),
        ("figure", "left"),
        ("crust", "right"),
        ("baseline", "right"),
        ("ratio", "right"),
        ("crust tx / rx msg/s", "right"),
        ("target", "left"),
        ("met", "center"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "figure")  # type: ignore[arg-type]
    for f in results["figures"]:
        mine = f.get("rates", {}).get("crust")
        txrx = f"{mine['tx_msgs_per_s']:,.0f} / {mine['rx_msgs_per_s']:,.0f}" if mine else ""
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}x"
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: ""}[f["met"]]
        name = f["figure"] if not f["error"] else f"{f['figure']} [red](error)[/]"
        table.add_row(
            f["suite"],
            name,
            _fmt(f["crust"], f["unit"]),
            f"{_fmt(f['baseline'], f['unit'])}",
            ratio,
            txrx,
            f["target"] or "",
            met,
        )
    console.print(table)
    for name, suite in results["suites"].items():
        if "skipped" in suite:
            console.print(f"[yellow]{name} skipped[/]: {suite['skipped']}")
        if "error" in suite:
            console.print(f"[red]{name} failed[/]: {suite['error']}")
    for f in results["figures"]:
        if f["error"]:
            console.print(f"[red]{f['suite']} {f['key']}[/]: {f['error']}")


def _suite_list(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[str]:
    if value is None:
        return list(SUITES)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in SUITES]
    if bad or not names:
        raise click.BadParameter(f"choose among {', '.join(SUITES)} (got {value!r})")
    return names


@click.command("bench")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option("--quick", is_flag=True, help="Much smaller counts (seconds to a minute in all).")
@click.option(
    "--smoke",
    is_flag=True,
    help="Tiny counts, to check the harness runs end to end (figures are meaningless).",
)
@click.option(
    "--suites",
    "suites",
    callback=_suite_list,
    default=None,
    metavar="LIST",
    help=f"Comma-separated suites to run (default all: {','.join(SUITES)}).",
)
@click.option("--repeats", type=click.IntRange(1, 50), default=None, help="Bulk repeats.")
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The source checkout holding benchmarks/ (default: found from here or crust).",
)
def bench_command(
    as_json: bool,
    quick: bool,
    smoke: bool,
    suites: list[str],
    repeats: int | None,
    source: Path | None,
) -> None:
    """Benchmark crust on loopback against plain TCP, bare aioquic and py-libp2p."""
    root = find_source(source)
    # SIGTERM ends the run through the suites' cleanup (their worker processes are stopped)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    err = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.fields[suite]}[/]"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        disable=not err.is_terminal,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(suite: str, msg: str) -> None:
            if suite not in tasks:
                tasks[suite] = bar.add_task(msg, total=None, suite=suite)
            bar.update(tasks[suite], description=msg)
            if not err.is_terminal:  # no live display: one line per step
                err.print(f"{suite}: {msg}")

        results = run_suites(
            root, suites, quick=quick, smoke=smoke, repeats=repeats, progress=progress
        )
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        render(results, Console() if sys.stdout.isatty() else Console(width=140))
    failed = any(f["error"] for f in results["figures"]) or any(
        "error" in s for s in results["suites"].values()
    )
    if failed:
        sys.exit(1)
