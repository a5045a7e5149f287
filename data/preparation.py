"""``prepare()``: turn a raw source into Parquet shards plus a manifest at any fsspec URL.

The steps: open the source (downloading and verifying it if no local copy is
given), delete any previous manifest at the destination (from then on the
directory is not a complete dataset), write each split's shards (whole files
only: local files through a temporary name and a rename, objects by a single
upload), and write ``manifest.json`` last. If anything fails, the shards
written so far are removed and no manifest exists, so a half-written dataset
can never be mistaken for a complete one.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from collections.abc import Sequence
from typing import Any

from sparse_transformer.data import storage
from sparse_transformer.data.errors import MalformedSourceError
from sparse_transformer.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
from sparse_transformer.data.retry import RetryPolicy, giving_up
from sparse_transformer.data.shards import DEFAULT_SHARD_BYTES, SplitWriter, samples_per_shard
from sparse_transformer.data.sources import get_source
from sparse_transformer.data.sources.base import SPLITS

log = logging.getLogger("sparse_transformer.data")


def prepare(
    source: str,
    out: str,
    *,
    path: str | Sequence[str] | None = None,
    seq_len: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compression: str = "zstd",
    splits: Sequence[str] = SPLITS,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    overwrite: bool = True,
    **source_options: Any,
) -> Manifest:
    """Prepare ``source`` into shards under ``out`` and return the committed manifest.

    Args:
        source: a name from :data:`sparse_transformer.data.sources.SOURCES`
            (``wiki-sample``, ``enwik8``, ``text``, ``cifar10``, ``imagenet64``,
            ``fashion-mnist``, ``audio``).
        out: the dataset directory URL (``file://``, ``s3://``, ``gs://``, ``memory://``
            or a local path).
        path: a local copy of the source (file, directory, or several); None
            downloads it where the source has a downloader.
        seq_len: tokens per sample for text (default 12,288) and audio (65,536);
            images always use H*W*C.
        shard_bytes: target uncompressed size of a shard (default 64 MiB).
        compression: Parquet codec (``zstd``, ``snappy``, ``gzip``, ``none``).
        splits: which splits to write.
        storage_options: fsspec options for ``out`` (e.g. ``endpoint_url``).
        cache_dir: download cache (default ``~/.cache/sparse-transformer``).
        download: allow downloads when ``path`` is None.
        overwrite: False returns the dataset already at ``out`` when its manifest is
            complete and was made from the same source with the same ``seq_len``; a
            dataset of another source or length there raises ValueError and a manifest
            that cannot be read raises ManifestError, both naming it and changing
            nothing. True always rebuilds.
        source_options: per-source options (``validation_size``, ``fractions``,
            ``sample_rate``, ``verify``, ``checksums``).
    """
    t0 = time.monotonic()
    out = storage.normalize_url(out)
    opener = get_source(source)
    if not overwrite and (existing := _reusable(out, source, seq_len, storage_options)):
        return existing
    data = opener(path, seq_len=seq_len, cache_dir=cache_dir, download=download, **source_options)
    if seq_len is not None and data.seq_len != seq_len:
        log.warning(
            "%s: sequence length is fixed at %d (ignoring %d)", source, data.seq_len, seq_len
        )
    fs, root = storage.filesystem(out, storage_options, RetryPolicy())
    manifest_path = storage.join(root, MANIFEST_NAME)
    per_shard = samples_per_shard(data.seq_len, shard_bytes)
    written: list[str] = []
    try:
        with data:
            with giving_up(f"create {out}"):
                fs.makedirs(root, exist_ok=True)
                if fs.exists(manifest_path):
                    log.info("%s: removing the previous manifest before rewriting", out)
                    fs.rm_file(manifest_path)
            split_infos = {
                split: _write_split(data, split, fs, root, out, per_shard, compression, written)
                for split in _check_splits(source, data, splits)
            }
            _check_train_split(source, data.seq_len, split_infos.get("train"))
            manifest = Manifest(
                seq_len=data.seq_len,
                tokenizer=data.tokenizer,
                source=dict(data.info, options=_jsonable(source_options)),
                splits=split_infos,
                compression=compression,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                extra={"samples_per_shard": per_shard, "shard_bytes": shard_bytes},
            )
            with giving_up(f"write manifest {out}"):
                storage.write_atomic(fs, manifest_path, manifest.to_json().encode())
    except BaseException:
        for p in written:
            storage.remove_quietly(fs, p)
        raise
    manifest.url = storage.join(out, MANIFEST_NAME)
    log.info(
        "%s: prepared %s in %.1f s: %s",
        out,
        source,
        time.monotonic() - t0,
        ", ".join(f"{k} {v.num_samples} samples" for k, v in manifest.splits.items()),
    )
    return manifest


def _reusable(
    out: str, source: str, seq_len: int | None, storage_options: dict[str, Any] | None
) -> Manifest | None:
    """The complete dataset of ``source`` (at ``seq_len``) already at ``out``, or None
    when there is none; a dataset of another source or length raises ValueError."""
    existing = _existing(out, storage_options)
    if existing is None:
        return None
    name = existing.source.get("name")
    if name != source or (seq_len is not None and existing.seq_len != seq_len):
        raise ValueError(
            f"{out} already holds {name} with seq_len {existing.seq_len}, not {source} "
            f"with seq_len {seq_len}; nothing was changed. To train on it as it is, "
            "leave preparation out (data.prepare=false); to prepare "
            f"{source}, choose another location"
        )
    log.info("%s: reusing the prepared %s dataset", out, name)
    return existing


def _write_split(
    data: Any,
    split: str,
    fs: Any,
    root: str,
    out: str,
    per_shard: int,
    compression: str,
    written: list[str],
) -> SplitInfo:
    """Write one split's shards (their paths appended to ``written`` as they land)."""

    def report(info: ShardInfo) -> None:
        log.info(
            "%s: wrote %s (%d samples, %d bytes)", out, info.path, info.num_samples, info.num_bytes
        )

    writer = SplitWriter(
        fs=fs,
        root=root,
        split=split,
        seq_len=data.seq_len,
        samples_per_shard=per_shard,
        compression=compression,
        metadata={"source": data.name, "seq_len": str(data.seq_len)},
        on_shard=report,
        written=written,
    )
    writer.add_all(data.splits[split]())
    return writer.close()


def _check_splits(source: str, data: Any, splits: Sequence[str]) -> Sequence[str]:
    for split in splits:
        if split not in data.splits:
            raise ValueError(f"{source}: no split {split!r}; it has {sorted(data.splits)}")
    return splits


def _check_train_split(source: str, seq_len: int, train: SplitInfo | None) -> None:
    if train is not None and train.num_samples == 0:
        raise MalformedSourceError(
            f"{source}: the input holds no whole sample of {seq_len} tokens for "
            f"the train split ({train.dropped_tokens:,} tokens); nothing was written"
        )


def _existing(out: str, storage_options: dict[str, Any] | None) -> Manifest | None:
    """The dataset already at ``out``, or None where no manifest was ever committed.

    A manifest that is there but cannot be read is an error naming it (ManifestError),
    never a reason to rebuild: the shards beside it may be someone's only copy.
    """
    from sparse_transformer.data.manifest import load_manifest

    fs, root = storage.filesystem(out, storage_options, RetryPolicy())
    path = storage.join(root, MANIFEST_NAME)
    with giving_up(f"check {out}"):
        exists = fs.exists(path)
    if not exists:
        return None
    return load_manifest(out, storage_options)


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = list(v)
        elif isinstance(v, dict):
            out[k] = {str(a): b for a, b in v.items()}
        else:
            out[k] = repr(v)
    return out
