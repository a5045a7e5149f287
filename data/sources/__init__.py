"""The registry of data sources that ``prepare`` turns into shards.

Each entry maps a source name (as given to ``sparse-transformer data prepare``)
to a function ``(path, *, seq_len, cache_dir, download, ...) -> SourceData``.
"""

from __future__ import annotations

from collections.abc import Callable

from sparse_transformer.data.sources.base import SourceData

# name -> (module, function, one-line description); imported lazily.
SOURCES: dict[str, tuple[str, str, str]] = {
    "enwik8": ("text", "enwik8", "first 1e8 bytes of Wikipedia (enwik8.zip), 90M/5M/5M bytes"),
    "wiki-sample": (
        "text",
        "wiki_sample",
        "6 MB Wikipedia XML sample from the gensim 4.4.0 wheel on PyPI (default)",
    ),
    "text": ("text", "text_files", "any text files as bytes, 90%/5%/5%"),
    "cifar10": ("images", "cifar10", "CIFAR-10 python pickle tarball, 48k/2k/10k, 32x32x3"),
    "imagenet64": ("images", "imagenet64", "downsampled ImageNet 64x64 npz batches"),
    "fashion-mnist": ("images", "fashion_mnist", "Fashion-MNIST IDX files, 58k/2k/10k, 28x28x1"),
    "audio": ("audio", "audio_files", "WAV/FLAC/OGG files as 12 kHz 8-bit mu-law windows"),
}


def get_source(name: str) -> Callable[..., SourceData]:
    """The function that opens source ``name``."""
    import importlib

    try:
        module, func, _ = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}") from None
    return getattr(importlib.import_module(f"sparse_transformer.data.sources.{module}"), func)


__all__ = ["SOURCES", "SourceData", "get_source"]
