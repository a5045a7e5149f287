"""``StreamingDataset``: stream a prepared split to every rank, in a world-size-independent order.

Reading a manifest URL, each rank (and each DataLoader worker of a rank)
computes its share of the epoch's global order (see :mod:`order`), fetches the
shards it needs ahead of time on background threads, decodes them, keeps only
the rows it needs and hands samples out in order. Memory stays bounded: at
most the current shuffle window plus ``prefetch`` shards are held.

Exact resumption: the state is the epoch and the number of global samples
consumed (plus, between batch boundaries, how far into its local batch this
rank is). ``load_state_dict`` on a fresh dataset, with any world size that
divides the global batch, continues with exactly the samples not yet consumed,
in the same global order. Reading and counting are apart: ``epoch_share()`` is
what a pass reads (fixed at the position it starts from), ``advance()`` and
``finish_epoch()`` move the position as items are handed out; the dataset's own
iteration and :class:`StreamingLoader` both go through them.

Iteration yields ``torch.int64`` tensors (``dtype`` to change; ``dtype=None``
yields numpy uint8 arrays): one sample of shape ``(seq_len,)`` at a time, or a
whole local batch of shape ``(global_batch_size // world_size, seq_len)`` with
``batched=True``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sparse_transformer.data import storage
from sparse_transformer.data.cache import ShardCache
from sparse_transformer.data.errors import ChecksumMismatchError, MissingShardError
from sparse_transformer.data.manifest import Manifest, ShardInfo, load_manifest
from sparse_transformer.data.order import BatchPlan, EpochOrder
from sparse_transformer.data.retry import RetryPolicy, giving_up
from sparse_transformer.data.shards import decode_shard, sha256_bytes

log = logging.getLogger("sparse_transformer.data")

STATE_VERSION = 1
_NUMPY_DTYPES = {
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the given ones, else torch.distributed's process group (Ray
    Train's ``TorchTrainer`` and torchrun set it up), else the ``RANK`` / ``WORLD_SIZE``
    environment variables, else ``(0, 1)``. The data layer knows no orchestrator."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


@dataclass
class _Visit:
    """A run of consecutive positions in one shuffle window, and the shards it needs."""

    window: int
    begin: int  # slice of the worker's position list
    end: int
    tasks: list[tuple[int, np.ndarray]]  # (shard index, sorted rows needed)
    pool_index: np.ndarray  # per position: row in the concatenation of the tasks' rows


def _plan_visits(order: EpochOrder, positions: np.ndarray) -> list[_Visit]:
    if positions.size == 0:
        return []
    windows = order.window_of(positions)
    cuts = np.flatnonzero(np.diff(windows)) + 1
    bounds = [0, *cuts.tolist(), positions.size]
    visits = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        w = int(windows[a])
        shards, rows = order.locate_in_window(w, positions[a:b])
        pool_index = np.empty(b - a, dtype=np.int64)
        tasks = []
        offset = 0
        for s in np.unique(shards):
            m = shards == s
            needed = np.unique(rows[m])
            pool_index[m] = offset + np.searchsorted(needed, rows[m])
            tasks.append((int(s), needed))
            offset += needed.size
        visits.append(_Visit(w, a, b, tasks, pool_index))
    return visits


class _Prefetcher:
    """Runs shard loads on a thread pool, as far ahead as the consumer allows."""

    def __init__(
        self, load: Any, tasks: list[tuple[int, np.ndarray]], threads: int, stats: DataStats
    ) -> None:
        self._load = load
        self._tasks = tasks
        self._futures: dict[int, Future[np.ndarray]] = {}
        self._next = 0
        self._stats = stats
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="shard-prefetch")

    def submit_until(self, end: int) -> None:
        end = min(end, len(self._tasks))
        while self._next < end:
            shard, rows = self._tasks[self._next]
            self._futures[self._next] = self._pool.submit(self._load, shard, rows)
            self._next += 1
        self._stats.note_held(len(self._futures))

    def result(self, i: int) -> np.ndarray:
        self.submit_until(i + 1)
        return self._futures.pop(i).result()

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


class DataStats:
    """Counters of one process's reading (thread-safe): what a benchmark or a test looks at."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shards_fetched = 0  # from storage
        self.bytes_fetched = 0
        self.cache_hits = 0
        self.max_shards_held = 0  # most shard loads submitted and not yet consumed at once

    def add_fetch(self, nbytes: int) -> None:
        with self._lock:
            self.shards_fetched += 1
            self.bytes_fetched += nbytes

    def add_cache_hit(self) -> None:
        with self._lock:
            self.cache_hits += 1

    def note_held(self, n: int) -> None:
        with self._lock:
            self.max_shards_held = max(self.max_shards_held, n)

    def as_dict(self) -> dict[str, int]:
        """The counters."""
        with self._lock:
            return {
                "shards_fetched": self.shards_fetched,
                "bytes_fetched": self.bytes_fetched,
                "cache_hits": self.cache_hits,
                "max_shards_held": self.max_shards_held,
            }


