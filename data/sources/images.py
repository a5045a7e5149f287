"""Image sources: CIFAR-10 (pickle tarball), ImageNet 64x64 (npz batches), Fashion-MNIST (IDX).

Every image becomes one sequence of H*W*C uint8 tokens in raster order with the
channel innermost (R, G, B of pixel (0,0), then pixel (0,1), ...), intensities
0-255. Splits: CIFAR-10 holds out the last 2,000 training images as validation
(the paper's 48k / 2k) and keeps the 10k test batch as test; Fashion-MNIST does
the same (58k / 2k / 10k); ImageNet 64x64 holds out the last 10,000 training
images as validation and uses the official 50k validation set as test.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_transformer.data import download as dl
from sparse_transformer.data.errors import MalformedSourceError
from sparse_transformer.data.sources.base import (
    SourceData,
    as_paths,
    describe_files,
    expand_files,
    holdout_splits,
    pixels_tokenizer,
)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # name -> md5 of the .gz file (published with the dataset)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
}
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IMAGENET64_URL = "https://image-net.org/data/downsample/"
IMAGENET64_FILES = (
    "Imagenet64_train_part1.zip",
    "Imagenet64_train_part2.zip",
    "Imagenet64_val.zip",
)


# ---------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch dicts, refusing every global but numpy's array builders."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _cifar_batch(data: bytes, where: str) -> np.ndarray:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise MalformedSourceError(f"cifar10: {where}: not a CIFAR-10 pickle batch: {e}") from e
    if not isinstance(d, dict):
        raise MalformedSourceError(f"cifar10: {where}: pickle holds {type(d).__name__}, not a dict")
    arr = d.get(b"data", d.get("data"))
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.shape[1] != 3072:
        shape = getattr(arr, "shape", None)
        raise MalformedSourceError(f"cifar10: {where}: 'data' is {shape}, expected (N, 3072)")
    # Stored planar (1024 R, 1024 G, 1024 B); to raster order, channel innermost.
    arr = arr.astype(np.uint8, copy=False)
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)).reshape(-1, 3072)


def _read_cifar_tarball(path: Path) -> dict[str, np.ndarray]:
    wanted = set(CIFAR10_TRAIN) | {CIFAR10_TEST}
    batches: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    f = tar.extractfile(member)
                    assert f is not None
                    batches[base] = _cifar_batch(f.read(), f"{path}:{member.name}")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise MalformedSourceError(
            f"cifar10: {path}: truncated or corrupt tarball ({type(e).__name__}: {e})"
        ) from e
    missing = sorted(wanted - set(batches))
    if missing:
        raise MalformedSourceError(f"cifar10: {path}: tarball lacks {', '.join(missing)}")
    return batches


def _read_cifar_dir(path: Path) -> dict[str, np.ndarray]:
    batches = {}
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        hits = list(path.rglob(name))
        if not hits:
            raise MalformedSourceError(f"cifar10: {path}: no file {name}")
        batches[name] = _cifar_batch(hits[0].read_bytes(), str(hits[0]))
    return batches


def cifar10(
    path: str | None = None,
    *,
    cache_dir: str | None = None,
    download: bool = True,
    validation_size: int = 2000,
    **_: object,
) -> SourceData:
    """CIFAR-10 from the python pickle tarball (or its extracted folder): 48k / 2k / 10k."""
    if path is None:
        if not download:
            raise FileNotFoundError("cifar10: no --path given and downloads are disabled")
        cache = Path(cache_dir) if cache_dir else dl.default_cache_dir()
        local = dl.download(
            CIFAR10_URL, cache / "downloads" / "cifar-10-python.tar.gz", md5=CIFAR10_MD5
        )
        url = CIFAR10_URL
    else:
        local, url = Path(path), None
        if not local.exists():
            raise FileNotFoundError(f"cifar10: {local}: no such file or directory")
    batches = _read_cifar_dir(local) if local.is_dir() else _read_cifar_tarball(local)
    train_arrays = [batches[n] for n in CIFAR10_TRAIN]
    train, validation = holdout_splits(
        [lambda a=a: a for a in train_arrays], [len(a) for a in train_arrays], validation_size
    )
    test = batches[CIFAR10_TEST]
    info = {
        "name": "cifar10",
        "url": url,
        "files": describe_files([local]) if local.is_file() else [{"path": str(local)}],
        "split_rule": f"last {validation_size} of data_batch_1..5: validation; test_batch: test",
    }
    return SourceData(
        name="cifar10",
        seq_len=3072,
        tokenizer=pixels_tokenizer(32, 32, 3),
        info=info,
        splits={"train": train, "validation": validation, "test": lambda: iter([test.reshape(-1)])},
    )


# ---------------------------------------------------------------- IDX (Fashion-MNIST)

IDX_UBYTE = 0x08


def read_idx_images(path: Path) -> np.ndarray:
    """Images of an IDX file (``-idx3-ubyte``, optionally gzipped) as an ``(N, H, W)`` uint8 array.

    Raises :class:`MalformedSourceError` naming the file for a wrong magic
    number, a wrong element type or a size that disagrees with the header.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise MalformedSourceError(f"fashion-mnist: {path}: cannot read: {e}") from e
    if len(data) < 4:
        raise MalformedSourceError(f"fashion-mnist: {path}: {len(data)} bytes, too short for IDX")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != 0x00000803:
        raise MalformedSourceError(
            f"fashion-mnist: {path}: bad IDX magic 0x{magic:08x}, expected 0x00000803 "
            "(unsigned bytes, 3 dimensions: an images file)"
        )
    if len(data) < 16:
        raise MalformedSourceError(f"fashion-mnist: {path}: truncated IDX header")
    n, h, w = struct.unpack(">III", data[4:16])
    body = np.frombuffer(data, dtype=np.uint8, offset=16)
    if body.size != n * h * w:
        raise MalformedSourceError(
            f"fashion-mnist: {path}: header says {n}x{h}x{w} = {n * h * w:,} bytes of pixels, "
            f"file has {body.size:,} (truncated or corrupt)"
        )
    return body.reshape(n, h, w)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        hits = sorted(directory.rglob(name))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"fashion-mnist: {directory}: no {stem}[.gz]")


