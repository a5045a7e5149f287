"""Sharded streaming datasets from object storage, with exact resumption and retries.

Preparing (raw source -> Parquet shards + ``manifest.json`` at any fsspec URL)::

    from sparse_transformer.data import prepare
    manifest = prepare("wiki-sample", "file:///tmp/wiki", seq_len=1024)
    manifest = prepare("cifar10", "s3://bucket/cifar10", path="cifar-10-python.tar.gz",
                       storage_options={"endpoint_url": "http://127.0.0.1:8333"})

Streaming (per rank, world-size-independent order, exact resumption)::

    from sparse_transformer.data import StreamingDataset
    ds = StreamingDataset("file:///tmp/wiki", split="train", global_batch_size=32,
                          seed=0, batched=True, rank=rank, world_size=world)
    loader = ds.loader(num_workers=0)                     # (32 // world, seq_len) int64
    for batch in loader: ...
    state = loader.state_dict()                           # save in the checkpoint
    ds2 = StreamingDataset(...same arguments...); ds2.load_state_dict(state)

Public API (see docs/data.md for the details):

- ``prepare(source, out, *, path=None, seq_len=None, shard_bytes=64 MiB, compression="zstd",
  splits=("train", "validation", "test"), storage_options=None, cache_dir=None,
  download=True, overwrite=True, **source_options) -> Manifest``
- ``StreamingDataset(manifest_url, *, split="train", global_batch_size, seed=0, epoch=0,
  rank=None, world_size=None, shuffle=True, shuffle_window=4, remainder="drop",
  prefetch=2, num_threads=2, batched=False, dtype=torch.int64, verify=True, cache_dir=None,
  cache_limit_bytes=None, storage_options=None, retry=None)`` with ``state_dict()``,
  ``load_state_dict()``, ``set_epoch()``, ``reset()``, ``loader()``, ``load_shard()``, and
  ``epoch_share()`` / ``advance()`` / ``finish_epoch()`` for a loader of one's own
- ``load_manifest(url, storage_options=None) -> Manifest``; ``check_shards(manifest,
  storage_options=None)``: every listed shard is in storage at its recorded size
- ``EpochOrder``, ``BatchPlan`` (the order), ``RetryPolicy``, ``ShardCache``,
  ``mu_law_encode`` / ``mu_law_decode``, ``SOURCES``, the errors in ``errors``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "prepare": "sparse_transformer.data.preparation",
    "StreamingDataset": "sparse_transformer.data.stream",
    "StreamingLoader": "sparse_transformer.data.stream",
    "EpochShare": "sparse_transformer.data.stream",
    "resolve_rank": "sparse_transformer.data.stream",
    "Manifest": "sparse_transformer.data.manifest",
    "SplitInfo": "sparse_transformer.data.manifest",
    "ShardInfo": "sparse_transformer.data.manifest",
    "load_manifest": "sparse_transformer.data.manifest",
    "check_shards": "sparse_transformer.data.manifest",
    "EpochOrder": "sparse_transformer.data.order",
    "BatchPlan": "sparse_transformer.data.order",
    "RetryPolicy": "sparse_transformer.data.retry",
    "ShardCache": "sparse_transformer.data.cache",
    "SOURCES": "sparse_transformer.data.sources",
    "mu_law_encode": "sparse_transformer.data.sources.audio",
    "mu_law_decode": "sparse_transformer.data.sources.audio",
    "DataError": "sparse_transformer.data.errors",
    "MalformedSourceError": "sparse_transformer.data.errors",
    "ChecksumMismatchError": "sparse_transformer.data.errors",
    "CorruptShardError": "sparse_transformer.data.errors",
    "MissingShardError": "sparse_transformer.data.errors",
    "ManifestError": "sparse_transformer.data.errors",
    "DownloadError": "sparse_transformer.data.errors",
    "RetriesExhaustedError": "sparse_transformer.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: ``sparse-transformer --help`` must not import torch or pyarrow.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
