"""Sources in their real formats: files the tests generate (CIFAR pickle tarball, IDX, npz,
OGG/WAV, text, enwik8 zip), prepared to shards and read back; malformed inputs fail clearly.

The ``make_*`` helpers are imported by the other data tests.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sparse_transformer.data import (
    ChecksumMismatchError,
    MalformedSourceError,
    ManifestError,
    load_manifest,
    mu_law_decode,
    mu_law_encode,
    prepare,
)
from sparse_transformer.data.shards import decode_shard

# ------------------------------------------------------------------ generators


def make_cifar_tarball(path: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """A cifar-10-python.tar.gz in the real layout: python pickles of planar (N, 3072) uint8.

    Returns the planar arrays by batch name.
    """
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            batches[name] = data
            d = {
                b"batch_label": name.encode(),
                b"labels": rng.integers(0, 10, per_batch).tolist(),
                b"data": data,
                b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
            }
            blob = pickle.dumps(d, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        meta = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return batches


def cifar_to_hwc(planar: np.ndarray) -> np.ndarray:
    """The expected token sequences: raster order, channel innermost."""
    out = np.empty_like(planar)
    for c in range(3):
        out[:, c::3] = planar[:, c * 1024 : (c + 1) * 1024]
    return out


def make_idx(path: Path, images: np.ndarray, *, magic: int = 0x00000803, gz: bool = True) -> Path:
    """An IDX images file (big-endian header, then the pixels)."""
    n, h, w = images.shape
    blob = struct.pack(">IIII", magic, n, h, w) + images.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def make_npz(path: Path, n: int, seed: int) -> np.ndarray:
    """A downsampled-ImageNet npz batch: planar (n, 12288) uint8 'data' plus labels."""
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 12288), dtype=np.uint8)
    np.savez(path, data=data, labels=np.arange(n))
    return data


def make_tone(path: Path, *, freq: float, rate: int, seconds: float, channels: int = 1) -> None:
    """A sine tone written with soundfile (format from the suffix: .ogg is Vorbis)."""
    import soundfile as sf

    t = np.arange(int(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    sf.write(str(path), data, rate)


def read_split(url: str, split: str, storage_options: dict | None = None) -> np.ndarray:
    """All samples of a split in storage order, straight from the shards."""
    import fsspec

    m = load_manifest(url, storage_options)
    rows = []
    for shard in m.splits[split].shards:
        with fsspec.open(m.shard_url(shard), "rb", **(storage_options or {})) as f:
            rows.append(
                decode_shard(f.read(), seq_len=m.seq_len, num_samples=shard.num_samples, name="x")
            )
    return np.concatenate(rows) if rows else np.empty((0, m.seq_len), np.uint8)


# ------------------------------------------------------------------ text


def test_text_files_split_exactly_and_bytes_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    b = rng.integers(0, 256, 30_011, dtype=np.uint8).tobytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(a)
    (tmp_path / "in" / "b.txt.gz").write_bytes(gzip.compress(b))
    out = f"file://{tmp_path}/ds"
    m = prepare("text", out, path=str(tmp_path / "in"), seq_len=100, shard_bytes=2_000)
    whole = np.frombuffer(a + b, dtype=np.uint8)
    n = len(whole)  # 80,011: 72,010 / 4,000 / 4,001 bytes
    bounds = [0, round(0.9 * n), round(0.95 * n), n]
    for i, split in enumerate(("train", "validation", "test")):
        part = whole[bounds[i] : bounds[i + 1]]
        k = len(part) // 100
        assert m.splits[split].num_samples == k
        assert m.splits[split].dropped_tokens == len(part) - k * 100
        np.testing.assert_array_equal(read_split(out, split), part[: k * 100].reshape(k, 100))
    # Every shard but the last of a split has the same number of samples.
    counts = [s.num_samples for s in m.splits["train"].shards]
    assert set(counts[:-1]) == {20} and 0 < counts[-1] <= 20
    assert m.tokenizer["kind"] == "bytes" and m.tokenizer["vocab_size"] == 256
    assert [f["path"] for f in m.source["files"]] == [
        str(tmp_path / "in" / "a.txt"),
        str(tmp_path / "in" / "b.txt.gz"),
    ]


def test_enwik8_zip_is_verified_and_split_90_5_5(tmp_path: Path) -> None:
    data = np.random.default_rng(2).integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    z = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("enwik8", data)
    with pytest.raises(ChecksumMismatchError, match=r"enwik8\.zip.*md5"):
        prepare("enwik8", f"file://{tmp_path}/bad", path=str(z), seq_len=100)
    assert not (tmp_path / "bad" / "manifest.json").exists()
    m = prepare("enwik8", f"file://{tmp_path}/ok", path=str(z), seq_len=100, verify=False)
    assert m.source["split_bytes"] == {"train": 18_000, "validation": 1_000, "test": 1_000}
    got = read_split(f"file://{tmp_path}/ok", "validation")
    np.testing.assert_array_equal(got.reshape(-1), np.frombuffer(data[18_000:19_000], np.uint8))


# ------------------------------------------------------------------ images


def test_cifar10_tarball_to_raster_order(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    batches = make_cifar_tarball(tarball, per_batch=20)
    out = f"file://{tmp_path}/cifar"
    m = prepare("cifar10", out, path=str(tarball), validation_size=7, shard_bytes=3072 * 16)
    assert m.seq_len == 3072
    assert m.tokenizer["image_shape"] == [32, 32, 3]
    assert {k: v.num_samples for k, v in m.splits.items()} == {
        "train": 93,
        "validation": 7,
        "test": 20,
    }
    train_planar = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)])
    expected = cifar_to_hwc(train_planar)
    np.testing.assert_array_equal(read_split(out, "train"), expected[:93])
    np.testing.assert_array_equal(read_split(out, "validation"), expected[93:])
    np.testing.assert_array_equal(read_split(out, "test"), cifar_to_hwc(batches["test_batch"]))
    # One pixel by hand: image 0, row 1, column 2, green.
    img = read_split(out, "train")[0].reshape(32, 32, 3)
    assert img[1, 2, 1] == train_planar[0, 1024 + 1 * 32 + 2]


def test_cifar10_truncated_tarball_names_the_file(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_tarball(tarball, per_batch=50)
    blob = tarball.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MalformedSourceError, match=r"cut\.tar\.gz.*truncated or corrupt"):
        prepare("cifar10", f"file://{tmp_path}/out", path=str(cut))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cifar10_refuses_pickled_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned",))

    blob = pickle.dumps({b"data": Evil()}, protocol=2)
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(MalformedSourceError, match=r"refusing to unpickle posix\.system"):
        prepare("cifar10", f"file://{tmp_path}/out", path=str(tarball))


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (9, 28, 28), dtype=np.uint8)
    make_idx(tmp_path / "train-images-idx3-ubyte", train, gz=True)
    make_idx(tmp_path / "t10k-images-idx3-ubyte", test, gz=False)
    out = f"file://{tmp_path}/fm"
    m = prepare("fashion-mnist", out, path=str(tmp_path), validation_size=5)
    assert m.seq_len == 784 and m.tokenizer["image_shape"] == [28, 28, 1]
    np.testing.assert_array_equal(read_split(out, "train"), train[:25].reshape(25, 784))
    np.testing.assert_array_equal(read_split(out, "validation"), train[25:].reshape(5, 784))
    np.testing.assert_array_equal(read_split(out, "test"), test.reshape(9, 784))


def test_idx_wrong_magic_and_truncation_name_the_file(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    make_idx(tmp_path / "train-images-idx3-ubyte", images, magic=0x00000801, gz=False)
    make_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=False)
    with pytest.raises(
        MalformedSourceError, match=r"train-images-idx3-ubyte: bad IDX magic 0x00000801"
    ):
        prepare("fashion-mnist", f"file://{tmp_path}/o", path=str(tmp_path), validation_size=1)
    good = make_idx(tmp_path / "train-images-idx3-ubyte", images, gz=False)
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(MalformedSourceError, match=r"train-images-idx3-ubyte: header says 4x28x28"):
        prepare("fashion-mnist", f"file://{tmp_path}/o", path=str(tmp_path), validation_size=1)


def test_imagenet64_npz_batches_in_a_zip(tmp_path: Path) -> None:
    d = tmp_path / "raw"
    d.mkdir()
    b1 = make_npz(d / "train_data_batch_1.npz", 3, seed=1)
    b2 = make_npz(d / "train_data_batch_2.npz", 4, seed=2)
    b10 = make_npz(d / "train_data_batch_10.npz", 2, seed=10)  # natural order: 1, 2, 10
    val = make_npz(d / "val_data.npz", 3, seed=3)
    z = tmp_path / "Imagenet64_train.zip"
    with zipfile.ZipFile(z, "w") as f:
        for name in ("train_data_batch_1.npz", "train_data_batch_2.npz", "train_data_batch_10.npz"):
            f.write(d / name, name)
    out = f"file://{tmp_path}/in64"
    m = prepare("imagenet64", out, path=[str(z), str(d / "val_data.npz")], validation_size=3)
    assert m.tokenizer["image_shape"] == [64, 64, 3]

    def hwc(planar: np.ndarray) -> np.ndarray:
        return planar.reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1).reshape(-1, 12288)

    train = hwc(np.concatenate([b1, b2, b10]))
    np.testing.assert_array_equal(read_split(out, "train"), train[:6])
    np.testing.assert_array_equal(read_split(out, "validation"), train[6:])
    np.testing.assert_array_equal(read_split(out, "test"), hwc(val))


def test_failure_while_writing_leaves_no_dataset(tmp_path: Path) -> None:
    """The test split's npz is truncated: train shards get written, then everything is undone."""
    d = tmp_path / "raw"
    d.mkdir()
    make_npz(d / "train_data_batch_1.npz", 6, seed=1)
    make_npz(d / "val_data.npz", 3, seed=3)
    # Keep the npy header (so the batch is counted) but cut the pixel data short.
    with zipfile.ZipFile(d / "val_data.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["data.npy"] = members["data.npy"][:5000]
    with zipfile.ZipFile(d / "val_data.npz", "w") as z:
        for n, blob in members.items():
            z.writestr(n, blob)
    out = tmp_path / "ds"
    # A previous dataset at the same place must not survive as if it were the new one.
    (tmp_path / "t.txt").write_bytes(b"x" * 1000)
    prepare("text", f"file://{out}", path=str(tmp_path / "t.txt"), seq_len=10)
    assert (out / "manifest.json").exists()
    with pytest.raises(MalformedSourceError, match=r"val_data\.npz: cannot load"):
        prepare("imagenet64", f"file://{out}", path=str(d), validation_size=2, shard_bytes=12288)
    assert not (out / "manifest.json").exists()
    # Every shard this run wrote is removed; only the old dataset's test shard, which the
    # run never reached, is left, and without a manifest it is not part of any dataset.
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert leftovers == ["test/00000.parquet"]
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(f"file://{out}")


# ------------------------------------------------------------------ audio


def test_mu_law_round_trip() -> None:
    x = np.linspace(-1, 1, 10_001)
    q = mu_law_encode(x)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255
    assert np.all(np.diff(q.astype(int)) >= 0)  # monotonic
    assert mu_law_encode(np.array([0.0]))[0] in (127, 128)
    err = np.abs(mu_law_decode(q) - x)
    assert err.max() < 0.035  # coarse near +-1, fine near 0
    assert np.abs(mu_law_decode(mu_law_encode(np.array([0.001]))) - 0.001) < 2e-4


def test_audio_ogg_and_wav_resampled_to_12k(tmp_path: Path) -> None:
    d = tmp_path / "music"
    d.mkdir()
    make_tone(d / "a.ogg", freq=440.0, rate=44_100, seconds=2.0, channels=2)
    make_tone(d / "b.wav", freq=1000.0, rate=12_000, seconds=1.0)
    (d / "notes.txt").write_text("not audio, ignored by suffix")
    out = f"file://{tmp_path}/audio"
    m = prepare("audio", out, path=str(d), seq_len=1024, fractions=(0.8, 0.1, 0.1))
    assert m.tokenizer["kind"] == "mu-law" and m.tokenizer["sample_rate"] == 12_000
    # 2 s at 12 kHz = 24,000 samples -> 23 windows; 1 s -> 11 windows.
    assert m.source["windows_per_file"] == [23, 11]
    total = sum(s.num_samples for s in m.splits.values())
    assert total == 34
    assert {k: v.num_samples for k, v in m.splits.items()} == {
        "train": 27,
        "validation": 4,
        "test": 3,
    }
    rows = np.concatenate([read_split(out, s) for s in ("train", "validation", "test")])
    for window, freq in ((rows[5], 440.0), (rows[30], 1000.0)):
        x = mu_law_decode(window)
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        peak = np.argmax(spectrum) * 12_000 / len(x)
        assert abs(peak - freq) < 12_000 / len(x)  # within one FFT bin
        assert 0.4 < np.abs(x).max() < 0.6  # amplitude 0.5 survives resampling and mu-law


def test_unreadable_audio_names_the_file(tmp_path: Path) -> None:
    d = tmp_path / "music"
    d.mkdir()
    make_tone(d / "a.wav", freq=440.0, rate=12_000, seconds=0.5)
    (d / "broken.ogg").write_bytes(b"OggS" + os.urandom(500))
    with pytest.raises(MalformedSourceError, match=r"broken\.ogg: cannot decode"):
        prepare("audio", f"file://{tmp_path}/o", path=str(d), seq_len=256)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_memory_filesystem_and_unknown_source(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"abcdefghij" * 100)
    m = prepare("text", "memory://ds-test/text", path=str(tmp_path / "t.txt"), seq_len=10)
    assert m.url == "memory://ds-test/text/manifest.json"
    assert read_split("memory://ds-test/text", "train")[0].tobytes() == b"abcdefghij"
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        prepare("nope", "memory://x")


def test_reuse_an_existing_dataset_only_when_it_matches(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)
    out = f"file://{tmp_path}/ds"
    m1 = prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=64, overwrite=False)
    shard = tmp_path / "ds" / m1.splits["train"].shards[0].path
    before = shard.stat().st_mtime_ns
    m2 = prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=64, overwrite=False)
    assert m2.to_json() == m1.to_json() and shard.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="already holds text with seq_len 64"):
        prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=32, overwrite=False)
    m3 = prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=32)
    assert m3.seq_len == 32


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_dataset_of_another_source_is_never_rebuilt_over(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)
    out = f"file://{tmp_path}/ds"
    prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=64)
    before = _snapshot(tmp_path / "ds")
    with pytest.raises(ValueError, match="already holds text") as err:
        prepare("wiki-sample", out, seq_len=64, overwrite=False, download=False)
    assert "data.prepare=false" in str(err.value) and "nothing was changed" in str(err.value)
    assert "overwrite" not in str(err.value)  # it never advises replacing the data
    assert _snapshot(tmp_path / "ds") == before


@pytest.mark.parametrize("damage", ["truncated", "not json", "another format"])
def test_a_damaged_manifest_is_an_error_naming_it_not_a_rebuild(
    tmp_path: Path, damage: str
) -> None:
    from sparse_transformer.data.errors import ManifestError

    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 40)
    out = f"file://{tmp_path}/ds"
    prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=64)
    manifest = tmp_path / "ds" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(
        {"truncated": text[: len(text) // 2], "not json": "\x00\x01", "another format": "{}"}[
            damage
        ]
    )
    before = _snapshot(tmp_path / "ds")
    with pytest.raises(ManifestError, match="manifest.json"):
        prepare("text", out, path=str(tmp_path / "t.txt"), seq_len=64, overwrite=False)
    assert _snapshot(tmp_path / "ds") == before  # no shard rewritten, none left stale
