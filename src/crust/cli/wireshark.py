"""``crust wireshark-plugin``: where crust's Wireshark dissector is, and installing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from crust.wireshark import PLUGIN_NAME, personal_plugin_dir, plugin_path


@click.command("wireshark-plugin")
@click.option(
    "--install",
    is_flag=True,
    help="Copy the dissector into Wireshark's personal Lua plugin folder "
    "(as `tshark -G folders` reports it; default ~/.local/lib/wireshark/plugins).",
)
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="With --install: copy into DIR instead.",
)
def wireshark_plugin_command(install: bool, dest: Path | None) -> None:
    """Print the path of crust's Wireshark dissector (crust.lua).

    Use it for one run with `tshark -X lua_script:$(crust wireshark-plugin) ...`, or
    --install it once; then `-Y crust` filters crust traffic. See docs/wireshark.md for the
    key log that lets Wireshark decrypt QUIC and crust records.
    """
    source = plugin_path()
    if not install:
        if dest is not None:
            raise click.UsageError("--dest goes with --install")
        click.echo(str(source))
        return
    folder = dest if dest is not None else personal_plugin_dir()
    target = folder / PLUGIN_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as exc:
        raise click.ClickException(f"cannot install into {folder}: {exc.strerror or exc}") from None
    click.echo(str(target))
    click.echo(
        "Installed; restart Wireshark or reload Lua plugins (Analyze > Reload Lua Plugins).",
        err=True,
    )
