"""What every source produces: token streams per split, a tokenizer and provenance.

A source turns raw files into a :class:`SourceData`: for each split a callable
that yields flat uint8 token arrays (the shard writer cuts them into
sequences), the tokenizer description and the provenance (files, checksums,
URLs) recorded in the manifest.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparse_transformer.data.download import file_digest

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)  # enwik8's 90M / 5M / 5M bytes

# Tokenizer descriptions recorded in manifests.
BYTES_TOKENIZER = {
    "kind": "bytes",
    "vocab_size": 256,
    "dtype": "uint8",
    "description": "the raw bytes of the input files, one token per byte",
}


def pixels_tokenizer(height: int, width: int, channels: int) -> dict[str, Any]:
    """Tokenizer description for images: 8-bit intensities in raster order, channel innermost."""
    return {
        "kind": "pixels",
        "vocab_size": 256,
        "dtype": "uint8",
        "image_shape": [height, width, channels],
        "order": "raster (row-major), channel innermost: index = (row * width + col) * C + c",
        "description": f"{height}x{width}x{channels} images, 8-bit intensities 0-255",
    }


@dataclass
class SourceData:
    """A source opened for preparation."""

    name: str
    seq_len: int
    tokenizer: dict[str, Any]
    info: dict[str, Any]
    splits: dict[str, Callable[[], Iterable[np.ndarray]]]
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Remove temporary files."""
        while self.cleanup:
            self.cleanup.pop()()

    def __enter__(self) -> SourceData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_paths(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    """A list of paths from one path or many."""
    if path is None:
        return []
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    return [Path(p) for p in path]


def expand_files(paths: Sequence[Path], suffixes: Sequence[str] | None = None) -> list[Path]:
    """Files named by ``paths``; directories are walked recursively, in sorted order."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not f.name.startswith(".")
                and (suffixes is None or f.suffix.lower() in suffixes)
            )
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


def describe_files(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Provenance of input files: name, size, sha256."""
    return [{"path": str(f), "bytes": f.stat().st_size, "sha256": file_digest(f)} for f in files]


def split_bounds(total: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges of ``total`` items for the given fractions.

    Boundaries are rounded cumulative fractions, so 1e8 bytes at 0.9/0.05/0.05
    give exactly 90M / 5M / 5M.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(
            f"split fractions must be 3 non-negative numbers summing to 1: {fractions}"
        )
    b1 = round(total * fractions[0])
    b2 = round(total * (fractions[0] + fractions[1]))
    return [(0, b1), (b1, b2), (b2, total)]


class Spool:
    """A local temporary file that collects a token stream, then serves ranges of it.

    Sources whose split boundaries depend on the total length (text, audio)
    write everything here first; memory stays bounded whatever the corpus size.
    """

    def __init__(self, directory: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="sparse-transformer-spool-", dir=directory)
        self._file = os.fdopen(fd, "w+b")
        self.size = 0

    def write(self, data: bytes | np.ndarray) -> None:
        """Append bytes."""
        b = data.tobytes() if isinstance(data, np.ndarray) else data
        self._file.write(b)
        self.size += len(b)

    def read_range(self, start: int, end: int, chunk: int = 16 << 20) -> Iterator[np.ndarray]:
        """Yield the bytes ``[start, end)`` as uint8 arrays of at most ``chunk`` bytes."""
        self._file.flush()
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            self._file.seek(pos)
            data = self._file.read(n)
            if len(data) != n:
                raise OSError(f"{self.path}: short read at {pos}")
            yield np.frombuffer(data, dtype=np.uint8)
            pos += n

    def close(self) -> None:
        """Delete the file."""
        self._file.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def holdout_splits(
    train_batches: Sequence[Callable[[], np.ndarray]],
    train_sizes: Sequence[int],
    holdout: int,
) -> tuple[Callable[[], Iterator[np.ndarray]], Callable[[], Iterator[np.ndarray]]]:
    """Split a list of image batches into (train, validation): the last ``holdout`` images.

    Returns two generator factories; each loads only the batches it needs.
    """
    total = sum(train_sizes)
    if not 0 <= holdout <= total:
        raise ValueError(f"validation size {holdout} not in [0, {total}]")
    boundary = total - holdout
    offsets = np.concatenate([[0], np.cumsum(train_sizes)]).astype(int)

    def train() -> Iterator[np.ndarray]:
        for load, off in zip(train_batches, offsets[:-1]):
            if off >= boundary:
                break
            arr = load()
            yield arr[: max(0, boundary - off)].reshape(-1)

    def validation() -> Iterator[np.ndarray]:
        for load, off, end in zip(train_batches, offsets[:-1], offsets[1:]):
            if end <= boundary:
                continue
            arr = load()
            yield arr[max(0, boundary - off) :].reshape(-1)

    return train, validation