def fashion_mnist(
    path: str | None = None,
    *,
    cache_dir: str | None = None,
    download: bool = True,
    validation_size: int = 2000,
    **_: object,
) -> SourceData:
    """Fashion-MNIST from IDX files: 28x28x1 images, 58k / 2k / 10k.

    ``path`` is a directory holding ``train-images-idx3-ubyte[.gz]`` and
    ``t10k-images-idx3-ubyte[.gz]`` (Debian's dataset-fashion-mnist installs them
    in /usr/share/datasets/fashion-mnist, used when present); otherwise the .gz
    files are downloaded from the canonical URL and checked against their md5.
    """
    url = None
    if path is not None:
        directory = Path(path)
    elif Path(DEBIAN_FASHION_MNIST_DIR).is_dir():
        directory = Path(DEBIAN_FASHION_MNIST_DIR)
    else:
        if not download:
            raise FileNotFoundError("fashion-mnist: no --path given and downloads are disabled")
        cache = Path(cache_dir) if cache_dir else dl.default_cache_dir()
        directory = cache / "downloads" / "fashion-mnist"
        for name, md5 in FASHION_MNIST_FILES.items():
            dl.download(FASHION_MNIST_URL + name, directory / name, md5=md5)
        url = FASHION_MNIST_URL
    if not directory.is_dir():
        raise FileNotFoundError(f"fashion-mnist: {directory}: not a directory")
    train_file = _find(directory, "train-images-idx3-ubyte")
    test_file = _find(directory, "t10k-images-idx3-ubyte")
    train_images = read_idx_images(train_file)
    test_images = read_idx_images(test_file)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise MalformedSourceError(
            f"fashion-mnist: {train_file} and {test_file} have different image sizes"
        )
    _, h, w = train_images.shape
    flat_train = train_images.reshape(len(train_images), h * w)
    train, validation = holdout_splits([lambda: flat_train], [len(flat_train)], validation_size)
    info = {
        "name": "fashion-mnist",
        "url": url,
        "files": describe_files([train_file, test_file]),
        "split_rule": f"last {validation_size} training images are validation; t10k is test",
    }
    return SourceData(
        name="fashion-mnist",
        seq_len=h * w,
        tokenizer=pixels_tokenizer(h, w, 1),
        info=info,
        splits={
            "train": train,
            "validation": validation,
            "test": lambda: iter([test_images.reshape(-1)]),
        },
    )


