"""``crust node --json`` subprocesses driven line by line (CLI and NAT-lab tests)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import pytest

TIMEOUT = 20.0
CLI = [sys.executable, "-m", "crust.cli.main"]
Line = dict[str, Any]


def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of every subprocess: per-user directories inside the test's tmp dir."""
    env = dict(os.environ)
    for var in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        env[var] = str(tmp_path / "xdg" / var.lower())
    return env


class NodeProcess:
    """A ``crust node --json --testing`` subprocess; its stdout lines are read by a thread.

    ``wrap`` prefixes the command (e.g. ``ip netns exec NS`` to run it inside a lab namespace).
    ``testing=False`` leaves out ``--testing`` (the lab's LAN discovery test; never on loopback).
    """

    def __init__(
        self,
        args: list[str],
        tmp_path: Path,
        index: int,
        stdin: int | IO[Any] | None,
        wrap: Sequence[str] = (),
        *,
        wait: bool = True,
        testing: bool = True,
    ) -> None:
        self.stderr_path = tmp_path / f"node{index}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [*wrap, *CLI, "node", "--json", *(["--testing"] if testing else []), *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=cli_env(tmp_path),
        )
        self._lines: queue.Queue[Line | None] = queue.Queue()
        self.pending: list[Line] = []
        """Lines read but not yet matched by :meth:`expect`."""
        self.history: list[Line] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.ready: Line = {}
        self.peer_id = ""
        self.contact = ""
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = TIMEOUT) -> Line:
        """The node's first line ("ready"), with its peer id and contacts."""
        self.ready = self.next_line(timeout)
        assert self.ready["event"] == "ready", self.ready
        self.peer_id = self.ready["peer_id"]
        self.contact = self.ready["contacts"][0]
        return self.ready

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "<not json>", "raw": raw.decode(errors="replace")}
            self._lines.put(line)
        self._lines.put(None)

    def diagnostics(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"output so far: {self.history}\nstderr: {stderr}"

    def next_line(self, timeout: float = TIMEOUT) -> Line:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output line within {timeout} s\n{self.diagnostics()}")
        if line is None:
            self._lines.put(None)  # keep reporting the end
            pytest.fail(f"the node's output ended\n{self.diagnostics()}")
        self.history.append(line)
        return line

    def expect(self, event: str, timeout: float = TIMEOUT, **fields: Any) -> Line:
        """The first unmatched line of that event whose fields have these values."""

        def match(line: Line) -> bool:
            return line.get("event") == event and all(line.get(k) == v for k, v in fields.items())

        for line in self.pending:
            if match(line):
                self.pending.remove(line)
                return line
        while True:
            line = self.next_line(timeout)
            if match(line):
                return line
            self.pending.append(line)

    def seen(self, event: str) -> list[Line]:
        return [line for line in self.history if line.get("event") == event]

    def command(self, **cmd: Any) -> None:
        self.send_raw(json.dumps(cmd))

    def send_raw(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not exit within {timeout} s\n{self.diagnostics()}")

    def rest(self) -> list[Line]:
        """Every remaining line once the process has exited."""
        out = []
        while (line := self._lines.get(timeout=TIMEOUT)) is not None:
            self.history.append(line)
            out.append(line)
        self._lines.put(None)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._thread.join(TIMEOUT)
        self._stderr.close()
