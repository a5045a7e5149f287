"""``sparse-transformer sample``'s files (issue 16), decoded with real readers: the PNG
grids with Pillow (the pixels where the images source put them, a trained tiny model's
completions not constant), the WAV files with soundfile (the dataset's rate, decoded
mu-law), the text file's bytes; and the command end to end from a checkpoint written in
the real format (``checkpoint.write``), without Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from sparse_transformer.cli import main
from sparse_transformer.data import load_manifest, mu_law_decode, prepare
from sparse_transformer.distributed import checkpoint, evaluation
from sparse_transformer.distributed import sample_files as sf
from sparse_transformer.model import SparseTransformer, SparseTransformerConfig
from tests.test_data_formats import make_cifar_tarball, make_idx, make_tone, read_split

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models decode one token at a time: one thread is faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(
    n_ctx: int, embed_shape: tuple[int, ...], stride: int, **overrides
) -> SparseTransformer:
    values = dict(
        n_layers=2, d_model=32, n_heads=2, ff_mult=2, n_ctx=n_ctx, pattern="strided",
        stride=stride, head_mode="merged", block_q=8, block_k=8, embed_shape=embed_shape,
        attention_backend="torch",
    )  # fmt: skip
    values.update(overrides)
    return SparseTransformer(SparseTransformerConfig(**values)).eval()


def read_png(path: Path) -> tuple[str, np.ndarray]:
    with Image.open(path) as im:
        im.load()
        return im.mode, np.asarray(im)


def grid_size(rows: int, cols: int, h: int, w: int, scale: int) -> tuple[int, int]:
    """(height, width) of a grid: the layout ``image_grid`` documents."""
    return rows * (h * scale + sf.GAP) + sf.GAP, cols * (w * scale + sf.GAP) + sf.GAP


# ------------------------------------------------------------------ images


def stripes(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 8, 8) images whose rows are flat and step by +-16 from one row to the next."""
    base = rng.integers(0, 4, n)[:, None, None] * 40
    slope = rng.choice([-1, 1], n)[:, None, None] * 16
    rows = np.arange(8)[None, :, None]
    return np.broadcast_to(100 + base + slope * rows, (n, 8, 8)).astype(np.uint8)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, SparseTransformer]]:
    """(dataset URL, a tiny model trained in-process on it): 8x8 greyscale stripes in the
    Fashion-MNIST IDX format, 80 AdamW steps (~3 s)."""
    d = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    make_idx(d / "train-images-idx3-ubyte", stripes(72, rng))
    make_idx(d / "t10k-images-idx3-ubyte", stripes(8, rng))
    url = f"file://{d}/ds"
    prepare("fashion-mnist", url, path=str(d), validation_size=8)
    train = torch.from_numpy(read_split(url, "train").astype(np.int64))
    torch.manual_seed(0)
    model = tiny_model(64, (8, 8, 1), 8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = train[torch.randint(0, len(train), (16,), generator=g)]
        _, loss = model(batch, evaluation.next_token_targets(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() / np.log(2) < 3, loss  # it learned (8 bits per dim at the start)
    yield url, model.eval()


def test_cifar_grid_shows_the_images_as_the_source_stored_them(tmp_path: Path) -> None:
    """CIFAR-10 stores planar (1024 R, 1024 G, 1024 B) images; the grid's original and
    prompt cells, read back with Pillow, are those images pixel for pixel."""
    planar = make_cifar_tarball(tmp_path / "c.tar.gz", per_batch=4)["data_batch_5"][-3:]
    url = f"file://{tmp_path}/cifar"
    fmt = sf.data_format(
        prepare("cifar10", url, path=str(tmp_path / "c.tar.gz"), validation_size=3)
    )
    assert fmt.image_shape == (32, 32, 3)
    held = sf.held_out(url, 2)
    model = tiny_model(3072, (32, 32, 3), 96, n_layers=1, d_model=16, block_q=32, block_k=32)
    (written,) = sf.write_image_samples(model, fmt, held, tmp_path, completions=1)
    assert written.path == tmp_path / "completions-seed0.png"
    mode, grid = read_png(written.path)
    assert mode == "RGB" and grid.shape == (*grid_size(2, 3, 32, 32, 2), 3)  # scale 2
    for row in range(2):
        want = planar[row].reshape(3, 32, 32).transpose(1, 2, 0)  # (H, W, RGB)
        prompt, completion, original = (
            sf.grid_cell(grid, row, col, (32, 32, 3), scale=2) for col in range(3)
        )
        assert np.array_equal(original, want)
        assert np.array_equal(prompt[:16], want[:16]) and (prompt[16:] == sf.HIDDEN).all()
        assert np.array_equal(completion[:16], want[:16])  # the lower half is the model's
        block = grid[sf.GAP : sf.GAP + 2, sf.GAP : sf.GAP + 2]  # one pixel, enlarged 2x2
        assert (block == block[0, 0]).all()


def test_trained_tiny_model_grid_is_not_constant(
    image_run: tuple[str, SparseTransformer], tmp_path: Path
) -> None:
    url, model = image_run
    fmt = sf.data_format(load_manifest(url))
    held = sf.held_out(url, 3)
    assert np.array_equal(held, read_split(url, "validation")[:3])
    written = sf.write_image_samples(model, fmt, held, tmp_path, completions=2, unconditional=5)
    assert [f.path.name for f in written] == ["completions-seed0.png", "unconditional-seed0.png"]
    scale = sf.default_scale((8, 8, 1))
    assert scale == 8

    mode, grid = read_png(written[0].path)
    assert mode == "L" and grid.shape == grid_size(3, 4, 8, 8, scale)
    lower = []
    for row in range(3):
        cells = [sf.grid_cell(grid, row, col, (8, 8, 1), scale=scale)[..., 0] for col in range(4)]
        original = held[row].reshape(8, 8)
        assert np.array_equal(cells[3], original)
        for completion in cells[1:3]:
            assert np.array_equal(completion[:4], original[:4])
            lower.append(completion[4:])
    generated = np.stack(lower)  # (6, 4, 8): every lower half the model drew
    assert len(np.unique(generated)) > 4, generated  # not constant, not one flat colour
    # trained on flat rows: far more pixels repeat their left neighbour than chance (1/256)
    assert (generated[..., 1:] == generated[..., :-1]).mean() > 0.25

    mode, uncond = read_png(written[1].path)
    assert mode == "L" and uncond.shape == grid_size(1, 5, 8, 8, scale)
    drawn = np.stack([sf.grid_cell(uncond, 0, col, (8, 8, 1), scale=scale) for col in range(5)])
    assert drawn.std() > 0 and len(np.unique(drawn)) > 4
    # the first pixel comes from a held-out image (the model has no start token)
    assert [d[0, 0, 0] for d in drawn] == [held[j % 3, 0] for j in range(5)]


def test_png_of_any_size_reads_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for shape in [(5, 7), (5, 7, 1), (3, 11, 3), (1, 1, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        mode, back = read_png(sf.write_png(tmp_path / "x.png", image))
        assert mode == ("RGB" if image.ndim == 3 and shape[2] == 3 else "L")
        assert np.array_equal(back, image.reshape(back.shape))
    with pytest.raises(ValueError, match="uint8"):
        sf.encode_png(np.zeros((2, 2, 2), np.uint8))


# ------------------------------------------------------------------ audio


def test_audio_wav_files_at_the_dataset_rate(tmp_path: Path) -> None:
    """Prepared at 8 kHz (the manifest records the rate), windows of 256 samples, a model
    of n = 128: the WAV files are 8 kHz mono 16-bit, 128 samples long, the decoded
    mu-law of the held-out window, and each continuation starts with its prompt."""
    make_tone(tmp_path / "tone.wav", freq=440, rate=8000, seconds=3.0)
    url = f"file://{tmp_path}/audio"
    fmt = sf.data_format(prepare("audio", url, path=str(tmp_path / "tone.wav"), seq_len=256,
                                 sample_rate=8000))  # fmt: skip
    assert (fmt.kind, fmt.sample_rate, fmt.seq_len) == ("audio", 8000, 256)
    held = sf.held_out(url, 2)
    model = tiny_model(128, (16, 8), 8)
    out = tmp_path / "out"
    out.mkdir()
    written = sf.write_audio_samples(model, fmt, held, out, length=48, completions=2,
                                     unconditional=1, seed=5)  # fmt: skip
    names = sorted(f.path.name for f in written)
    assert names == [
        "completion-0-0-seed5.wav", "completion-0-1-seed5.wav", "completion-1-0-seed5.wav",
        "completion-1-1-seed5.wav", "unconditional-0-seed5.wav", "validation-0.wav",
        "validation-1.wav",
    ]  # fmt: skip
    for f in written:
        info = soundfile.info(str(f.path))
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")
        data, rate = soundfile.read(str(f.path), dtype="float64")
        assert rate == 8000 and np.abs(data).max() <= 1.0
        assert len(data) == (49 if f.path.name.startswith("unconditional") else 128)
    for i in range(2):
        original, _ = soundfile.read(str(out / f"validation-{i}.wav"), dtype="float64")
        np.testing.assert_allclose(original, mu_law_decode(held[i, :128]), atol=1 / 32767)
        assert np.abs(original).max() > 0.3  # the tone (amplitude 0.5), not silence
        for k in range(2):
            drawn, _ = soundfile.read(str(out / f"completion-{i}-{k}-seed5.wav"), dtype="float64")
            np.testing.assert_array_equal(drawn[:80], original[:80])  # the prompt
    with pytest.raises(ValueError, match="--length"):
        sf.write_audio_samples(model, fmt, held, out, length=128)

    # the command, from a checkpoint of that model: the same files by default
    save_checkpoint(tmp_path / "run", model, url, 1)
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--length", "48",
                 "--held-out", "1", "--completions", "1", "--seed", "5"]) == 0  # fmt: skip
    folder = tmp_path / "run" / "samples" / "step1"
    assert sorted(p.name for p in folder.iterdir()) == [
        "completion-0-0-seed5.wav",
        "validation-0.wav",
    ]
    assert soundfile.info(str(folder / "completion-0-0-seed5.wav")).frames == 128


# ------------------------------------------------------------------ text and the command


def test_text_file_holds_the_bytes_sample_text_prints(tmp_path: Path) -> None:
    model = tiny_model(64, (8, 8), 8)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # not uniform: a real choice per byte
    data = evaluation.sample_bytes(model, b"ab", 30, seed=3, device=CPU, top_p=0.9)
    text = evaluation.sample_text(model, "ab", 30, seed=3, device=CPU, top_p=0.9)
    assert data.startswith(b"ab") and len(data) == 32
    assert data.decode("utf-8", errors="replace") == text
    assert sf.write_text(tmp_path / "t.txt", data).read_bytes() == data


def save_checkpoint(run_dir: Path, model: SparseTransformer, data_url: str, step: int) -> Path:
    """One complete checkpoint in the real format (no DeepSpeed part: ``model.pt`` is what
    ``sample`` reads)."""
    d = run_dir / f"checkpoint_{step:06d}"
    d.mkdir(parents=True)
    meta = checkpoint.make_meta(step=step, world_size=1, zero_stage=0, precision="fp32",
                                model=model.config.to_dict(), data_url=data_url)  # fmt: skip
    checkpoint.write(d, 0, save_engine=lambda _: None, rank_state={"step": step, "world_size": 1},
                     meta=meta, model_state=model.state_dict())  # fmt: skip
    return d


def test_sample_command_writes_an_image_grid_from_a_checkpoint(
    image_run: tuple[str, SparseTransformer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, model = image_run
    save_checkpoint(tmp_path / "run", model, url, 80)
    args = ["sample", "--checkpoint", str(tmp_path / "run"), "--held-out", "2"]
    assert main([*args, "--unconditional", "3", "--prompt", "x"]) == 0
    out, err = capsys.readouterr()
    folder = tmp_path / "run" / "samples" / "step80"  # the default: beside the checkpoint
    assert out.splitlines() == [
        f"[sample] wrote {folder / 'completions-seed0.png'}: 2 held-out images: the top half, "
        "3 completion(s) of the lower half, the original",
        f"[sample] wrote {folder / 'unconditional-seed0.png'}: 3 unconditional images",
    ]
    assert "--prompt: not used for image data" in err
    _, grid = read_png(folder / "completions-seed0.png")
    assert grid.shape == grid_size(2, 5, 8, 8, 8)  # prompt, 3 completions, original
    _, uncond = read_png(folder / "unconditional-seed0.png")
    assert uncond.shape == grid_size(1, 3, 8, 8, 8)

    assert main([*args, "--completions", "1", "--seed", "2", "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.startswith(f"[sample] wrote {tmp_path / 'o'}/completions-seed2")
    _, grid = read_png(tmp_path / "o" / "completions-seed2.png")
    assert grid.shape == grid_size(2, 3, 8, 8, 8)


def test_sample_command_on_text_prints_and_writes_the_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "corpus.txt").write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    url = f"file://{tmp_path}/text"
    prepare("text", url, path=str(tmp_path / "corpus.txt"), seq_len=64)
    model = tiny_model(64, (8, 8), 8)
    ckpt = save_checkpoint(tmp_path / "run", model, url, 3)
    assert (
        main(["sample", "--checkpoint", str(ckpt), "--length", "20", "--out", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    data = (tmp_path / "text-seed0.txt").read_bytes()
    assert data.startswith(b"The ") and len(data) == 24
    assert out == [data.decode("utf-8", errors="replace"),
                   f"[sample] wrote {tmp_path / 'text-seed0.txt'}: 24 bytes"]  # fmt: skip

    # a dataset that is gone: text as before, one line on stderr says why
    moved = save_checkpoint(tmp_path / "run2", model, f"file://{tmp_path}/gone", 3)
    assert main(["sample", "--checkpoint", str(moved), "--length", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("The ") and "dataset cannot be read" in err
    assert (tmp_path / "run2" / "samples" / "step3" / "text-seed0.txt").is_file()
    assert main(["sample", "--checkpoint", str(moved), "--data", f"file://{tmp_path}/gone"]) == 2


def test_default_folder_beside_a_local_checkpoint_or_under_samples() -> None:
    assert sf.default_out_dir("s3://bucket/runs/exp/", 7) == Path("samples", "exp", "step7")
    assert sf.default_out_dir("file:///r/exp", 7) == Path("/r/exp/samples/step7")
