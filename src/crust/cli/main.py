"""The ``crust`` command line: ``crust id``, ``crust node``, ``crust demo``.

Room is left for ``netcheck``, ``bench``, ``ca`` and ``wireshark-plugin``: each is one more
``@main.command`` (or ``@main.group``) in its own module under ``crust.cli``.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.logging import RichHandler

import crust
from crust.cli.bench import bench_command
from crust.cli.ca import ca_group
from crust.cli.demo import run_demo
from crust.cli.netcheck import netcheck_command
from crust.cli.node import NodeOptions, run_node
from crust.cli.wireshark import wireshark_plugin_command
from crust.config import Config, default_identity_path
from crust.errors import ConfigError
from crust.identity import Identity

TESTING_OVERRIDES: dict[str, Any] = {
    "listen": ("tcp://127.0.0.1:0",),
    "service_discovery": False,
    "port_mapping": False,
    "bootstrap_cache": None,
}
"""What ``--testing`` forces on top of a ``--config`` file (without one, the base is
``Config.for_testing()`` itself)."""

_OPTION_FOR_FIELD = {
    "config": "--config",
    "identity": "--identity",
    "network_name": "--network",
    "listen": "--listen",
    "hard_coded_contacts": "--contact",
}


def _bad(exc: ConfigError, option: str) -> click.BadParameter:
    """A one-line usage error (exit code 2) for ``option``, without repeating the field name
    when it is the option's own field."""
    message = str(exc)
    if exc.field is not None and _OPTION_FOR_FIELD.get(exc.field) == option:
        message = message.removeprefix(f"{exc.field}: ")
    return click.BadParameter(message, param_hint=f"'{option}'")


def _load_identity(path: Path) -> Identity:
    try:
        return Identity.load_or_create(path)
    except ConfigError as exc:
        raise _bad(exc, "--identity") from None
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create {path}: {exc.strerror or exc}", param_hint="'--identity'"
        ) from None


def build_config(
    config_file: Path | None,
    testing: bool,
    network: str | None,
    listen: tuple[str, ...],
    contacts: tuple[str, ...],
) -> Config:
    """The node's configuration: the file (or the defaults), then the command-line options."""
    try:
        if config_file is not None:
            base = Config.load(config_file)
            if testing:
                base = base.replace(**TESTING_OVERRIDES)
        else:
            base = Config.for_testing() if testing else Config()
    except ConfigError as exc:
        raise _bad(exc, "--config") from None
    changes: dict[str, Any] = {}
    if network is not None:
        changes["network_name"] = network
    if listen:
        changes["listen"] = listen
    if contacts:
        merged = list(base.hard_coded_contacts)
        merged.extend(c for c in contacts if c not in merged)
        changes["hard_coded_contacts"] = tuple(merged)
    try:
        return base.replace(**changes)
    except ConfigError as exc:
        raise _bad(exc, _OPTION_FOR_FIELD.get(exc.field or "", "--config")) from None


def _setup_logging(verbose: int, json_mode: bool) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler: logging.Handler
    if json_mode:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = RichHandler(console=Console(stderr=True), show_path=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("crust").setLevel(level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(crust.__version__, prog_name="crust")
def main() -> None:
    """crust: reliable, encrypted, authenticated peer-to-peer connections.

    Start with `crust demo`; run a node with `crust node`.
    """


@main.command("id")
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Identity file (PEM, mode 0600); created when missing. "
    "Default: the per-user data directory.",
)
def id_command(identity_path: Path | None) -> None:
    """Print this node's peer id (creating the identity if missing)."""
    path = identity_path if identity_path is not None else default_identity_path()
    click.echo(str(_load_identity(path).peer_id))


@main.command("node")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="TOML configuration file (keys: the crust.Config field names).",
)
@click.option(
    "--identity",
    "identity_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Identity file; created when missing. Default: the per-user identity "
    "(with --testing: a new throw-away identity).",
)
@click.option("--network", default=None, metavar="NAME", help="Network name (network_name).")
@click.option(
    "--listen",
    multiple=True,
    metavar="CONTACT",
    help="Listen on this contact, e.g. tcp://0.0.0.0:5483 (repeatable; replaces config.listen).",
)
@click.option(
    "--contact",
    "contacts",
    multiple=True,
    metavar="CONTACT",
    help="Connect to this contact at start and use it for bootstrapping "
    "(repeatable; added to hard_coded_contacts).",
)
@click.option("--json", "json_mode", is_flag=True, help="One JSON object per line (scripting).")
@click.option(
    "--testing",
    is_flag=True,
    help="Never touch the real network: loopback listener, no LAN beacon, no port mapping, "
    "no bootstrap cache (Config.for_testing()).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve the statistics for Prometheus at http://HOST:PORT/metrics "
    "(needs crust[metrics]; 0: any free port, shown in the ready line).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address the metrics endpoint binds to.",
)
@click.option("-v", "--verbose", count=True, help="Log more to stderr (-v info, -vv debug).")
def node_command(
    config_file: Path | None,
    identity_path: Path | None,
    network: str | None,
    listen: tuple[str, ...],
    contacts: tuple[str, ...],
    json_mode: bool,
    testing: bool,
    metrics_port: int | None,
    metrics_host: str,
    verbose: int,
) -> None:
    """Run a node until {"cmd": "quit"}, SIGINT or SIGTERM.

    Prints every event (one line each; --json: one JSON object per line, first a "ready"
    line) and reads one JSON command per line on stdin: bootstrap, connect, send,
    disconnect, peers, endpoints, statistics, quit. End of input does not stop the node.
    """
    config = build_config(config_file, testing, network, listen, contacts)
    if identity_path is not None:
        identity = _load_identity(identity_path)
    elif testing:
        identity = Identity.generate()
    else:
        identity = _load_identity(default_identity_path())
    _setup_logging(verbose, json_mode)
    opts = NodeOptions(
        config=config,
        identity=identity,
        contacts=contacts,
        json_mode=json_mode,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
    )
    code = asyncio.run(run_node(opts))
    sys.exit(code)


@main.command("demo")
def demo_command() -> None:
    """Show crust at work on loopback: no setup, no root, no files."""
    sys.exit(asyncio.run(run_demo()))


main.add_command(ca_group)
main.add_command(netcheck_command)
main.add_command(wireshark_plugin_command)
main.add_command(bench_command)

if __name__ == "__main__":
    main(prog_name="crust")
