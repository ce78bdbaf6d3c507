"""The ``crust node --json`` wire format: events out as JSON objects, commands in.

Every output line is one JSON object with an ``"event"`` key. Library events are named by the
snake_case of their class name and carry the event's dataclass fields: peer ids in text form,
exceptions as ``"error"`` (class name) and ``"message"``, bytes as UTF-8 text when they decode
(else ``"<field>_b64"``), durations in seconds.  A signed message_received also carries
``"signature"`` (base64) and ``"proof"`` (base64 of :meth:`crust.signing.SignedMessage.to_bytes`);
the send command takes ``"signed": true``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
import re
from pathlib import Path
from typing import Any

from crust.errors import BootstrapFailed, ConfigError, InvalidArgument
from crust.events import Event, MessageReceived
from crust.identity import PeerId
from crust.signing import SignedMessage

JsonObject = dict[str, Any]

_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class BadCommand(InvalidArgument):
    """A command line is malformed: not JSON, unknown command, missing or mistyped field."""


def snake_case(name: str) -> str:
    """``PeerConnected`` -> ``peer_connected``."""
    return _WORD_BOUNDARY.sub("_", name).lower()


def error_fields(exc: BaseException) -> JsonObject:
    """``{"error": "<ClassName>", "message": "<text>"}`` plus the nested attempts' errors."""
    out: JsonObject = {"error": type(exc).__name__, "message": str(exc) or type(exc).__name__}
    field = getattr(exc, "field", None)
    if isinstance(exc, ConfigError) and isinstance(field, str):
        out["field"] = field
    nested = getattr(exc, "errors", None)
    if isinstance(nested, tuple | list) and nested:
        out["errors"] = [
            {"error": type(e).__name__, "message": str(e) or type(e).__name__}
            for e in nested
            if isinstance(e, BaseException)
        ]
    if isinstance(exc, BootstrapFailed) and exc.attempts:
        for entry, (contact, _) in zip(out["errors"], exc.attempts, strict=True):
            entry["contact"] = contact
    return out


def bytes_fields(name: str, data: bytes) -> JsonObject:
    """``{name: text}`` when ``data`` is valid UTF-8, else ``{name + "_b64": base64}``."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {f"{name}_b64": base64.b64encode(data).decode("ascii")}


def to_json(value: Any) -> Any:
    """A JSON-compatible form of a value found in an event or a reply."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, PeerId | Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, BaseException):
        return error_fields(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


def encode_event(event: Event) -> JsonObject:
    """One library event as the JSON object printed by ``crust node --json``."""
    out: JsonObject = {"event": snake_case(type(event).__name__)}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name in ("signature", "proof") and isinstance(event, MessageReceived):
            if value is not None:  # unsigned messages keep their old shape
                raw = value.to_bytes() if isinstance(value, SignedMessage) else value
                out[f.name] = base64.b64encode(raw).decode("ascii")
        elif isinstance(value, BaseException):
            if "error" in out:
                out[f.name] = error_fields(value)
            else:
                out.update(error_fields(value))
        elif isinstance(value, bytes | bytearray | memoryview):
            out.update(bytes_fields(f.name, bytes(value)))
        else:
            out[f.name] = to_json(value)
    return out


def dumps(obj: JsonObject) -> str:
    """One output line (without the newline): compact, ASCII-only, so any terminal copes."""
    return json.dumps(obj, separators=(", ", ": "))


# ------------------------------------------------------------------ commands


def parse_command(line: bytes | str) -> JsonObject:
    """Decode one command line into a JSON object that has a string ``"cmd"``."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        obj = json.loads(text)
    except UnicodeDecodeError as exc:
        raise BadCommand(f"a command line must be UTF-8: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise BadCommand(f"not JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise BadCommand(f'a command is a JSON object like {{"cmd": "peers"}}, not {_kind(obj)}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise BadCommand('missing "cmd" (a string)')
    return obj


def get_str(obj: JsonObject, name: str) -> str:
    """The required string field ``name``."""
    value = obj.get(name)
    if value is None:
        raise BadCommand(f'"{obj.get("cmd")}" needs the field "{name}"')
    if not isinstance(value, str):
        raise BadCommand(f'"{name}" must be a string, not {_kind(value)}')
    return value


def get_peer(obj: JsonObject, name: str = "peer") -> PeerId:
    """The required peer id field ``name``; ConfigError naming the field when malformed."""
    text = get_str(obj, name)
    try:
        return PeerId.parse(text)
    except ConfigError as exc:
        detail = str(exc).removeprefix(f"{exc.field}: ") if exc.field else str(exc)
        raise ConfigError(f"{text!r} is {detail}", name) from exc


def get_int(obj: JsonObject, name: str, default: int) -> int:
    """The optional integer field ``name``."""
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadCommand(f'"{name}" must be an integer, not {_kind(value)}')
    return value


def get_bool(obj: JsonObject, name: str, default: bool) -> bool:
    """The optional boolean field ``name``."""
    value = obj.get(name, default)
    if not isinstance(value, bool):
        raise BadCommand(f'"{name}" must be a boolean, not {_kind(value)}')
    return value


def get_data(obj: JsonObject) -> bytes:
    """The message payload: ``"data"`` (text, sent as UTF-8) or ``"data_b64"`` (base64)."""
    has_text, has_b64 = "data" in obj, "data_b64" in obj
    if has_text == has_b64:
        raise BadCommand('"send" needs exactly one of "data" (text) or "data_b64" (base64)')
    if has_text:
        return get_str(obj, "data").encode("utf-8")
    try:
        return base64.b64decode(get_str(obj, "data_b64"), validate=True)
    except binascii.Error as exc:
        raise BadCommand(f'"data_b64" is not valid base64: {exc}') from exc


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)
