"""Samples as files people can look at and listen to: what ``sparse-transformer sample``
writes, by the kind of data the run was trained on (issue 16).

The kind comes from the dataset's manifest (its ``tokenizer``; :func:`data_format`):

- ``pixels`` (cifar10, imagenet64, fashion-mnist): H*W*C intensities in raster order,
  channel innermost (``data/sources/images.py``), so ``tokens.reshape(H, W, C)`` is the
  image. :func:`write_image_samples` writes ``completions-seed{S}.png``: one row per
  held-out image, its top half as the prompt (the lower half grey), the model's
  completions of the lower half, and the original (the paper's completion figure); and,
  when asked, ``unconditional-seed{S}.png``.
- ``mu-law`` (audio): 8-bit mu-law codes at the sample rate the manifest records
  (``data/sources/audio.py``). :func:`write_audio_samples` writes 16-bit PCM WAV files:
  each held-out window (``{split}-{i}.wav``), the model's continuations of its first part
  (``completion-{i}-{k}-seed{S}.wav``: the prompt, then the generated samples) and, when
  asked, unconditional clips.
- ``bytes`` (text): the bytes themselves, ``text-seed{S}.txt`` (:func:`write_text`).

The model has no start token: an unconditional sample starts from the first token of a
held-out example (``model/generate.py``). PNG and WAV are written with the standard
library (zlib, wave), so sampling needs no imaging or audio package.
"""

from __future__ import annotations

import math
import struct
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from sparse_transformer.data.manifest import Manifest
from sparse_transformer.data.sources.audio import MU, mu_law_decode
from sparse_transformer.distributed.checkpoint import META_FILE
from sparse_transformer.distributed.config import is_remote
from sparse_transformer.distributed.evaluation import complete

GAP = 2
"""Pixels of background between and around the cells of a grid."""
BACKGROUND = 255
"""The grid's background intensity (white)."""
HIDDEN = 128
"""The intensity that stands for the hidden lower half in a completion grid's prompt cell."""
UNCONDITIONAL_COLUMNS = 8


@dataclass(frozen=True)
class DataFormat:
    """What a run's tokens are, read from its dataset's manifest."""

    kind: Literal["text", "image", "audio"]
    seq_len: int
    image_shape: tuple[int, int, int] | None = None
    """(H, W, C) of an image dataset."""
    sample_rate: int | None = None
    """Samples per second of an audio dataset."""
    mu: int = MU


class SampleFile(NamedTuple):
    """One written file and a few words on what it holds."""

    path: Path
    what: str


def data_format(manifest: Manifest) -> DataFormat:
    """The :class:`DataFormat` of a prepared dataset, from its tokenizer description; a
    ValueError for a kind or shape this module cannot show."""
    tok = manifest.tokenizer
    kind = tok.get("kind")
    if kind == "bytes":
        return DataFormat("text", manifest.seq_len)
    if kind == "pixels":
        h, w, c = (int(x) for x in tok["image_shape"])
        if h * w * c != manifest.seq_len:
            raise ValueError(
                f"{manifest.url}: image_shape {h}x{w}x{c} does not match seq_len {manifest.seq_len}"
            )
        if c not in (1, 3):
            raise ValueError(f"{manifest.url}: {c} channels; PNG samples need 1 or 3")
        return DataFormat("image", manifest.seq_len, image_shape=(h, w, c))
    if kind == "mu-law":
        return DataFormat(
            "audio",
            manifest.seq_len,
            sample_rate=int(tok["sample_rate"]),
            mu=int(tok.get("mu", MU)),
        )
    raise ValueError(f"{manifest.url}: tokenizer kind {kind!r} has no sample file format")