# ---------------------------------------------------------------- ImageNet 64x64


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _NpzBatch:
    """One ``*.npz`` batch of the downsampled ImageNet, in a directory or inside a zip."""

    def __init__(self, file: Path, member: str | None = None) -> None:
        self.file, self.member = file, member
        self.name = f"{file}:{member}" if member else str(file)
        self.size = self._count()

    def _open_bytes(self) -> io.BytesIO | Path:
        if self.member is None:
            return self.file
        with zipfile.ZipFile(self.file) as z:
            return io.BytesIO(z.read(self.member))

    def _count(self) -> int:
        try:
            with zipfile.ZipFile(self._open_bytes()) as npz, npz.open("data.npy") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if major == 1
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, _ = read_header(f)
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise MalformedSourceError(
                f"imagenet64: {self.name}: not an npz batch with a 'data' array: {e}"
            ) from e
        if len(shape) != 2 or shape[1] != 12288:
            raise MalformedSourceError(
                f"imagenet64: {self.name}: data is {shape}, expected (N, 12288)"
            )
        return int(shape[0])

    def load(self) -> np.ndarray:
        try:
            with np.load(self._open_bytes(), allow_pickle=False) as npz:
                data = npz["data"]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise MalformedSourceError(f"imagenet64: {self.name}: cannot load: {e}") from e
        # Stored planar (4096 R, 4096 G, 4096 B) per image.
        data = data.astype(np.uint8, copy=False).reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(data).reshape(-1, 12288)


def _imagenet_batches(files: Sequence[Path]) -> list[_NpzBatch]:
    batches = []
    for f in files:
        if f.suffix == ".npz":
            batches.append(_NpzBatch(f))
        elif zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                members = [n for n in z.namelist() if n.endswith(".npz")]
            batches.extend(_NpzBatch(f, m) for m in members)
    return batches


def imagenet64(
    path: str | Sequence[str] | None = None,
    *,
    cache_dir: str | None = None,
    download: bool = True,
    validation_size: int = 10_000,
    checksums: dict[str, str] | None = None,
    **_: object,
) -> SourceData:
    """Downsampled ImageNet 64x64 (Oord et al. 2016) from its npz batches.

    ``path`` names the ``train_data_batch_*.npz`` / ``val_data.npz`` files, a
    directory holding them, or the ``Imagenet64_*.zip`` archives. The download
    from image-net.org needs an account there, and no checksum is published:
    pass ``checksums={"Imagenet64_val.zip": "<sha256>", ...}`` to verify, otherwise
    the sha256 of every file is recorded in the manifest.
    """
    url = None
    if path is None:
        if not download:
            raise FileNotFoundError("imagenet64: no --path given and downloads are disabled")
        cache = Path(cache_dir) if cache_dir else dl.default_cache_dir()
        files = [
            dl.download(
                IMAGENET64_URL + name,
                cache / "downloads" / "imagenet64" / name,
                sha256=(checksums or {}).get(name),
            )
            for name in IMAGENET64_FILES
        ]
        url = IMAGENET64_URL
    else:
        files = expand_files(as_paths(path), suffixes=(".npz", ".zip"))
    batches = _imagenet_batches(files)

    def base(b: _NpzBatch) -> str:
        return os.path.basename(b.member or str(b.file))

    train = sorted((b for b in batches if "train" in base(b)), key=lambda b: _natural_key(base(b)))
    test = sorted((b for b in batches if "val" in base(b)), key=lambda b: _natural_key(base(b)))
    if not train or not test:
        raise MalformedSourceError(
            "imagenet64: need train_data_batch_*.npz and val_data.npz; found "
            f"{[b.name for b in batches]}"
        )
    train_fn, val_fn = holdout_splits(
        [b.load for b in train], [b.size for b in train], validation_size
    )

    def test_fn():  # noqa: ANN202
        for b in test:
            yield b.load().reshape(-1)

    splits: dict[str, Callable[[], Any]] = {
        "train": train_fn,
        "validation": val_fn,
        "test": test_fn,
    }
    info = {
        "name": "imagenet64",
        "url": url,
        "files": describe_files(files),
        "batches": [b.name for b in train + test],
        "split_rule": f"last {validation_size} training images are validation; val_data is test",
    }
    return SourceData(
        name="imagenet64",
        seq_len=12288,
        tokenizer=pixels_tokenizer(64, 64, 3),
        info=info,
        splits=splits,
    )
