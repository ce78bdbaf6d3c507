"""Writer processes for the bootstrap cache tests (run by tests/unit/test_cache.py).

The writers are forked from this process, which is single-threaded and has crust imported
already, so starting one costs a fork rather than an interpreter start.

``kill PATH ROUNDS SEED``
    First five timed updates of its own (``ack -1 PEER``) give the machine's save time T
    (their median).
    Each round forks a writer that adds one new peer per cache update, forever, printing
    ``ack ROUND PEER`` after each update returned. After a random time between 0 and 6 T
    (the moment of the kill is the point of the test; scaled to T so that slow and fast disks
    alike see kills before, during and between saves) the writer is killed with SIGKILL and
    reaped, and
    ``killed ROUND SIGNAL TMP_LEFT`` is printed (TMP_LEFT: 1 when the kill interrupted a
    write and left the temp file behind). The next round starts when a line arrives on stdin.
``concurrent PATH WRITERS WRITES``
    Forks WRITERS writers released at the same instant; each adds WRITES peers (one update
    each) and exits. Prints ``exit K STATUS`` per writer.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

from crust.aio.cachefile import CacheFile
from crust.identity import PeerId
from crust.proto.cache import Reached

NETWORK = "crust"
MAX_ENTRIES = 100_000


def peer_for(writer: int, index: int) -> PeerId:
    return PeerId(hashlib.sha256(f"{writer}/{index}".encode()).digest())


def contact_for(writer: int, index: int) -> str:
    return f"tcp://10.{writer % 250}.{index // 250 % 250}.{index % 250 + 1}:4000"


def say(line: str) -> None:
    os.write(1, line.encode() + b"\n")  # one short write: lines of several processes never mix


def add(cache: CacheFile, writer: int, index: int) -> None:
    update = Reached(NETWORK, peer_for(writer, index), contact_for(writer, index), time.time())
    cache.update([update])


def kill_rounds(path: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    times: list[float] = []
    for i in range(5):
        start = time.monotonic()
        add(CacheFile(path, max_entries=MAX_ENTRIES), -1, i)
        times.append(time.monotonic() - start)
        say(f"ack -1 {peer_for(-1, i)}")
    window = max(0.005, 6 * sorted(times)[2])
    for r in range(rounds):
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                cache = CacheFile(path, max_entries=MAX_ENTRIES)
                i = 0
                while True:
                    add(cache, r, i)
                    say(f"ack {r} {peer_for(r, i)}")
                    i += 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, window))  # the random moment of the kill
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        say(f"killed {r} {sig} {int(tmp.exists())}")
        if not sys.stdin.readline():
            return


def concurrent(path: Path, writers: int, writes: int) -> None:
    gate_r, gate_w = os.pipe()
    pids: list[int] = []
    for k in range(writers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(gate_w)
                os.read(gate_r, 1)  # end of file once the parent closes the gate
                cache = CacheFile(path, max_entries=MAX_ENTRIES)
                for i in range(writes):
                    add(cache, k, i)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(gate_r)
    os.close(gate_w)  # every writer starts now
    for k, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        say(f"exit {k} {os.waitstatus_to_exitcode(status)}")


def main() -> None:
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "kill":
        kill_rounds(path, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "concurrent":
        concurrent(path, int(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    say("done")


if __name__ == "__main__":
    main()
