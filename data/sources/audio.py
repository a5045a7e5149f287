"""Audio sources: WAV / FLAC / OGG (anything libsndfile reads) as 8-bit mu-law at 12 kHz.

Each file is decoded with soundfile, mixed down to mono, resampled to the
target rate (12 kHz, the paper's) with soxr, and mu-law encoded (mu = 255) to
one byte per sample. Every file is cut into non-overlapping windows of
``seq_len`` samples (the tail of a file that does not fill a window is
dropped, so no window spans two recordings). The windows of all files, in
sorted file order, are split contiguously 90% / 5% / 5% into train /
validation / test.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_transformer.data.errors import MalformedSourceError
from sparse_transformer.data.sources.base import (
    DEFAULT_FRACTIONS,
    SPLITS,
    SourceData,
    Spool,
    as_paths,
    describe_files,
    expand_files,
    split_bounds,
)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au", ".mp3")
DEFAULT_SAMPLE_RATE = 12_000
DEFAULT_AUDIO_SEQ_LEN = 65_536  # the paper's shortest audio context
MU = 255


def mu_law_encode(x: np.ndarray, mu: int = MU) -> np.ndarray:
    """Samples in [-1, 1] to mu-law codes 0..mu (uint8 for mu = 255)."""
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((y + 1) / 2 * mu + 0.5).astype(np.uint8)


def mu_law_decode(q: np.ndarray, mu: int = MU) -> np.ndarray:
    """Mu-law codes 0..mu back to samples in [-1, 1] (float32)."""
    y = 2 * np.asarray(q, dtype=np.float64) / mu - 1
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu).astype(np.float32)


def mu_law_tokenizer(sample_rate: int) -> dict[str, object]:
    """Tokenizer description for mu-law audio."""
    return {
        "kind": "mu-law",
        "vocab_size": 256,
        "dtype": "uint8",
        "mu": MU,
        "sample_rate": sample_rate,
        "channels": 1,
        "description": f"mono audio resampled to {sample_rate} Hz, 8-bit mu-law (mu={MU})",
    }


def load_audio(path: Path, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate``.

    Raises :class:`MalformedSourceError` naming the file when it cannot be decoded.
    """
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for bad files
        raise MalformedSourceError(f"audio: {path}: cannot decode: {e}") from e
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate and mono.size:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return mono


def audio_files(
    path: str | Sequence[str] | None,
    *,
    seq_len: int | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    tmp_dir: str | None = None,
    **_: object,
) -> SourceData:
    """Audio files (or directories of them) as windows of mu-law samples."""
    paths = as_paths(path)
    if not paths:
        raise ValueError("the audio source needs --path FILE_OR_DIR (e.g. wesnoth's music folder)")
    files = expand_files(paths, suffixes=AUDIO_SUFFIXES)
    if not files:
        raise MalformedSourceError(f"audio: no audio files under {', '.join(map(str, paths))}")
    seq_len = seq_len or DEFAULT_AUDIO_SEQ_LEN
    spool = Spool(tmp_dir)
    windows_per_file = []
    try:
        for f in files:
            codes = mu_law_encode(load_audio(f, sample_rate))
            n = codes.size // seq_len
            spool.write(codes[: n * seq_len])
            windows_per_file.append(n)
    except BaseException:
        spool.close()
        raise
    total = sum(windows_per_file)
    bounds = split_bounds(total, fractions)

    def reader(a: int, b: int):  # noqa: ANN202
        return lambda: spool.read_range(a * seq_len, b * seq_len)

    info = {
        "name": "audio",
        "files": describe_files(files),
        "windows_per_file": windows_per_file,
        "split_rule": f"windows of all files in order, contiguous fractions {list(fractions)}",
        "split_windows": {s: b - a for s, (a, b) in zip(SPLITS, bounds)},
    }
    return SourceData(
        name="audio",
        seq_len=seq_len,
        tokenizer=mu_law_tokenizer(sample_rate),
        info=info,
        splits={s: reader(a, b) for s, (a, b) in zip(SPLITS, bounds)},
        cleanup=[spool.close],
    )
