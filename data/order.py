"""The global sample order of an epoch, and each rank's and worker's share of it.

The order depends only on (seed, epoch), the shard list and the shuffle
window, never on the world size:

1. the split's shards are permuted (seeded by seed and epoch);
2. consecutive runs of ``shuffle_window`` shards of that permutation form
   windows, and the samples of each window are shuffled together (seeded by
   seed, epoch and window index);
3. the concatenation of the windows is the epoch's global sample sequence;
   ``position`` p is the p-th sample of it.

Global batch b (of size G) is positions ``[start + b*G, start + (b+1)*G)``
where ``start`` is the position the iteration began at (0 for a fresh epoch).
Rank r of W takes the contiguous slice ``[r*L, (r+1)*L)`` of every global
batch, ``L = G / W``. So every rank sees a disjoint, equal share, and "the
number of samples consumed" is one integer that means the same for any W.

Remainder policy, when N samples do not fill the last global batch:
``"drop"`` (default) skips those N mod G samples for this epoch (a different
set each epoch, since the order changes); ``"wrap"`` fills the last batch with
samples from the start of the same epoch's order, so every sample is seen at
least once and a few twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

REMAINDER_POLICIES = ("drop", "wrap")


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


class EpochOrder:
    """The global order of one epoch over shards of the given sizes."""

    def __init__(
        self,
        shard_sizes: Sequence[int],
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        shuffle_window: int = 4,
    ) -> None:
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 shard, got {shuffle_window}")
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        n = len(self.sizes)
        perm = _rng(seed, epoch, 0).permutation(n) if shuffle else np.arange(n)
        self.windows = [perm[i : i + shuffle_window] for i in range(0, n, shuffle_window)]
        sizes = np.array([self.sizes[w].sum() for w in self.windows], dtype=np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.sizes.sum())
        self._perm_cache: dict[int, np.ndarray] = {}

    def window_perm(self, w: int) -> np.ndarray | None:
        """The shuffle of window ``w``'s samples (None when not shuffling)."""
        if not self.shuffle:
            return None
        if w not in self._perm_cache:
            if len(self._perm_cache) >= 4:
                self._perm_cache.pop(next(iter(self._perm_cache)))
            n = int(self.window_starts[w + 1] - self.window_starts[w])
            self._perm_cache[w] = _rng(self.seed, self.epoch, 1 + w).permutation(n)
        return self._perm_cache[w]

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        """The window index of each position."""
        return np.searchsorted(self.window_starts, positions, side="right") - 1

    def locate_in_window(self, w: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, row)`` of positions that all lie in window ``w``."""
        local = np.asarray(positions, dtype=np.int64) - self.window_starts[w]
        perm = self.window_perm(w)
        if perm is not None:
            local = perm[local]
        shards = self.windows[w]
        cum = np.concatenate([[0], np.cumsum(self.sizes[shards])])
        idx = np.searchsorted(cum, local, side="right") - 1
        return shards[idx], local - cum[idx]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, row)`` of any positions (each in ``[0, total)``)."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.empty_like(positions)
        rows = np.empty_like(positions)
        windows = self.window_of(positions)
        for w in np.unique(windows):
            m = windows == w
            shards[m], rows[m] = self.locate_in_window(int(w), positions[m])
        return shards, rows


@dataclass(frozen=True)
class BatchPlan:
    """Which global positions one rank (and one DataLoader worker of it) consumes, in order."""

    total: int
    global_batch_size: int
    rank: int
    world_size: int
    start: int = 0
    remainder: str = "drop"

    def __post_init__(self) -> None:
        g, w = self.global_batch_size, self.world_size
        if g < 1 or w < 1:
            raise ValueError(f"global batch size and world size must be >= 1, got {g}, {w}")
        if g % w:
            raise ValueError(f"global batch size {g} is not divisible by the world size {w}")
        if not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} not in [0, {w})")
        if self.remainder not in REMAINDER_POLICIES:
            raise ValueError(
                f"remainder must be one of {REMAINDER_POLICIES}, got {self.remainder!r}"
            )

    @property
    def local_batch_size(self) -> int:
        """Samples per rank per global batch."""
        return self.global_batch_size // self.world_size

    @property
    def num_batches(self) -> int:
        """Global batches left from ``start`` to the end of the epoch."""
        left = self.total - self.start
        if left <= 0 or self.total == 0:
            return 0
        g = self.global_batch_size
        return left // g if self.remainder == "drop" else -(-left // g)

    def batch_positions(self, b: int) -> np.ndarray:
        """This rank's positions in global batch ``b`` (counted from ``start``)."""
        L = self.local_batch_size
        first = self.start + b * self.global_batch_size + self.rank * L
        pos = np.arange(first, first + L, dtype=np.int64)
        if self.remainder == "wrap":
            pos %= self.total
        return pos

    def worker_batches(
        self, worker: int = 0, num_workers: int = 1, skip: int = 0
    ) -> Iterator[tuple[int, np.ndarray]]:
        """``(b, positions)`` of the batches that DataLoader worker ``worker`` of ``num_workers``
        produces: every ``num_workers``-th batch, so that the DataLoader's round-robin
        over workers hands them out in global order. ``skip`` drops the first samples of
        batch 0 (a partly consumed batch when resuming)."""
        for b in range(worker, self.num_batches, num_workers):
            pos = self.batch_positions(b)
            if b == 0 and skip:
                pos = pos[skip:]
            yield b, pos