def held_out(
    url: str,
    count: int,
    *,
    split: str = "validation",
    storage_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """The first ``count`` examples of ``split`` in storage order, (n <= count, seq_len)
    uint8; fewer when the split holds fewer. Reads only the shards it needs."""
    from sparse_transformer.data import StreamingDataset

    ds = StreamingDataset(
        url,
        split=split,
        global_batch_size=1,
        shuffle=False,
        rank=0,
        world_size=1,
        num_threads=1,
        storage_options=storage_options,
    )
    rows: list[np.ndarray] = []
    have = 0
    for index in range(ds.num_shards):
        if have >= count:
            break
        rows.append(ds.load_shard(index)[: count - have])
        have += len(rows[-1])
    return np.concatenate(rows) if rows else np.empty((0, ds.seq_len), dtype=np.uint8)


# -- files ---------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    """An 8-bit PNG of a (H, W) or (H, W, 1) grey or (H, W, 3) RGB uint8 array."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if (
        image.dtype != np.uint8
        or image.ndim not in (2, 3)
        or image.ndim == 3
        and image.shape[2] != 3
    ):
        raise ValueError(
            f"encode_png: need uint8 (H, W[, 1 or 3]), got {image.dtype} {image.shape}"
        )
    h, w = image.shape[:2]
    color = 0 if image.ndim == 2 else 2  # greyscale, truecolour
    rows = np.ascontiguousarray(image).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1)  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write ``image`` (see :func:`encode_png`) to ``path``."""
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path


def write_wav(path: str | Path, codes: np.ndarray, sample_rate: int, mu: int = MU) -> Path:
    """Mu-law ``codes`` (0..mu) decoded to a mono 16-bit PCM WAV at ``sample_rate``."""
    pcm = np.clip(np.round(mu_law_decode(codes, mu) * 32767.0), -32768, 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return path


def write_text(path: str | Path, data: bytes) -> Path:
    """The sampled bytes, as they are, to ``path``."""
    path = Path(path)
    path.write_bytes(data)
    return path


# -- images --------------------------------------------------------------------------------


def tokens_to_images(tokens: np.ndarray | torch.Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """(..., H*W*C) tokens in the images source's order (raster, channel innermost) to
    (..., H, W, C) uint8 images."""
    if torch.is_tensor(tokens):
        tokens = tokens.cpu().numpy()
    return np.asarray(tokens).astype(np.uint8).reshape(*tokens.shape[:-1], *shape)


def image_grid(
    cells: np.ndarray, *, scale: int = 1, gap: int = GAP, background: int = BACKGROUND
) -> np.ndarray:
    """(rows, cols, H, W, C) images laid out as one (rows * (H*scale + gap) + gap,
    cols * (W*scale + gap) + gap, C) image: each cell enlarged ``scale`` times (nearest
    neighbour), ``gap`` pixels of ``background`` between and around them."""
    rows, cols, h, w, c = cells.shape
    big = cells.repeat(scale, axis=2).repeat(scale, axis=3)
    hs, ws = h * scale, w * scale
    out = np.full((rows * (hs + gap) + gap, cols * (ws + gap) + gap, c), background, np.uint8)
    for i in range(rows):
        for j in range(cols):
            y, x = gap + i * (hs + gap), gap + j * (ws + gap)
            out[y : y + hs, x : x + ws] = big[i, j]
    return out


def grid_cell(
    grid: np.ndarray,
    row: int,
    col: int,
    shape: tuple[int, int, int],
    *,
    scale: int = 1,
    gap: int = GAP,
) -> np.ndarray:
    """The (H, W, C) image in cell (row, col) of an :func:`image_grid` (every ``scale``-th
    pixel of it); a (H, W) grid of a greyscale PNG read back counts as C = 1."""
    h, w, c = shape
    if grid.ndim == 2:
        grid = grid[:, :, None]
    y, x = gap + row * (h * scale + gap), gap + col * (w * scale + gap)
    return grid[y : y + h * scale : scale, x : x + w * scale : scale].reshape(h, w, c)


def default_scale(shape: tuple[int, int, int]) -> int:
    """How many times a grid enlarges each image: at least 64 pixels a side (2 for
    CIFAR-10 and Fashion-MNIST, 1 for ImageNet 64x64)."""
    return max(1, 64 // max(shape[0], shape[1]))


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def write_image_samples(
    module: torch.nn.Module,
    fmt: DataFormat,
    held: np.ndarray,
    out_dir: str | Path,
    *,
    completions: int = 3,
    unconditional: int = 0,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    scale: int | None = None,
    fast: bool | str = False,
) -> list[SampleFile]:
    """The completion grid of the ``held`` images (N, H*W*C) and, when ``unconditional``
    > 0, a grid of that many unconditional samples, as PNGs in ``out_dir``.

    A completion row holds the prompt (the top H // 2 rows, the rest :data:`HIDDEN`),
    ``completions`` samples of the lower half, then the original. Unconditional samples
    start from the first intensity of a held-out image (the model has no start token)
    and fill rows of :data:`UNCONDITIONAL_COLUMNS`. One generator seeded with ``seed``
    draws the completions, then the unconditional samples. ``fast``: ``generate``'s fast
    path (the same samples).
    """
    assert fmt.image_shape is not None
    shape = fmt.image_shape
    h, w, c = shape
    n = h * w * c
    if module.config.n_ctx < n:
        raise ValueError(f"the model's n_ctx {module.config.n_ctx} is shorter than an image ({n})")
    if len(held) == 0:
        raise ValueError("no held-out image to prompt from")
    scale = scale or default_scale(shape)
    device = _device(module)
    gen = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(generator=gen, temperature=temperature, top_p=top_p, fast=fast)
    originals = torch.from_numpy(held[:, :n].astype(np.int64)).to(device)  # (N, n)
    out_dir = Path(out_dir)
    written = []
    if completions > 0:
        prompt_len = max(1, h // 2) * w * c
        drawn = complete(
            module, originals[:, :prompt_len], n - prompt_len, samples=completions, **sampling
        )  # (N, K, n)
        prompt = originals.new_full(originals.shape, HIDDEN)
        prompt[:, :prompt_len] = originals[:, :prompt_len]
        cells = torch.cat([prompt[:, None], drawn, originals[:, None]], dim=1)  # (N, K + 2, n)
        path = write_png(
            out_dir / f"completions-seed{seed}.png",
            image_grid(tokens_to_images(cells, shape), scale=scale),
        )
        written.append(
            SampleFile(
                path,
                f"{len(held)} held-out images: the top half, {completions} completion(s) "
                "of the lower half, the original",
            )
        )
    if unconditional > 0:
        first = originals[torch.arange(unconditional, device=device) % len(held), :1]
        drawn = complete(module, first, n - 1, **sampling)
        drawn = drawn[:, 0]  # (U, n)
        cols = min(unconditional, UNCONDITIONAL_COLUMNS)
        rows = math.ceil(unconditional / cols)
        images = np.full((rows * cols, h, w, c), BACKGROUND, np.uint8)
        images[:unconditional] = tokens_to_images(drawn, shape)
        path = write_png(
            out_dir / f"unconditional-seed{seed}.png",
            image_grid(images.reshape(rows, cols, h, w, c), scale=scale),
        )
        written.append(SampleFile(path, f"{unconditional} unconditional images"))
    return written


# -- audio ---------------------------------------------------------------------------------


def write_audio_samples(
    module: torch.nn.Module,
    fmt: DataFormat,
    held: np.ndarray,
    out_dir: str | Path,
    *,
    length: int | None = None,
    completions: int = 2,
    unconditional: int = 0,
    split: str = "validation",
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    fast: bool | str = False,
) -> list[SampleFile]:
    """WAV files at the dataset's sample rate, in ``out_dir``: every ``held`` window (N,
    seq_len) cut to the model's context, ``completions`` continuations of ``length``
    samples (default: half the window) after its first part, and ``unconditional``
    clips of ``length`` samples after the first sample of a held-out window.

    A continuation's file holds its prompt too, so one hears where the model takes over
    (the time the prompt ends is in its description). One generator seeded with ``seed``
    draws the continuations, then the unconditional clips. ``fast``: ``generate``'s fast
    path (the same samples).
    """
    assert fmt.sample_rate is not None
    total = min(fmt.seq_len, module.config.n_ctx)
    length = total // 2 if length is None else length
    if not 0 < length < total:
        raise ValueError(f"--length: 1 to {total - 1} samples (the context is {total})")
    if len(held) == 0:
        raise ValueError("no held-out window to prompt from")
    rate, mu = fmt.sample_rate, fmt.mu
    device = _device(module)
    gen = torch.Generator(device=device).manual_seed(seed)
    sampling = dict(generator=gen, temperature=temperature, top_p=top_p, fast=fast)
    windows = torch.from_numpy(held[:, :total].astype(np.int64)).to(device)  # (N, total)
    prompt_len = total - length
    out_dir = Path(out_dir)
    written = []
    for i, window in enumerate(held[:, :total]):
        path = write_wav(out_dir / f"{split}-{i}.wav", window, rate, mu)
        written.append(SampleFile(path, f"held-out window {i}, {total / rate:.3f} s"))
    if completions > 0:
        prompts = windows[:, :prompt_len]
        drawn = complete(module, prompts, length, samples=completions, **sampling)  # (N, K, total)
        drawn = drawn.cpu().numpy()
        for i in range(len(held)):
            for k in range(completions):
                path = write_wav(
                    out_dir / f"completion-{i}-{k}-seed{seed}.wav", drawn[i, k], rate, mu
                )
                written.append(
                    SampleFile(
                        path,
                        f"window {i}'s first {prompt_len / rate:.3f} s, then "
                        f"{length / rate:.3f} s the model generated",
                    )
                )
    if unconditional > 0:
        first = windows[torch.arange(unconditional, device=device) % len(held), :1]
        drawn = complete(module, first, length, **sampling)
        drawn = drawn[:, 0].cpu().numpy()  # (U, 1 + length)
        for j, clip in enumerate(drawn):
            path = write_wav(out_dir / f"unconditional-{j}-seed{seed}.wav", clip, rate, mu)
            written.append(SampleFile(path, f"unconditional, {len(clip) / rate:.3f} s"))
    return written


def default_out_dir(checkpoint: str, step: int) -> Path:
    """Where ``sample`` writes without ``--out``: ``RUN/samples/step{step}`` beside a local
    checkpoint (``checkpoint`` is the checkpoint or its run folder), else
    ``./samples/{the URL's last name}/step{step}``."""
    if is_remote(checkpoint):
        name = checkpoint.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
        return Path("samples", name, f"step{step}")
    path = Path(checkpoint.removeprefix("file://"))
    run = path.parent if (path / META_FILE).is_file() else path
    return run / "samples" / f"step{step}"


__all__ = [
    "BACKGROUND",
    "GAP",
    "HIDDEN",
    "DataFormat",
    "SampleFile",
    "data_format",
    "default_out_dir",
    "default_scale",
    "encode_png",
    "grid_cell",
    "held_out",
    "image_grid",
    "tokens_to_images",
    "write_audio_samples",
    "write_image_samples",
    "write_png",
    "write_text",
    "write_wav",
]
