"""crust's Wireshark dissector, shipped as package data (``crust.lua``).

``crust wireshark-plugin`` prints :func:`plugin_path`; ``--install`` copies the file into
Wireshark's personal Lua plugin folder (:func:`personal_plugin_dir`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

PLUGIN_NAME = "crust.lua"

__all__ = ["PLUGIN_NAME", "personal_plugin_dir", "plugin_path"]


def plugin_path() -> Path:
    """The installed ``crust.lua`` (a real file: the package is installed unzipped)."""
    return Path(str(resources.files(__name__).joinpath(PLUGIN_NAME)))


def _from_tshark(tshark: str, env: dict[str, str] | None) -> Path | None:
    """The "Personal Lua Plugins" folder as the installed Wireshark reports it."""
    try:
        done = subprocess.run(
            [tshark, "-G", "folders"],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in done.stdout.splitlines():
        label, sep, value = line.partition(":")
        if sep and label.strip() == "Personal Lua Plugins" and value.strip():
            return Path(value.strip())
    return None


def personal_plugin_dir(
    *, tshark: str | None = "tshark", env: dict[str, str] | None = None
) -> Path:
    """Where Wireshark loads a user's Lua plugins from.

    Asks ``tshark -G folders`` when tshark is installed; otherwise the documented default:
    ``%APPDATA%\\Wireshark\\plugins`` on Windows, ``~/.local/lib/wireshark/plugins`` elsewhere
    (Wireshark 2.5 and later, including 3.x and 4.x; Lua plugins sit directly in it, not in
    the version subfolder used by binary plugins).
    """
    if tshark is not None:
        found = _from_tshark(tshark, env)
        if found is not None:
            return found
    environ = env if env is not None else os.environ
    if sys.platform == "win32" and environ.get("APPDATA"):
        return Path(environ["APPDATA"]) / "Wireshark" / "plugins"
    home = environ.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "lib" / "wireshark" / "plugins"