class StreamingDataset(IterableDataset):
    """Streams one split of a prepared dataset; see the module docstring.

    Args:
        manifest_url: the dataset directory or its ``manifest.json`` (any fsspec URL).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        global_batch_size: samples per optimizer step summed over all ranks; must
            be divisible by the world size.
        seed, epoch: the order is a function of these (and the shard list).
        rank, world_size: this process's place; None takes them from an initialised
            torch.distributed process group, else RANK/WORLD_SIZE, else (0, 1), when
            iteration starts (see :func:`resolve_rank`).
        shuffle: permute shards and samples (False: storage order).
        shuffle_window: shards whose samples are shuffled together.
        remainder: ``"drop"`` or ``"wrap"`` (see :mod:`order`).
        prefetch: shards fetched ahead of the current window.
        num_threads: background fetch/decode threads.
        batched: yield local batches ``(L, seq_len)`` instead of samples.
        dtype: tensor dtype of what is yielded; None yields numpy uint8 arrays.
        verify: check every shard's sha256 against the manifest.
        cache_dir, cache_limit_bytes: optional local shard cache (LRU eviction).
        storage_options: fsspec options (e.g. ``endpoint_url``, ``key``, ``secret``).
        retry: how often the storage client tries each request (see :mod:`retry`).
    """

    def __init__(
        self,
        manifest_url: str,
        *,
        split: str = "train",
        global_batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        shuffle_window: int = 4,
        remainder: str = "drop",
        prefetch: int = 2,
        num_threads: int = 2,
        batched: bool = False,
        dtype: torch.dtype | None = torch.int64,
        verify: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        self.manifest: Manifest = load_manifest(manifest_url, self.storage_options, self.retry)
        self.split = split
        self._split = self.manifest.split(split)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_window = int(shuffle_window)
        self.remainder = remainder
        self.prefetch = max(0, int(prefetch))
        self.num_threads = max(1, int(num_threads))
        self.batched = bool(batched)
        self.dtype = dtype
        self.verify = verify
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.cache_limit_bytes = cache_limit_bytes
        self._rank_arg, self._world_arg = rank, world_size
        resolve_rank(rank, world_size)  # validates the pair
        # Validate the batch geometry now when the world is known.
        BatchPlan(self.num_samples, self.global_batch_size, *self._resolved(), remainder=remainder)
        EpochOrder([1], seed=self.seed, epoch=int(epoch), shuffle_window=self.shuffle_window)
        self._epoch = int(epoch)
        self._position = 0
        self._rank_offset = 0
        self._fs: Any = None
        self._fs_pid: int | None = None
        self._cache: ShardCache | None = None
        self.stats = DataStats()

    # ------------------------------------------------------------ properties

    @property
    def seq_len(self) -> int:
        """Tokens per sample."""
        return self.manifest.seq_len

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return self._split.num_samples

    @property
    def num_shards(self) -> int:
        """Shards of the split (``load_shard`` takes 0 .. num_shards - 1)."""
        return len(self._split.shards)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    @property
    def position(self) -> int:
        """Global samples of the current epoch consumed so far (at a global batch boundary)."""
        return self._position

    def _resolved(self) -> tuple[int, int]:
        return resolve_rank(self._rank_arg, self._world_arg)

    @property
    def rank(self) -> int:
        """This process's rank (resolved now)."""
        return self._resolved()[0]

    @property
    def world_size(self) -> int:
        """The number of ranks (resolved now)."""
        return self._resolved()[1]

    @property
    def local_batch_size(self) -> int:
        """Samples per rank per global batch."""
        return self.global_batch_size // self.world_size

    def __len__(self) -> int:
        """Items (samples, or batches when ``batched``) left to yield in the current epoch."""
        share = self.epoch_share()
        if self.batched:
            return share.num_batches
        return share.num_batches * share.local_batch_size - share.skip

    # ------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning; a no-op when it is already the current epoch
        (so a loop that calls ``set_epoch`` after ``load_state_dict`` resumes mid-epoch)."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._position = 0
            self._rank_offset = 0

    def reset(self) -> None:
        """Restart the current epoch from its first sample."""
        self._position = 0
        self._rank_offset = 0

    def epoch_share(self) -> EpochShare:
        """This rank's share of the rest of the current epoch, from the current position.

        The share is fixed when made: reading it moves nothing. Whoever hands its items
        out records them with :meth:`advance`, and the end of the pass with
        :meth:`finish_epoch` (``__iter__`` and :class:`StreamingLoader` both do).
        """
        rank, world = self._resolved()
        plan = BatchPlan(
            total=self.num_samples,
            global_batch_size=self.global_batch_size,
            rank=rank,
            world_size=world,
            start=self._position,
            remainder=self.remainder,
        )
        return EpochShare(self, self._epoch, plan, self._rank_offset)

    def advance(self, samples: int) -> None:
        """Count ``samples`` more of this rank's samples as consumed.

        Each completed local batch moves the position on by one global batch; the
        samples of a local batch not yet completed are the state's ``rank_offset``.
        """
        batches, self._rank_offset = divmod(self._rank_offset + int(samples), self.local_batch_size)
        self._position += batches * self.global_batch_size

    def finish_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` was read to its end: the next one starts from its first sample.

        A no-op when the current epoch is no longer ``epoch`` (``set_epoch`` or
        ``load_state_dict`` moved it during the pass).
        """
        if self._epoch == epoch:
            self._epoch += 1
            self._position = 0
            self._rank_offset = 0

    def state_dict(self) -> dict[str, Any]:
        """The resumable position: plain ints and strings, for any checkpoint format."""
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "fingerprint": self.manifest.fingerprint(self.split),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "remainder": self.remainder,
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "position": self._position,
            "rank_offset": self._rank_offset,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the world size may differ, the data and order may not.

        The global batch size may differ too (batches then start at the saved
        position). A state saved in the middle of a local batch (``rank_offset``
        > 0) can only be resumed with the same world size and batch size.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported data state version {state.get('version')}")
        mine = self.state_dict()
        keys = ("split", "fingerprint", "seed", "shuffle", "shuffle_window", "remainder")
        diff = [
            f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]
        ]
        if diff:
            raise ValueError("data state does not match this dataset: " + "; ".join(diff))
        offset = int(state.get("rank_offset", 0))
        if offset and (
            state["world_size"] != mine["world_size"]
            or state["global_batch_size"] != mine["global_batch_size"]
        ):
            raise ValueError(
                "state was saved in the middle of a local batch; resume it with the same "
                "world size and global batch size, or save at a batch boundary"
            )
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._rank_offset = offset

    # ------------------------------------------------------------ reading

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fs"] = None
        d["_fs_pid"] = None
        d["_cache"] = None
        d["stats"] = None
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.stats = DataStats()

    def _filesystem(self) -> Any:
        if self._fs is None or self._fs_pid != os.getpid():
            # Per process (fsspec clients do not survive a fork); _fs_pid is set last so a
            # concurrent prefetch thread never sees a half-initialised state.
            assert self.manifest.url is not None
            fs, _ = storage.filesystem(self.manifest.url, self.storage_options, self.retry)
            if self.cache_dir is not None:
                self._cache = ShardCache(self.cache_dir, self.cache_limit_bytes)
            self._fs = fs
            self._fs_pid = os.getpid()
        return self._fs

    def _fetch_bytes(self, shard: ShardInfo, url: str) -> bytes:
        fs = self._filesystem()
        path = fs._strip_protocol(url)  # noqa: SLF001 - fsspec's own URL -> path mapping
        try:
            with giving_up(f"shard {url}"):
                data = fs.cat_file(path)
        except FileNotFoundError:
            raise MissingShardError(f"shard {url}: not found in storage") from None
        self.stats.add_fetch(len(data))
        if len(data) != shard.num_bytes:
            raise ChecksumMismatchError(
                f"shard {url}: {len(data):,} bytes, the manifest says {shard.num_bytes:,} "
                "(the shard was replaced or truncated)"
            )
        if self.verify:
            got = sha256_bytes(data)
            if got != shard.sha256:
                raise ChecksumMismatchError(
                    f"shard {url}: sha256 {got} does not match the manifest's {shard.sha256} "
                    "(corrupt or replaced shard)"
                )
        return data

    def load_shard(self, index: int) -> np.ndarray:
        """The ``(num_samples, seq_len)`` uint8 array of shard ``index`` of the split."""
        shard = self._split.shards[index]
        url = self.manifest.shard_url(shard)
        self._filesystem()
        cache = self._cache
        data = cache.get(shard.sha256) if cache is not None else None
        if data is not None:
            if sha256_bytes(data) != shard.sha256:
                log.warning("shard cache: entry for %s is corrupt; fetching again", url)
                cache.discard(shard.sha256)  # type: ignore[union-attr]
                data = None
            else:
                self.stats.add_cache_hit()
        if data is None:
            data = self._fetch_bytes(shard, url)
            if cache is not None:
                cache.put(shard.sha256, data)
        return decode_shard(data, seq_len=self.seq_len, num_samples=shard.num_samples, name=url)

    def _load_rows(self, index: int, rows: np.ndarray) -> np.ndarray:
        arr = self.load_shard(index)
        if rows.size == arr.shape[0]:
            return arr
        return arr[rows]

    def _iter_arrays(
        self, share: EpochShare, worker: int, num_workers: int
    ) -> Iterator[np.ndarray]:
        """Numpy samples (or local batches) of one worker's part of ``share``."""
        parts = share.plan.worker_batches(worker, num_workers, skip=share.skip)
        batches = [pos for _, pos in parts]
        if not batches:
            return
        order = EpochOrder(
            [s.num_samples for s in self._split.shards],
            seed=self.seed,
            epoch=share.epoch,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window,
        )
        positions = np.concatenate(batches)
        batch_ends = np.cumsum([len(b) for b in batches])
        visits = _plan_visits(order, positions)
        tasks = [t for v in visits for t in v.tasks]
        first_task = np.cumsum([0] + [len(v.tasks) for v in visits])
        fetcher = _Prefetcher(self._load_rows, tasks, self.num_threads, self.stats)
        seq_len = self.seq_len
        try:
            batch_i = 0
            buf: np.ndarray | None = None
            fill = 0
            for vi, visit in enumerate(visits):
                a, b = int(first_task[vi]), int(first_task[vi + 1])
                fetcher.submit_until(b + self.prefetch)
                parts = [fetcher.result(i) for i in range(a, b)]
                pool = parts[0] if len(parts) == 1 else np.concatenate(parts)
                del parts
                fetcher.submit_until(b + self.prefetch)
                idx = visit.pool_index
                if not self.batched:
                    for j in idx:
                        yield pool[j]
                    continue
                p = visit.begin
                while p < visit.end:
                    batch_end = int(batch_ends[batch_i])
                    if buf is None:
                        size = batch_end - (int(batch_ends[batch_i - 1]) if batch_i else 0)
                        buf = np.empty((size, seq_len), dtype=np.uint8)
                        fill = 0
                    n = min(batch_end, visit.end) - p
                    off = p - visit.begin
                    buf[fill : fill + n] = pool[idx[off : off + n]]
                    fill += n
                    p += n
                    if p == batch_end:
                        yield buf
                        buf = None
                        batch_i += 1
                del pool
        finally:
            fetcher.close()

    def _to_output(self, arr: np.ndarray) -> Any:
        if self.dtype is None:
            return arr.copy() if arr.base is not None else arr
        if self.dtype == torch.uint8:
            return torch.from_numpy(arr.copy() if arr.base is not None else arr)
        np_dtype = _NUMPY_DTYPES.get(self.dtype)
        if np_dtype is not None:
            # numpy converts on this thread: torch's intra-op (OpenMP) pool would spin on
            # the cores the training step needs.
            return torch.from_numpy(arr.astype(np_dtype))
        return torch.from_numpy(arr).to(self.dtype)

    def read_share(self, share: EpochShare, worker: int = 0, num_workers: int = 1) -> Iterator[Any]:
        """The items of ``share`` that DataLoader worker ``worker`` of ``num_workers`` produces
        (its local batches ``worker``, ``worker + num_workers``, ...), in order, as the
        dataset's ``dtype``. Moves no position."""
        for arr in self._iter_arrays(share, worker, num_workers):
            yield self._to_output(arr)

    def __iter__(self) -> Iterator[Any]:
        """Yield this rank's share of the rest of the current epoch and track the position.

        Inside DataLoader worker processes use :meth:`loader` instead, which
        splits the work among the workers and tracks the position in the
        main process.
        """
        share = self.epoch_share()
        if get_worker_info() is not None:
            # Iterated by a plain DataLoader's worker: this copy's state is not the
            # caller's, so only the split of work matters here.
            yield from share
            return
        for item in share:
            self.advance(len(item) if self.batched else 1)
            yield item
        self.finish_epoch(share.epoch)

    def loader(
        self,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        multiprocessing_context: Any = None,
    ) -> StreamingLoader:
        """A DataLoader over this dataset that yields local batches ``(L, seq_len)`` in the
        global order and keeps this dataset's position (so ``state_dict()`` is exact)."""
        return StreamingLoader(
            self,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            multiprocessing_context=multiprocessing_context,
        )


class EpochShare(IterableDataset):
    """One rank's share of the rest of an epoch, fixed where it starts (see
    :meth:`StreamingDataset.epoch_share`).

    Iterating it yields the dataset's items and moves no position; inside a DataLoader
    worker it yields that worker's part, so a DataLoader over it (which pickles it to
    its workers) hands the items out in order. ``skip`` samples of the first local
    batch were consumed before the share was made.
    """

    def __init__(self, dataset: StreamingDataset, epoch: int, plan: BatchPlan, skip: int) -> None:
        super().__init__()
        self.dataset, self.epoch, self.plan, self.skip = dataset, epoch, plan, skip

    @property
    def local_batch_size(self) -> int:
        """Samples per rank per global batch."""
        return self.plan.local_batch_size

    @property
    def num_batches(self) -> int:
        """Global batches from the share's start to the end of the epoch."""
        return self.plan.num_batches

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers > 1 and self.skip:
            raise ValueError("cannot resume mid-batch with DataLoader workers")
        yield from self.dataset.read_share(self, worker, num_workers)


class StreamingLoader:
    """A ``torch.utils.data.DataLoader`` over a :class:`StreamingDataset` that keeps its position.

    Yields local batches of shape ``(local_batch_size, seq_len)`` in the global
    order, with any number of worker processes (worker k produces local
    batches k, k + K, ... and the DataLoader's round-robin restores the order).
    Each batch handed out advances the dataset's position by one global batch,
    so ``state_dict()`` (of the loader or the dataset) is exact at any time.
    With K workers each shard is read by every worker that needs rows of it;
    ``num_workers=0`` with the dataset's background threads is usually enough.
    """

    def __init__(self, dataset: StreamingDataset, **dataloader_kwargs: Any) -> None:
        self.dataset = dataset
        kwargs = {k: v for k, v in dataloader_kwargs.items() if v is not None}
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("prefetch_factor", None)
            kwargs.pop("multiprocessing_context", None)
        self.dataloader_kwargs = kwargs

    def __len__(self) -> int:
        return self.dataset.epoch_share().num_batches

    def state_dict(self) -> dict[str, Any]:
        """The dataset's resumable position."""
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the dataset's position."""
        self.dataset.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        """See :meth:`StreamingDataset.set_epoch`."""
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        ds = self.dataset
        share = ds.epoch_share()
        if share.skip:
            raise ValueError(
                "the dataset is in the middle of a local batch (sample-wise iteration); "
                "a loader resumes only at batch boundaries"
            )
        batch_size = None if ds.batched else share.local_batch_size
        for batch in DataLoader(share, batch_size=batch_size, **self.dataloader_kwargs):
            ds.advance(share.local_batch_size)
            yield batch
        ds.finish_epoch(share.epoch)
