"""A local on-disk cache of shard files, bounded in size, least recently used evicted first.

Entries are named by the shard's sha256, so a cache directory can be shared by
every dataset, rank and DataLoader worker of a machine: writes go to a
temporary name and are renamed into place, writes and reads stamp the entry's mtime
with the nanosecond clock (the LRU clock: the kernel's own stamps advance once per
tick, 1-4 ms, too coarse to order shards written in quick succession), and eviction
tolerates entries that another process removed first. A corrupt entry is caught by the
reader's sha256 check and discarded.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from sparse_transformer.data.storage import replacing

log = logging.getLogger("sparse_transformer.data")

SUFFIX = ".parquet"


class ShardCache:
    """Shards by sha256 under ``directory``, at most ``limit_bytes`` in all (None: unbounded)."""

    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int | None = None) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"cache limit must be >= 0, got {limit_bytes}")
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self._last_stamp = 0

    def _stamp(self, p: Path) -> None:
        """Mark ``p`` used now: a strictly increasing nanosecond mtime in this process."""
        t = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = t
        os.utime(p, ns=(t, t))

    def path(self, key: str) -> Path:
        """Where the entry for ``key`` lives."""
        if not key.isalnum():
            raise ValueError(f"bad cache key {key!r}")
        return self.directory / f"{key}{SUFFIX}"

    def get(self, key: str) -> bytes | None:
        """The cached bytes for ``key`` (and mark them recently used), or None."""
        p = self.path(key)
        try:
            data = p.read_bytes()
            self._stamp(p)
        except FileNotFoundError:
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, then evict least recently used entries over the limit."""
        if self.limit_bytes is not None and len(data) > self.limit_bytes:
            return
        p = self.path(key)
        try:
            with replacing(p, fsync=False) as tmp:  # a cache: losing it on a crash is fine
                tmp.write_bytes(data)
                self._stamp(tmp)
        except OSError as e:  # a full disk must not stop training: the cache is optional
            log.warning("shard cache %s: cannot store %s: %s", self.directory, key, e)
            return
        self.evict(keep=key)

    def discard(self, key: str) -> None:
        """Remove the entry for ``key`` if present."""
        self.path(key).unlink(missing_ok=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(mtime, size, path)`` of every entry, least recently used first."""
        out = []
        for p in self.directory.glob(f"*{SUFFIX}"):
            if p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime_ns, st.st_size, p))
        out.sort(key=lambda e: (e[0], e[2].name))
        return out

    def size_bytes(self) -> int:
        """Total size of the entries."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: str | None = None) -> None:
        """Delete least recently used entries until the total is within the limit."""
        if self.limit_bytes is None:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, p in entries:
            if total <= self.limit_bytes:
                break
            if keep is not None and p.name == f"{keep}{SUFFIX}":
                continue
            p.unlink(missing_ok=True)
            total -= size
            log.debug("shard cache %s: evicted %s", self.directory, p.name)
