"""Human-readable, one-line-per-event rendering of the ``crust node`` output (rich)."""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from typing import Any

from rich.text import Text

from crust.cli.protocol import JsonObject

_PEER_ID = re.compile(r"\b[a-z2-7]{52}\b")
MAX_SHOWN_TEXT = 160

STYLES: dict[str, str] = {
    "ready": "bold green",
    "stopped": "bold",
    "input_closed": "dim",
    "listener_started": "blue",
    "listener_failed": "red",
    "peer_connected": "bold green",
    "connected": "green",
    "peer_lost": "yellow",
    "disconnected": "yellow",
    "message_received": "cyan",
    "sent": "dim cyan",
    "connect_failed": "red",
    "bootstrap_connected": "bold green",
    "bootstrap_failed": "red",
    "error": "bold red",
    "abuse_detected": "bold magenta",
    "peers": "bold",
    "endpoints": "bold",
    "statistics": "bold",
}


def short(text: str) -> str:
    """Shorten every peer id inside ``text`` to its first 8 characters."""
    return _PEER_ID.sub(lambda m: m.group(0)[:8] + "…", text)


def render(obj: JsonObject) -> Text:
    """One output line: time, event name, then the interesting fields."""
    name = str(obj.get("event", "?"))
    line = Text(no_wrap=False)
    line.append(time.strftime("%H:%M:%S "), style="dim")
    line.append(f"{name:<19}", style=STYLES.get(name, "bold"))
    line.append_text(_FORMATTERS.get(name, _generic)(obj))
    return line


def _peer(text: Any) -> Text:
    return Text(short(str(text)), style="magenta")


def _error(obj: JsonObject) -> Text:
    out = Text(f"{obj.get('error')}", style="red")
    out.append(f": {short(str(obj.get('message', '')))}")
    return out


def _ready(obj: JsonObject) -> Text:
    out = Text("peer ")
    out.append(str(obj.get("peer_id")), style="bold magenta")
    contacts = obj.get("contacts") or []
    out.append("  contacts: " + (", ".join(map(str, contacts)) if contacts else "(none)"))
    return out


def _peer_connected(obj: JsonObject) -> Text:
    out = _peer(obj.get("peer"))
    out.append(f"  {obj.get('transport')}/{obj.get('path')}")
    out.append("  outbound" if obj.get("outbound") else "  inbound", style="dim")
    if obj.get("remote"):
        out.append(f"  {obj.get('remote')}", style="dim")
    return out


def _message(obj: JsonObject) -> Text:
    out = _peer(obj.get("peer"))
    out.append(f"  prio {obj.get('priority')}  ", style="dim")
    if "data" in obj:
        data = str(obj["data"])
        shown = data if len(data) <= MAX_SHOWN_TEXT else data[:MAX_SHOWN_TEXT] + "…"
        out.append(repr(shown))
    else:
        try:
            size = len(base64.b64decode(str(obj.get("data_b64", ""))))
        except binascii.Error:
            size = 0
        out.append(f"<{size} bytes of binary data>", style="italic")
    return out


def _with_error(first: str) -> Callable[[JsonObject], Text]:
    def fmt(obj: JsonObject) -> Text:
        out = Text(short(str(obj.get(first, ""))) + "  ") if first else Text()
        out.append_text(_error(obj))
        return out

    return fmt


def _peers(obj: JsonObject) -> Text:
    peers = obj.get("peers") or []
    out = Text(f"{len(peers)} peer(s)")
    for p in peers:
        rtt = p.get("rtt")
        rtt_text = f"{rtt * 1000:.1f} ms" if isinstance(rtt, int | float) else "rtt —"
        out.append("  ")
        out.append_text(_peer(p.get("peer")))
        out.append(f" {p.get('transport')}/{p.get('path')} {rtt_text}")
    return out


def _endpoints(obj: JsonObject) -> Text:
    eps = obj.get("endpoints") or []
    parts = [
        f"{e.get('local')}" + (f" (external {e['external']})" if e.get("external") else "")
        for e in eps
    ]
    return Text("; ".join(parts) or "(no listeners)")


def _generic(obj: JsonObject) -> Text:
    out = Text()
    for key, value in obj.items():
        if key in ("event", "message", "errors", "field"):
            continue
        if key == "error":
            out.append_text(_error(obj))
            out.append("  ")
            continue
        out.append(f"{key}=", style="dim")
        out.append(short(_plain(value)) + "  ")
    out.rstrip()
    return out


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_plain(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value) or "[]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_FORMATTERS: dict[str, Callable[[JsonObject], Text]] = {
    "ready": _ready,
    "peer_connected": _peer_connected,
    "message_received": _message,
    "connect_failed": _with_error("target"),
    "listener_failed": _with_error("endpoint"),
    "bootstrap_failed": _with_error(""),
    "error": _generic,
    "peers": _peers,
    "endpoints": _endpoints,
}
