"""The bootstrap cache on disk: tolerant loading, atomic saving, several writers on one file.

- **Load** never fails: a missing file is an empty cache; a corrupt, oversized or unreadable
  one is reported once through logging (``crust.cache``), counted, and treated as empty. The
  next save replaces it.
- **Save** is atomic: the new content goes to ``<name>.tmp`` in the same directory, is
  flushed and fsync'ed, renamed over the file, and the directory is fsync'ed, so a reader (or
  a crash at any moment, even SIGKILL) sees either the old or the new file, never a mixture.
- **Several writers** (services in one process, or several processes) share one file: each
  save takes an exclusive ``flock`` on ``<name>.lock``, reads the current file, replays this
  writer's own updates since its last save onto it (:mod:`crust.proto.cache`), writes, and
  unlocks. Nobody's entries are lost and the temp file is only ever written by the lock
  holder. Readers need no lock (the rename is atomic).

:class:`CacheFile` does the blocking work and is meant to run in a worker thread;
:class:`CacheStore` is the asyncio side a service uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from crust.errors import ProtocolError
from crust.identity import PeerId
from crust.proto.cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_FAILURES,
    MAX_FILE_BYTES,
    BootstrapCache,
    CacheEntry,
    CacheFormatError,
    CacheUpdate,
    Failed,
    Reached,
)

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("crust.cache")

LOCK_TIMEOUT = 5.0
"""How long a save waits for another writer to release the lock before giving up (the
updates stay pending and are written by the next save)."""
MAX_PENDING_UPDATES = 4096


class CacheLockTimeout(OSError):
    """Another writer held the cache file's lock for longer than the lock timeout."""


class CacheFile:
    """Blocking operations on one cache file (call them from a worker thread)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_failures: int = DEFAULT_MAX_FAILURES,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.max_entries = max_entries
        self.max_failures = max_failures
        self.lock_timeout = lock_timeout
        self.bad_reads = 0
        """How many reads found a corrupt or unreadable file."""
        self._reported = False

    def empty(self) -> BootstrapCache:
        return BootstrapCache(max_entries=self.max_entries, max_failures=self.max_failures)

    def read(self) -> BootstrapCache:
        """The file's content; an empty cache when it is missing, corrupt or unreadable (the
        first such problem is logged as a warning, later ones at debug level until a save
        succeeds)."""
        try:
            data = self._read_bytes()
            if data is None:
                return self.empty()
            return BootstrapCache.from_bytes(
                data, max_entries=self.max_entries, max_failures=self.max_failures
            )
        except ProtocolError as exc:
            self._complain(f"bootstrap cache {self.path} is corrupt ({exc})")
        except OSError as exc:
            self._complain(f"bootstrap cache {self.path} is unreadable ({exc.strerror or exc})")
        return self.empty()

    def update(self, updates: Sequence[CacheUpdate]) -> BootstrapCache:
        """Under the lock: read the file, apply ``updates``, write it back atomically.
        Returns the written content. Raises ``OSError`` (:class:`CacheLockTimeout` included)
        when the file cannot be written; it is then unchanged."""
        with self._locked():
            cache = self.read()
            cache.apply_all(updates)
            self._write(cache.to_bytes())
        self._reported = False
        return cache

    # ------------------------------------------------------------------ internals

    def _read_bytes(self) -> bytes | None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below, size checked first
        except FileNotFoundError:
            return None
        with f:
            if os.fstat(f.fileno()).st_size > MAX_FILE_BYTES:
                raise CacheFormatError(f"larger than {MAX_FILE_BYTES} bytes")
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:  # grew while we read it (not one of ours)
            raise CacheFormatError(f"larger than {MAX_FILE_BYTES} bytes")
        return data

    def _complain(self, message: str) -> None:
        self.bad_reads += 1
        if self._reported:
            log.debug("%s", message)
            return
        self._reported = True
        log.warning("%s; starting with an empty cache, the next save replaces it", message)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if sys.platform != "win32":
                _flock(fd, self.lock_timeout, self.lock_path)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: bytes) -> None:
        try:
            with open(self.tmp_path, "wb", opener=_private_opener) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.tmp_path, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp_path)
            raise
        _fsync_dir(self.path.parent)


def _private_opener(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (no-op where directories cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


if sys.platform != "win32":

    def _flock(fd: int, timeout: float, path: Path) -> None:
        """Take an exclusive flock, polling so a stuck writer cannot hang us forever."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheLockTimeout(f"{path} stayed locked for {timeout} s") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.02)


class CacheStore:
    """A service's view of the bootstrap cache of its network.

    Updates are applied to the in-memory view at once and written by :meth:`flush` (in a
    worker thread); :meth:`refresh` re-reads what other writers saved meanwhile.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        network: str,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_failures: int = DEFAULT_MAX_FAILURES,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.file = CacheFile(
            path, max_entries=max_entries, max_failures=max_failures, lock_timeout=lock_timeout
        )
        self.network = network
        self._view = self.file.empty()
        self._pending: list[CacheUpdate] = []
        self._lock = asyncio.Lock()
        self._write_failed = False

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def dirty(self) -> bool:
        """Some updates are not on disk yet."""
        return bool(self._pending)

    def entries(self) -> list[CacheEntry]:
        """This network's entries, newest first."""
        return self._view.entries(self.network)

    def reached(self, peer: PeerId, contact: str, at: float | None = None) -> None:
        """A direct outbound connection to ``peer`` through ``contact`` succeeded."""
        self._record(Reached(self.network, peer, contact, time.time() if at is None else at))

    def failed(self, peer: PeerId, at: float | None = None) -> None:
        """An attempt to reach the cached ``peer`` failed."""
        self._record(Failed(self.network, peer, time.time() if at is None else at))

    def _record(self, update: CacheUpdate) -> None:
        try:
            self._view.apply(update)
        except ValueError as exc:  # e.g. a contact that is not an IP address
            log.debug("bootstrap cache: %s ignored (%s)", update, exc)
            return
        self._pending.append(update)
        if len(self._pending) > MAX_PENDING_UPDATES:
            del self._pending[0]

    async def load(self) -> None:
        """Read the file (never fails; see :meth:`CacheFile.read`)."""
        await self.refresh()

    async def refresh(self) -> None:
        """Write pending updates if there are any, else re-read the file."""
        if self._pending:
            await self.flush()
            return
        async with self._lock:
            fresh = await asyncio.to_thread(self.file.read)
            fresh.apply_all(self._pending)
            self._view = fresh

    async def flush(self) -> bool:
        """Write the pending updates (merged with what other writers saved); with nothing
        pending, wait for a save in progress. Returns False, after logging, when the file
        cannot be written; the updates then stay pending."""
        async with self._lock:
            if not self._pending:
                return True
            batch, self._pending = self._pending, []
            try:
                fresh = await asyncio.to_thread(self.file.update, batch)
            except OSError as exc:
                self._pending[:0] = batch
                del self._pending[:-MAX_PENDING_UPDATES]
                level = logging.DEBUG if self._write_failed else logging.WARNING
                self._write_failed = True
                log.log(level, "cannot save bootstrap cache %s: %s", self.path, exc)
                return False
            self._write_failed = False
            fresh.apply_all(self._pending)  # recorded while the thread was writing
            self._view = fresh
            return True
