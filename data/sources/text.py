"""Byte-level text sources: enwik8, any text files, and the Wikipedia sample from gensim's wheel.

Text is tokenized as raw bytes (vocabulary 256). The bytes of all inputs are
concatenated in order and split contiguously: train / validation / test get
the first 90%, the next 5% and the last 5% (for enwik8 exactly the paper's
90M / 5M / 5M bytes). Each split is cut into non-overlapping sequences of
``seq_len`` bytes; the tail that does not fill a sequence is dropped and
counted in the manifest.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sparse_transformer.data import download as dl
from sparse_transformer.data.errors import ChecksumMismatchError, MalformedSourceError
from sparse_transformer.data.sources.base import (
    BYTES_TOKENIZER,
    DEFAULT_FRACTIONS,
    SPLITS,
    SourceData,
    Spool,
    as_paths,
    describe_files,
    expand_files,
    split_bounds,
)

DEFAULT_TEXT_SEQ_LEN = 12_288  # the paper's enwik8 context

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_MEMBER = "enwik8"
ENWIK8_SIZE = 100_000_000
ENWIK8_MD5 = "a1fa5ffddb56f4953e226637dabbb36a"  # published by the Hutter Prize page
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"

_CHUNK = 16 << 20


def _open_text(path: Path):  # noqa: ANN202 - a binary file object
    """Open a file for reading bytes, decompressing .gz / .bz2 / .xz transparently."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix in (".xz", ".lzma"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _spool_files(files: Sequence[Path], spool: Spool, source: str) -> None:
    for f in files:
        if zipfile.is_zipfile(f):
            try:
                with zipfile.ZipFile(f) as z:
                    for member in sorted(n for n in z.namelist() if not n.endswith("/")):
                        with z.open(member) as m:
                            for block in iter(lambda m=m: m.read(_CHUNK), b""):
                                spool.write(block)
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise MalformedSourceError(f"{source}: {f}: corrupt zip archive: {e}") from e
            continue
        try:
            with _open_text(f) as fh:
                for block in iter(lambda fh=fh: fh.read(_CHUNK), b""):
                    spool.write(block)
        except (EOFError, OSError, lzma.LZMAError) as e:
            raise MalformedSourceError(f"{source}: {f}: cannot read/decompress: {e}") from e


def _bytes_source(
    name: str,
    spool: Spool,
    seq_len: int,
    fractions: Sequence[float],
    info: dict,
) -> SourceData:
    bounds = split_bounds(spool.size, fractions)
    info = dict(
        info,
        total_bytes=spool.size,
        split_rule=f"contiguous byte ranges, fractions {list(fractions)}",
        split_bytes={s: b - a for s, (a, b) in zip(SPLITS, bounds)},
    )

    def reader(start: int, end: int):  # noqa: ANN202
        return lambda: spool.read_range(start, end)

    return SourceData(
        name=name,
        seq_len=seq_len,
        tokenizer=dict(BYTES_TOKENIZER),
        info=info,
        splits={s: reader(a, b) for s, (a, b) in zip(SPLITS, bounds)},
        cleanup=[spool.close],
    )


def text_files(
    path: str | Sequence[str] | None,
    *,
    seq_len: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    tmp_dir: str | None = None,
    **_: object,
) -> SourceData:
    """Any text files (directories are walked; .gz/.bz2/.xz/.zip are decompressed), as bytes."""
    paths = as_paths(path)
    if not paths:
        raise ValueError("the text source needs --path FILE_OR_DIR")
    files = expand_files(paths)
    if not files:
        raise MalformedSourceError(f"text: no files under {', '.join(map(str, paths))}")
    spool = Spool(tmp_dir)
    try:
        _spool_files(files, spool, "text")
    except BaseException:
        spool.close()
        raise
    info = {"name": "text", "files": describe_files(files)}
    return _bytes_source("text", spool, seq_len or DEFAULT_TEXT_SEQ_LEN, fractions, info)


