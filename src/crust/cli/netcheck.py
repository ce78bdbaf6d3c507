"""``crust netcheck``: external addresses, NAT class, UDP, hairpinning, latency to observers."""

from __future__ import annotations

import asyncio
import json

import click
from rich.console import Console
from rich.table import Table

from crust.errors import ConfigError
from crust.netcheck import NetcheckReport, netcheck

DEFAULT_STUN = ("stun.l.google.com:19302", "stun.cloudflare.com:3478")
"""Used only when neither --stun nor --contact is given (documented: these are on the internet)."""


def render(report: NetcheckReport, console: Console) -> None:
    d = report.to_dict()
    summary = Table(show_header=False, title="crust netcheck")
    summary.add_column(style="bold")
    summary.add_column()
    rows = [
        ("NAT type", d["nat_type"]),
        ("external", ", ".join(d["external"]) or "-"),
        ("UDP", "yes" if d["udp"] else "no"),
        ("mapping", d["mapping"] or "-"),
        ("filtering", d["filtering"] or "-"),
        ("port preservation", _yn(d["port_preservation"])),
        ("port allocation", d["port_allocation"] or "-"),
        ("hairpinning", _yn(d["hairpinning"])),
    ]
    if d["port_mapping"]:
        rows.append(
            ("port mapping", ", ".join(f"{k}: {_yn(v)}" for k, v in d["port_mapping"].items()))
        )
    for key, value in rows:
        summary.add_row(key, str(value))
    console.print(summary)
    table = Table(title="observers")
    for col in ("observer", "kind", "ok", "latency", "sees us at", "UDP", "error"):
        table.add_column(col)
    for o in report.observers:
        table.add_row(
            o.observer,
            o.kind,
            _yn(o.ok),
            f"{1000 * o.latency:.1f} ms" if o.latency is not None else "-",
            o.mapped or "-",
            _yn(o.udp),
            o.error or "",
        )
    console.print(table)


def _yn(value: object) -> str:
    return "-" if value is None else "yes" if value else "no"


@click.command("netcheck")
@click.option(
    "--stun",
    "stun",
    multiple=True,
    metavar="HOST:PORT",
    help="A STUN server (repeatable; the first should support RFC 5780 for the filtering tests).",
)
@click.option(
    "--contact",
    "contacts",
    multiple=True,
    metavar="CONTACT",
    help="A crust node to connect to (repeatable).",
)
@click.option("--network", default="crust", metavar="NAME", help="Network name of the nodes.")
@click.option("--timeout", default=5.0, show_default=True, help="Seconds per observer.")
@click.option("--json", "json_mode", is_flag=True, help="One JSON object on stdout.")
@click.option(
    "--port-mapping/--no-port-mapping",
    default=True,
    show_default=True,
    help="Ask the default gateway which of PCP, NAT-PMP and UPnP IGD answer.",
)
@click.option(
    "--gateway",
    default=None,
    metavar="IP",
    help="The gateway to ask (default: the default route's).",
)
def netcheck_command(
    stun: tuple[str, ...],
    contacts: tuple[str, ...],
    network: str,
    timeout: float,
    json_mode: bool,
    port_mapping: bool,
    gateway: str | None,
) -> None:
    """Report the external address(es), the NAT's mapping and filtering class, whether UDP
    works, hairpinning and the latency to each observer.

    Without --stun and --contact it asks two public STUN servers (Google's and
    Cloudflare's); give your own observers to keep every packet on your network. It also asks
    the default gateway for port mapping unless --no-port-mapping.
    """
    if not stun and not contacts:
        stun = DEFAULT_STUN
    try:
        report = asyncio.run(
            netcheck(
                stun,
                contacts,
                network_name=network,
                timeout=timeout,
                port_mapping=port_mapping,
                gateway=gateway,
            )
        )
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'--{exc.field or 'stun'}'") from None
    if json_mode:
        click.echo(json.dumps(report.to_dict()))
    else:
        render(report, Console())
