"""Rules that keep the code simple (ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import crust

FORBIDDEN = {"asyncio", "socket", "time", "random", "os", "selectors", "threading"}
PROTO = Path(crust.__file__).parent / "proto"


def test_proto_is_sans_io() -> None:
    files = sorted(PROTO.glob("*.py"))
    assert len(files) >= 3
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_error_tree() -> None:
    from crust import errors

    assert issubclass(errors.PeerAuthenticationError, errors.HandshakeError)
    assert issubclass(errors.NetworkMismatch, errors.HandshakeError)
    assert issubclass(errors.HandshakeError, errors.CrustError)
    assert issubclass(errors.ConnectTimeout, TimeoutError)
    assert issubclass(errors.HandshakeTimeout, TimeoutError)
    for name in [
        "ConfigError",
        "ProtocolError",
        "ConnectError",
        "NotConnected",
        "MessageTooLarge",
        "BootstrapFailed",
        "PortMappingError",
        "HolePunchFailed",
        "Blacklisted",
    ]:
        assert issubclass(getattr(errors, name), errors.CrustError)