def _enwik8_bytes(path: Path) -> Iterator[bytes]:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z, z.open(ENWIK8_MEMBER) as m:
                yield from iter(lambda: m.read(_CHUNK), b"")
        except KeyError:
            raise MalformedSourceError(f"enwik8: {path}: no member {ENWIK8_MEMBER!r}") from None
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise MalformedSourceError(f"enwik8: {path}: corrupt zip archive: {e}") from e
    else:
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")


def enwik8(
    path: str | None = None,
    *,
    seq_len: int | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    verify: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    tmp_dir: str | None = None,
    **_: object,
) -> SourceData:
    """enwik8: the first 1e8 bytes of a 2006 English Wikipedia dump, 90M / 5M / 5M bytes.

    ``path`` is a local ``enwik8.zip`` or the extracted ``enwik8``; without it the
    zip is downloaded from its canonical URL into the cache. The 100,000,000
    bytes are verified against the published md5 (``verify=False`` skips this,
    for tests on small files in the same format).
    """
    if path is None:
        if not download:
            raise FileNotFoundError("enwik8: no --path given and downloads are disabled")
        cache = Path(cache_dir) if cache_dir else dl.default_cache_dir()
        local = dl.download(ENWIK8_URL, cache / "downloads" / "enwik8.zip")
        url = ENWIK8_URL
    else:
        local, url = Path(path), None
        if not local.exists():
            raise FileNotFoundError(f"enwik8: {local}: no such file")
    spool = Spool(tmp_dir)
    md5 = hashlib.md5()
    try:
        for block in _enwik8_bytes(local):
            md5.update(block)
            spool.write(block)
        if verify and (spool.size != ENWIK8_SIZE or md5.hexdigest() != ENWIK8_MD5):
            raise ChecksumMismatchError(
                f"enwik8: {local}: the enwik8 data is {spool.size:,} bytes with md5 "
                f"{md5.hexdigest()}; expected {ENWIK8_SIZE:,} bytes with md5 {ENWIK8_MD5}"
            )
    except BaseException:
        spool.close()
        raise
    info = {
        "name": "enwik8",
        "url": url,
        "files": describe_files([local]),
        "enwik8_md5": md5.hexdigest(),
        "verified": verify,
    }
    return _bytes_source("enwik8", spool, seq_len or DEFAULT_TEXT_SEQ_LEN, fractions, info)


def wiki_sample(
    path: str | None = None,
    *,
    seq_len: int | None = None,
    cache_dir: str | None = None,
    download: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    tmp_dir: str | None = None,
    **_: object,
) -> SourceData:
    """The 6,089,746-byte Wikipedia XML sample shipped in the gensim 4.4.0 wheel on PyPI.

    ``path`` may be a local gensim wheel, the ``.bz2`` test file or the
    decompressed XML; without it the wheel is fetched with ``pip download``
    and the XML cached. Either way the bytes are verified by sha256.
    """
    if path is None:
        if not download:
            raise FileNotFoundError("wiki-sample: no --path given and downloads are disabled")
        xml = dl.fetch_wiki_sample(cache_dir)
        origin = f"pip download {dl.WIKI_SAMPLE_PACKAGE}: {dl.WIKI_SAMPLE_MEMBER}"
    else:
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"wiki-sample: {src}: no such file")
        cache = Path(cache_dir) if cache_dir else dl.default_cache_dir()
        xml = dl.extract_wiki_sample(src, cache / "wiki-sample" / dl.WIKI_SAMPLE_FILE)
        origin = str(src)
    spool = Spool(tmp_dir)
    try:
        with open(xml, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != dl.WIKI_SAMPLE_SHA256:
            raise ChecksumMismatchError(f"wiki-sample: {xml}: sha256 mismatch")
        spool.write(np.frombuffer(data, dtype=np.uint8))
    except BaseException:
        spool.close()
        raise
    info = {
        "name": "wiki-sample",
        "origin": origin,
        "files": [
            {"path": os.path.basename(xml), "bytes": len(data), "sha256": dl.WIKI_SAMPLE_SHA256}
        ],
    }
    return _bytes_source("wiki-sample", spool, seq_len or DEFAULT_TEXT_SEQ_LEN, fractions, info)
