"""Parquet shards of fixed-length uint8 token sequences: writing and decoding.

A shard is a Parquet file with one column, ``tokens``, of type
``fixed_size_binary(seq_len)``: one row per sample, each byte one uint8 token
(the schema metadata says ``token_dtype: uint8``). Fixed-size binary is stored
as raw bytes: decoding is a zero-copy view of the column's buffer reshaped to
``(rows, seq_len)`` (at GB/s), where a Parquet list of uint8 would widen every
token to INT32 and decode 10x slower.
Every shard but the last of a split holds the same number of samples, so a
global sample index maps to (shard, row) with a division.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_transformer.data import storage
from sparse_transformer.data.errors import CorruptShardError
from sparse_transformer.data.manifest import ShardInfo, SplitInfo
from sparse_transformer.data.retry import giving_up

COLUMN = "tokens"
DEFAULT_SHARD_BYTES = 64 << 20


def samples_per_shard(seq_len: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """How many sequences of ``seq_len`` tokens make a shard of about ``shard_bytes``."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return max(1, shard_bytes // seq_len)


def encode_shard(
    samples: np.ndarray, *, compression: str = "zstd", metadata: dict[str, str] | None = None
) -> bytes:
    """Parquet bytes for a ``(rows, seq_len)`` uint8 array."""
    if samples.ndim != 2 or samples.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 array, got {samples.dtype} {samples.shape}")
    rows, seq_len = samples.shape
    data = pa.py_buffer(np.ascontiguousarray(samples).tobytes())
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(seq_len), rows, [None, data])
    meta = {"token_dtype": "uint8", "seq_len": str(seq_len), **(metadata or {})}
    schema = pa.schema(
        [pa.field(COLUMN, column.type, nullable=False)],
        metadata={k.encode(): v.encode() for k, v in meta.items()},
    )
    table = pa.Table.from_arrays([column], schema=schema)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression=None if compression == "none" else compression,
        use_dictionary=False,
        write_statistics=False,
        row_group_size=max(rows, 1),
    )
    return buf.getvalue()


def decode_shard(data: bytes, *, seq_len: int, num_samples: int | None, name: str) -> np.ndarray:
    """The ``(rows, seq_len)`` uint8 array stored in Parquet ``data``.

    Raises :class:`CorruptShardError` naming the shard when the bytes are not
    Parquet, lack the ``tokens`` column, or do not have the manifest's shape.
    """
    try:
        table = pq.read_table(pa.BufferReader(data), columns=[COLUMN])
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        raise CorruptShardError(f"shard {name}: not a readable Parquet shard: {e}") from e
    column = table.column(COLUMN)
    typ = column.type
    if not pa.types.is_fixed_size_binary(typ):
        raise CorruptShardError(
            f"shard {name}: column {COLUMN!r} has type {typ}, not fixed-size binary"
        )
    if typ.byte_width != seq_len:
        raise CorruptShardError(
            f"shard {name}: sequences have {typ.byte_width} tokens, manifest says {seq_len}"
        )
    if num_samples is not None and table.num_rows != num_samples:
        raise CorruptShardError(
            f"shard {name}: {table.num_rows} samples, manifest says {num_samples}"
        )
    if column.null_count:
        raise CorruptShardError(f"shard {name}: {column.null_count} null samples")
    parts = [
        np.frombuffer(
            c.buffers()[1], dtype=np.uint8, count=len(c) * seq_len, offset=c.offset * seq_len
        )
        for c in column.chunks
        if len(c)
    ]
    if not parts:
        return np.empty((0, seq_len), dtype=np.uint8)
    arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return arr.reshape(table.num_rows, seq_len)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class SplitWriter:
    """Cuts a stream of uint8 tokens into ``seq_len`` sequences and writes them as shards.

    ``add()`` takes flat uint8 arrays of any length; whole shards are written
    as soon as they fill (memory stays at about one shard). ``close()`` writes
    the last, shorter shard and returns the split's :class:`SplitInfo`; tokens
    that do not fill a last sequence are counted as dropped. ``written`` lists
    the paths written so far, for cleanup if the preparation fails.
    """

    fs: object
    root: str  # filesystem path of the dataset directory
    split: str
    seq_len: int
    samples_per_shard: int
    compression: str = "zstd"
    metadata: dict[str, str] = field(default_factory=dict)
    on_shard: Callable[[ShardInfo], None] | None = None
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._shards: list[ShardInfo] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._num_samples = 0
        self._closed = False

    def add(self, tokens: np.ndarray | bytes) -> None:
        """Append tokens (uint8 values) to the split."""
        if self._closed:
            raise RuntimeError("SplitWriter is closed")
        arr = np.frombuffer(tokens, dtype=np.uint8) if isinstance(tokens, bytes) else tokens
        if arr.dtype != np.uint8:
            raise TypeError(f"tokens must be uint8, got {arr.dtype}")
        arr = arr.reshape(-1)
        if arr.size == 0:
            return
        self._pending.append(arr)
        self._pending_tokens += arr.size
        shard_tokens = self.samples_per_shard * self.seq_len
        while self._pending_tokens >= shard_tokens:
            self._flush(shard_tokens)

    def add_all(self, chunks: Iterable[np.ndarray | bytes]) -> None:
        """``add()`` every chunk."""
        for chunk in chunks:
            self.add(chunk)

    def _take(self, n: int) -> np.ndarray:
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, tail = buf[:n], buf[n:]
        self._pending = [tail] if tail.size else []
        self._pending_tokens = tail.size
        return head

    def _flush(self, n_tokens: int) -> None:
        samples = self._take(n_tokens).reshape(-1, self.seq_len)
        index = len(self._shards)
        rel = f"{self.split}/{index:05d}.parquet"
        meta = dict(self.metadata, split=self.split, shard_index=str(index))
        data = encode_shard(samples, compression=self.compression, metadata=meta)
        path = storage.join(self.root, rel)
        self.written.append(path)
        with giving_up(f"write shard {path}"):
            storage.write_atomic(self.fs, path, data)
        info = ShardInfo(
            path=rel, num_samples=len(samples), num_bytes=len(data), sha256=sha256_bytes(data)
        )
        self._shards.append(info)
        self._num_samples += len(samples)
        if self.on_shard is not None:
            self.on_shard(info)

    def close(self) -> SplitInfo:
        """Write the last shard and describe the split."""
        if not self._closed:
            whole = (self._pending_tokens // self.seq_len) * self.seq_len
            dropped = self._pending_tokens - whole
            if whole:
                self._flush(whole)
            self._pending = []
            self._pending_tokens = 0
            self._dropped = dropped
            self._closed = True
        return SplitInfo(
            shards=list(self._shards),
            num_samples=self._num_samples,
            num_tokens=self._num_samples * self.seq_len,
            dropped_tokens=self._dropped,
        )
