"""The connectivity matrix: real ``crust node`` processes behind every pair of lab NATs.

Each trial starts fresh nodes ``a`` and ``b`` (new ports, NAT state flushed) that connect to
a public node ``pub``; ``a`` then connects to ``b`` *by peer id* (so only an introduction by
``pub`` and a hole punch can work), sends a message and gets one back.

Run it as a developer command (root only)::

    scripts/lab                       # the whole matrix, 5 trials per cell, rich table
    scripts/lab --trials 2 --write docs/connectivity.md
    scripts/lab --types full-cone,symmetric-sequential --involving symmetric-sequential \
        --write docs/connectivity.md --section sequential   # only pairs with that type

The pytest module ``tests/lab/test_punch_lab.py`` runs the same trials with assertions.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.lab.netlab import Lab, NatType, pair_spec
from tests.nodeproc import NodeProcess

CONE_TYPES: tuple[NatType, ...] = ("none", "full-cone", "restricted", "port-restricted")
ALL_TYPES: tuple[NatType, ...] = (*CONE_TYPES, "symmetric", "symmetric-sequential")
SCHEMES = ("tcp", "quic")
PUB_PORT = 7000
TRIAL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Trial:
    nat_a: str
    nat_b: str
    scheme: str
    ok: bool
    """Connected and a message went both ways."""
    path: str
    transport: str
    seconds: float
    """From the connect command to the first message received by ``b``."""
    error: str = ""

    @property
    def direct(self) -> bool:
        return self.ok and self.path in ("direct", "punched", "mapped")

    @property
    def relayed(self) -> bool:
        return self.ok and self.path == "relayed"


class PunchLab:
    """A lab with a public crust node ``pub`` and fresh nodes ``a``/``b`` per trial."""

    def __init__(
        self, lab: Lab, workdir: Path, *, ipv6: bool = False, node_args: Sequence[str] = ()
    ) -> None:
        self.lab = lab
        self.workdir = workdir
        self.node_args = list(node_args)
        """Extra ``crust node`` arguments of the trial nodes ``a`` and ``b`` (not ``pub``)."""
        self.wildcard = "[::]" if ipv6 else "0.0.0.0"
        self._index = 0
        lab.add_cleanup(self.close)
        w = self.wildcard
        # QUIC on each of pub's addresses (not the wildcard): a datagram is then answered from
        # the address it was sent to, so pub's two addresses can tell a symmetric NAT
        pub_host = lab.host("pub")
        addrs = pub_host.addresses6 if ipv6 else pub_host.addresses
        quic = [f"quic://{'[' + a + ']' if ipv6 else a}:{PUB_PORT}" for a in addrs]
        self.pub = self._node("pub", [f"tcp://{w}:{PUB_PORT}", *quic])
        self.pub.wait_ready()
        prefix = f"tcp://[{lab.address6('pub')}]" if ipv6 else "tcp://198."
        self.pub_contact = next(c for c in self.pub.ready["contacts"] if c.startswith(prefix))

    def close(self) -> None:
        self.pub.close()

    def _node(self, host: str, listen: Sequence[str], *extra: str) -> NodeProcess:
        self._index += 1
        args = [a for c in listen for a in ("--listen", c)]
        return NodeProcess(
            [*args, *extra],
            self.workdir,
            self._index,
            subprocess.PIPE,
            wrap=self.lab.exec_argv(host, []),
            wait=False,
        )

    @contextmanager
    def pair(
        self, scheme: str, a: str = "a", b: str = "b"
    ) -> Iterator[tuple[NodeProcess, NodeProcess]]:
        """Fresh nodes on hosts ``a`` and ``b`` (new ports), both connected to ``pub``."""
        self.lab.reset_nat()
        port = 7100 + 2 * self._index
        nodes = [
            self._node(
                host,
                [f"{scheme}://{self.wildcard}:{port + i}"],
                "--contact",
                self.pub_contact,
                *self.node_args,
            )
            for i, host in enumerate((a, b))
        ]
        try:
            for node in nodes:
                node.wait_ready()
            for node in nodes:
                node.expect("peer_connected", peer=self.pub.peer_id)
                # and pub's side too: an introduction asked before pub has the other peer
                # would be refused ("not connected to that peer") and fall back to the relay
                self.pub.expect("peer_connected", peer=node.peer_id)
            yield nodes[0], nodes[1]
        finally:
            for node in nodes:
                node.close()

    def trial(self, nat_a: str, nat_b: str, scheme: str, **hosts: str) -> Trial:
        with self.pair(scheme, **hosts) as (a, b):
            start = time.monotonic()
            a.command(cmd="connect", to=b.peer_id, id="punch")
            while True:
                line = a.next_line(TRIAL_TIMEOUT)
                if line.get("event") == "connect_failed":
                    return Trial(
                        nat_a,
                        nat_b,
                        scheme,
                        False,
                        "",
                        "",
                        time.monotonic() - start,
                        f"{line.get('error')}: {line.get('message')}",
                    )
                if line.get("event") == "connected" and line.get("id") == "punch":
                    break
            a.command(cmd="send", peer=b.peer_id, data="ping")
            b.expect("message_received", peer=a.peer_id, data="ping", timeout=TRIAL_TIMEOUT)
            seconds = time.monotonic() - start
            b.command(cmd="send", peer=a.peer_id, data="pong")
            a.expect("message_received", peer=b.peer_id, data="pong", timeout=TRIAL_TIMEOUT)
            seen = next(
                e
                for e in a.history
                if e.get("event") == "peer_connected" and e.get("peer") == b.peer_id
            )
            return Trial(nat_a, nat_b, scheme, True, seen["path"], seen["transport"], seconds)


def pairs(
    types: Sequence[NatType], involving: NatType | None = None
) -> list[tuple[NatType, NatType]]:
    """Every unordered pair of ``types`` (or only those with ``involving`` on one side, which
    then comes first)."""
    out = list(itertools.combinations_with_replacement(types, 2))
    if involving is None:
        return out
    return [(involving, b if a == involving else a) for a, b in out if involving in (a, b)]


def run_matrix(
    types: Sequence[NatType],
    trials: int,
    schemes: Sequence[str] = SCHEMES,
    progress: Callable[[Trial], None] | None = None,
    involving: NatType | None = None,
) -> list[Trial]:
    out: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="crust-lab-") as tmp:
        for nat_a, nat_b in pairs(types, involving):
            lab = Lab(pair_spec(nat_a, nat_b)).build()
            try:
                plab = PunchLab(lab, Path(tmp))
                for scheme in schemes:
                    for _ in range(trials):
                        try:
                            result = plab.trial(nat_a, nat_b, scheme)
                        except BaseException as exc:  # a failed expectation is a failed trial
                            if isinstance(exc, KeyboardInterrupt):
                                raise
                            result = Trial(nat_a, nat_b, scheme, False, "", "", 0.0, repr(exc))
                        out.append(result)
                        if progress is not None:
                            progress(result)
            finally:
                lab.close()
    return out


def summarize(results: Sequence[Trial]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    keys = dict.fromkeys((r.nat_a, r.nat_b, r.scheme) for r in results)
    for nat_a, nat_b, scheme in keys:
        cell = [r for r in results if (r.nat_a, r.nat_b, r.scheme) == (nat_a, nat_b, scheme)]
        direct = [r for r in cell if r.direct]
        relayed = [r for r in cell if r.relayed]
        times = [r.seconds for r in direct]
        rows.append(
            {
                "a": nat_a,
                "b": nat_b,
                "transport": scheme,
                "direct": f"{len(direct)}/{len(cell)}",
                "rate": f"{100 * len(direct) / len(cell):.0f} %",
                "relayed": f"{len(relayed)}/{len(cell)}",
                "connected": f"{100 * (len(direct) + len(relayed)) / len(cell):.0f} %",
                "median": f"{1000 * statistics.median(times):.0f} ms" if times else "-",
                "errors": "; ".join(sorted({r.error[:80] for r in cell if r.error})),
            }
        )
    return rows


def markdown(rows: Sequence[dict[str, str]], command: str) -> str:
    lines = [
        "| NAT a | NAT b | transport | direct | direct rate | relayed | connected "
        "| median time to first message (direct) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['a']} | {r['b']} | {r['transport']} | {r['direct']} | {r['rate']} "
        f"| {r['relayed']} | {r['connected']} | {r['median']} |"
        for r in rows
    ]
    return f"Generated by `{command}`.\n\n" + "\n".join(lines) + "\n"


START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"


def write_section(path: Path, text: str, section: str | None = None) -> None:
    """Replace the text between the matrix markers of ``path`` (``<!-- matrix:start -->``,
    or ``<!-- matrix:NAME:start -->`` for a named section); a file without them gets them
    appended (or is written whole when it does not exist)."""
    start, end = (
        (START, END)
        if section is None
        else (
            f"<!-- matrix:{section}:start -->",
            f"<!-- matrix:{section}:end -->",
        )
    )
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, _, rest = old.partition(start)
        _, _, tail = rest.partition(end)
        path.write_text(f"{head}{start}\n{text}{end}{tail}")
    elif old:
        path.write_text(f"{old.rstrip()}\n\n{start}\n{text}{end}\n")
    else:
        path.write_text(f"{start}\n{text}{end}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--types", default=",".join(CONE_TYPES), help="NAT types, comma separated")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument(
        "--involving", default=None, help="only the pairs with this NAT type on one side"
    )
    parser.add_argument("--write", type=Path, help="write the markdown table to this file")
    parser.add_argument(
        "--section",
        default=None,
        help="with --write: replace the named table (<!-- matrix:NAME:start -->) instead",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print failed trials' output")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from tests.lab.netlab import missing_requirements

    reason = missing_requirements()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    console = Console()
    types = [t for t in args.types.split(",") if t]
    bad = [t for t in [*types, args.involving] if t is not None and t not in ALL_TYPES]
    if bad:
        parser.error(f"unknown NAT types {bad}; known: {', '.join(ALL_TYPES)}")
    if args.involving is not None and args.involving not in types:
        types.append(args.involving)

    def progress(t: Trial) -> None:
        mark = "[green]ok" if t.direct else "[yellow]relayed" if t.relayed else "[red]FAIL"
        console.print(
            f"{t.nat_a:>15} x {t.nat_b:<15} {t.scheme:4} {mark}[/] {t.path:8} "
            f"{1000 * t.seconds:6.0f} ms {t.error[:100]}"
        )
        if not t.ok and args.verbose:
            console.print(t.error, markup=False)

    results = run_matrix(
        types, args.trials, args.schemes.split(","), progress, involving=args.involving
    )
    rows = summarize(results)
    table = Table(title="crust: direct connections between NATed peers (lab)")
    cols = ("a", "b", "transport", "direct", "rate", "relayed", "connected", "median")
    for col in cols:
        table.add_column(col)
    for r in rows:
        table.add_row(*(r[c] for c in cols))
    console.print(table)
    if args.write is not None:
        command = "scripts/lab " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(args.write, markdown(rows, command.strip()), args.section)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
