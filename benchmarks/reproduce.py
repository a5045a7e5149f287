"""Issue 17: the paper's two central results at one-GPU scale, as JSON, tables and plots.

- **Table 2** (sparse vs dense at equal steps): the scaled text pair (``scaled-text-fixed``
  vs ``scaled-text-dense``: 8 x 256, n = 12,288, fixed pattern vs dense SDPA, on the
  Wikipedia sample) and the scaled image pair (``scaled-fmnist-strided`` vs
  ``scaled-fmnist-dense``: 8 x 256, n = 784 on Fashion-MNIST), each arm trained by the
  project's trainer (Ray Train + DeepSpeed, one worker) with the same seed and steps.
- **Table 3** (bits per byte against evaluation context): the trained text models
  evaluated on the validation text with windows of n bytes that advance so every scored
  byte sees at least ``min_context`` bytes before it (``evaluation.context_windows``).

Writes ``--json`` (default ``benchmarks/results/reproduce.json``; each step merges into
what is there, so the steps can run as separate commands), draws PNGs into
``--plots-dir`` (default ``docs/results``; matplotlib, the ``bench`` extra) and prints
markdown tables beside the paper's numbers::

    python -m sparse_transformer.benchmarks.reproduce --prepare-only   # data, once
    python -m sparse_transformer.benchmarks.reproduce                  # everything
    python -m sparse_transformer.benchmarks.reproduce --steps text-dense   # one step
    python -m sparse_transformer.benchmarks.reproduce --plots-only     # redraw from JSON

``--cpu-smoke`` runs every step with tiny models on tiny data on the CPU (plumbing only;
tests/test_reproduce.py). docs/results.md has the commands and the reading.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import math
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "runs" / "data" / "reproduce"
RUNS_DIR = ROOT / "runs" / "reproduce"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_VALIDATION = 2000
PREPARED_URLS = {
    "text": f"file://{DATA_DIR}/wiki-sample-12288",
    "image": f"file://{DATA_DIR}/fashion-mnist",
}
"""The datasets ``--prepare-only`` writes, by pair (under ``DATA_DIR``)."""

# name: (pair, arm, config); the arms of a pair share everything but the attention
RUNS: dict[str, tuple[str, str, str]] = {
    "text-fixed": ("text", "sparse", "scaled-text-fixed"),
    "text-dense": ("text", "dense", "scaled-text-dense"),
    "image-strided": ("image", "sparse", "scaled-fmnist-strided"),
    "image-dense": ("image", "dense", "scaled-fmnist-dense"),
}
STEPS = (*RUNS, "sweep")
SWEEP_RUNS = ("text-fixed", "text-dense")
ARM_COLORS = {"sparse": "tab:blue", "dense": "tab:orange"}

PAPER: dict[str, Any] = {
    "source": "Child et al. 2019, tables 2 and 3 (shared/spec/sparse-transformer.md)",
    "table2": {
        "text": {
            "data": "Enwik8, n = 12,288",
            "sparse_pattern": "fixed",
            "sparse": {"bits": 0.99, "time_per_iteration": 0.55},
            "dense": {"bits": 1.00, "time_per_iteration": 1.31},
        },
        "image": {
            "data": "CIFAR-10, n = 3,072",
            "sparse_pattern": "strided",
            "sparse": {"bits": 2.80, "time_per_iteration": 0.38},
            "dense": {"bits": 2.82, "time_per_iteration": 0.54},
        },
    },
    "table3": {"n_ctx": 12288, "bits_by_min_context": {"6144": 0.9952, "12160": 0.9908}},
}

SMOKE_TEXT = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_ctx=256",
    "model.stride=16", "model.summary=8", "model.embed_shape=[16, 16]",
    "model.block_q=16", "model.block_k=8",
]  # fmt: skip
SMOKE_IMAGE = ["model.n_layers=1", "model.d_model=32"]
SMOKE_TRAIN = [
    "train.steps=4", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=2",
    "train.eval_batches=2", "train.checkpoint_every=4", "train.precision=fp32",
    "data.global_batch_size=2", "data.eval_batch_size=2", "scaling.use_gpu=false",
]  # fmt: skip


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data ---------------------------------------------------------------------------------


def write_idx(path: Path, images: np.ndarray) -> None:
    """``images`` (N, H, W) uint8 as a gzipped IDX file (what the fashion-mnist source reads)."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, *images.shape))
        f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())


def fashion_subset(source: Path, out: Path, train: int) -> Path:
    """The first ``train`` + 2,000 training images (the last 2,000 become the validation
    split) and the first 1,000 test images of Debian's IDX files, as IDX files in ``out``.

    A subset because the data travels to the GPU machine with the code and Ray's wheels
    (64 MiB in all): 16,000 prepared images take about 7 MiB, all 60,000 about 26 MiB."""
    from sparse_transformer.data.sources.images import read_idx_images

    out.mkdir(parents=True, exist_ok=True)
    images = read_idx_images(source / "train-images-idx3-ubyte.gz")
    write_idx(out / "train-images-idx3-ubyte.gz", images[: train + FASHION_VALIDATION])
    test = read_idx_images(source / "t10k-images-idx3-ubyte.gz")
    write_idx(out / "t10k-images-idx3-ubyte.gz", test[:1000])
    return out


def prepare_data(fashion_train: int = 14000) -> dict[str, str]:
    """Prepare both datasets (``PREPARED_URLS``) with the project's ``data.prepare`` (train and
    validation splits only); their URLs by pair. Prints each folder's size."""
    from sparse_transformer.data import prepare
    from sparse_transformer.distributed.config import local_path

    urls = PREPARED_URLS
    splits = ("train", "validation")
    prepare("wiki-sample", urls["text"], seq_len=12288, splits=splits)
    src = fashion_subset(
        FASHION_DIR, DATA_DIR.parent / "reproduce-src" / "fashion-mnist", fashion_train
    )
    prepare(  # the subset's last FASHION_VALIDATION images are the validation split
        "fashion-mnist", urls["image"], path=str(src), splits=splits,
        validation_size=FASHION_VALIDATION,
    )  # fmt: skip
    for pair, url in urls.items():
        size = sum(p.stat().st_size for p in Path(local_path(url)).rglob("*") if p.is_file())
        log(f"{pair}: {url} ({size / 2**20:.1f} MiB)")
    return urls


def _ours(path: Path) -> bool:
    """A file of the checkout itself: not under ``runs/`` nor a hidden folder (``.venv``,
    ``.git``, caches), so the smoke data is the same wherever the checkout lies."""
    parts = path.relative_to(ROOT).parts
    return parts[0] != "runs" and not any(part.startswith(".") for part in parts)


def smoke_data(root: Path) -> dict[str, str]:
    """Tiny datasets for ``--cpu-smoke`` from the repository's own Markdown (offline): text
    at n = 256, and 28x28 "images" whose pixels are those bytes (the fashion-mnist path)."""
    from sparse_transformer.data import prepare

    corpus = b"".join(p.read_bytes() for p in sorted(ROOT.glob("**/*.md")) if _ours(p))
    (root / "corpus.txt").write_bytes(corpus)
    text = f"file://{root}/text-256"
    prepare(
        "text", text, path=str(root / "corpus.txt"), seq_len=256, splits=("train", "validation")
    )
    pixels = np.frombuffer(corpus[: 48 * 784], dtype=np.uint8).reshape(48, 28, 28)
    (root / "idx").mkdir(exist_ok=True)
    write_idx(root / "idx" / "train-images-idx3-ubyte.gz", pixels[:40])
    write_idx(root / "idx" / "t10k-images-idx3-ubyte.gz", pixels[40:])
    image = f"file://{root}/images"
    prepare("fashion-mnist", image, path=str(root / "idx"), validation_size=8,
            splits=("train", "validation"))  # fmt: skip
    return {"text": text, "image": image}


# -- training -------------------------------------------------------------------------------


def run_overrides(run: str, url: str, storage: Path, steps: int | None, smoke: bool) -> list[str]:
    """The ``key=value`` overrides one arm trains with: its data, a fresh run folder and,
    for both arms of a pair alike, ``steps`` (None: the config's) and the smoke sizes."""
    pair = RUNS[run][0]
    out = [f"data.url={url}", f"run.storage_path={storage}", f"run.name=reproduce-{run}"]
    if smoke:
        out += (SMOKE_TEXT if pair == "text" else SMOKE_IMAGE) + SMOKE_TRAIN
    if steps is not None:
        out += [f"train.steps={steps}", f"train.checkpoint_every={steps}"]
    return out


def curves(history: list[dict[str, Any]], tokens_per_step: int) -> dict[str, list[dict]]:
    """Training loss and validation bits against step and training time (the summed log
    windows' time: evaluation and checkpoints excluded, the first step's compile included)."""
    train, val, clock, last = [], [], 0.0, 0
    for m in history:
        if "loss_bits" in m:
            clock += (m["step"] - last) * tokens_per_step / m["tokens_per_second"]
            last = m["step"]
            train.append({"step": m["step"], "loss_bits": m["loss_bits"], "train_s": clock,
                          "step_s": tokens_per_step / m["tokens_per_second"]})  # fmt: skip
        if "val_loss_bits" in m:
            val.append({"step": m["step"], "val_loss_bits": m["val_loss_bits"], "train_s": clock})
    return {"train": train, "validation": val}


def train_run(run: str, overrides: list[str]) -> dict[str, Any]:
    """Train one arm with the project's trainer (from scratch) and what it measured."""
    import torch

    from sparse_transformer.benchmarks.train_gpu import read_history
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import local_state_dir, run_training
    from sparse_transformer.model import SparseTransformer

    pair, arm, name = RUNS[run]
    cfg = load_config(name, overrides)
    shutil.rmtree(local_state_dir(cfg), ignore_errors=True)  # every number from this run
    log(f"{run}: training {name} for {cfg.train.steps} steps")
    start = time.time()
    summary = run_training(cfg, verbose=False)
    wall = time.time() - start
    tokens = cfg.data.global_batch_size * cfg.seq_len
    history = read_history(cfg)
    c = curves(history, tokens)
    steady = [w["step_s"] for w in c["train"][1:]] or [c["train"][0]["step_s"]]
    with torch.device("meta"):
        params = SparseTransformer(cfg.model).num_params()
    return {
        "pair": pair, "arm": arm, "config": name, "overrides": overrides,
        "pattern": cfg.model.pattern, "attention_backend": cfg.model.attention_backend,
        "params": params, "steps": cfg.train.steps, "seed": cfg.train.seed,
        "global_batch": cfg.data.global_batch_size, "seq_len": cfg.seq_len,
        "precision": cfg.train.precision, "wall_s": round(wall, 1),
        "train_s": round(c["train"][-1]["train_s"], 2),
        "step_s": statistics.median(steady),  # after the first (compiling) window
        "tokens_per_second": tokens / statistics.median(steady),
        "final_val_bits": c["validation"][-1]["val_loss_bits"],
        "skipped_steps": max(m.get("skipped_steps", 0) for m in history),
        "peak_memory_bytes": max(m.get("peak_memory_bytes", 0) for m in history),
        "checkpoint": summary.checkpoint, **c,
    }  # fmt: skip


# -- the context sweep (table 3) ------------------------------------------------------------


def min_contexts(n_ctx: int, stride: int) -> list[int]:
    """Table 3's minimum contexts scaled to ``n_ctx``: n/2, 3n/4, 7n/8, n - 3l, n - 3l/2,
    n - l (for n = 12,288, l = 128: 6,144, 9,216, 10,752, 11,904, 12,096, 12,160)."""
    ms = {n_ctx // 2, 3 * n_ctx // 4, 7 * n_ctx // 8}
    ms |= {n_ctx - 3 * stride, n_ctx - 3 * stride // 2, n_ctx - stride}
    return sorted(m for m in ms if 0 < m < n_ctx)


def validation_stream(url: str) -> Any:
    """The validation split's tokens in storage order: for text, the contiguous bytes."""
    import torch

    from sparse_transformer.data import StreamingDataset

    ds = StreamingDataset(url, split="validation", global_batch_size=1, shuffle=False,
                          rank=0, world_size=1)  # fmt: skip
    shards = [ds.load_shard(i).reshape(-1) for i in range(ds.num_shards)]
    return torch.from_numpy(np.concatenate(shards).astype(np.int64))


def context_sweep(
    checkpoint: str, url: str, *, batch: int, max_tokens: int | None = None
) -> dict[str, Any]:
    """Bits per byte of one trained model at each minimum context, on the same bytes."""
    import torch

    from sparse_transformer.distributed import evaluation
    from sparse_transformer.distributed.checkpoint import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(checkpoint, device=device)
    n, stream = model.config.n_ctx, validation_stream(url)
    first, last = n - 1, len(stream) - n + 1
    last = min(last, first + max_tokens) if max_tokens else last
    rows = []
    for m in min_contexts(n, model.config.stride):
        t0 = time.time()
        with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
            pairs = evaluation.context_windows(stream, n, m, first, last, batch)
            sums = evaluation.scored_loss_sums(model, pairs, device)
        rows.append({"min_context": m, "bits": evaluation.bits_per_token(sums),
                     "tokens": int(sums[1]), "seconds": round(time.time() - t0, 2)})  # fmt: skip
        log(f"sweep: min context {m}: {rows[-1]['bits']:.4f} bits over {rows[-1]['tokens']} bytes")
    return {"checkpoint": checkpoint, "step": meta["step"], "n_ctx": n, "rows": rows,
            "precision": "fp16 autocast" if device.type == "cuda" else "fp32"}  # fmt: skip


def monotone(rows: list[dict[str, Any]]) -> bool:
    """Whether bits never rise as the minimum context grows."""
    bits = [r["bits"] for r in sorted(rows, key=lambda r: r["min_context"])]
    return all(b <= a for a, b in zip(bits, bits[1:]))


# -- tables and plots -----------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table2(results: dict[str, Any]) -> str:
    """Table 2's rows beside ours: validation bits and time per step, and the ratios."""
    lines = [
        "| pair | arm | ours: val bits | ours: s/step | paper: bits | paper: time/iter |",
        "|---|---|---|---|---|---|",
    ]
    runs = results.get("runs", {})
    for pair in ("text", "image"):
        paper = PAPER["table2"][pair]
        got = {r["arm"]: r for r in runs.values() if r["pair"] == pair}
        for arm in ("sparse", "dense"):
            r, p = got.get(arm), paper[arm]
            label = paper["sparse_pattern"] if arm == "sparse" else "dense"
            lines.append(
                f"| {pair} | {label} | {_fmt(r and r['final_val_bits'])} | "
                f"{_fmt(r and r['step_s'], 4)} | {p['bits']:.2f} | {p['time_per_iteration']:.2f} |"
            )
        if len(got) == 2:
            s, d = got["sparse"], got["dense"]
            ps, pd = paper["sparse"], paper["dense"]
            lines.append(
                f"| {pair} | sparse / dense | {s['final_val_bits'] / d['final_val_bits']:.4f} | "
                f"{s['step_s'] / d['step_s']:.3f} | {ps['bits'] / pd['bits']:.4f} | "
                f"{ps['time_per_iteration'] / pd['time_per_iteration']:.3f} |"
            )
    return "\n".join(lines)


def table3(results: dict[str, Any]) -> str:
    """Table 3 beside ours: bits per byte at each minimum evaluation context (the paper's
    two published rows where our context is the paper's, n = 12,288)."""
    sweeps = results.get("context_sweep", {})
    names = [r for r in SWEEP_RUNS if r in sweeps]
    if not names:
        return "(no context sweep yet)"
    paper = PAPER["table3"]["bits_by_min_context"]
    head = "| min context | " + " | ".join(f"ours: {r}" for r in names)
    lines = [head + " | paper (fixed, n = 12,288) |", "|---" * (len(names) + 2) + "|"]
    rows = {r: {row["min_context"]: row["bits"] for row in sweeps[r]["rows"]} for r in names}
    same_n = all(sweeps[r]["n_ctx"] == PAPER["table3"]["n_ctx"] for r in names)
    for m in sorted({m for by_m in rows.values() for m in by_m}):
        cells = " | ".join(_fmt(rows[r].get(m), 4) for r in names)
        lines.append(f"| {m:,} | {cells} | {paper.get(str(m), '—') if same_n else '—'} |")
    lines.append("")
    for r in names:
        lines.append(f"{r}: bits fall monotonically with context: {monotone(sweeps[r]['rows'])}")
    return "\n".join(lines)


def plot_pair(results: dict[str, Any], pair: str, path: Path) -> Path | None:
    """Loss against step and against training time, sparse vs dense, for one pair."""
    import matplotlib.pyplot as plt

    runs = [(n, r) for n, r in results.get("runs", {}).items() if r["pair"] == pair]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90, sharey=True)
    for name, r in sorted(runs):
        color = ARM_COLORS[r["arm"]]
        for ax, x in zip(axes, ("step", "train_s")):
            ax.plot([w[x] for w in r["train"]], [w["loss_bits"] for w in r["train"]],
                    color=color, alpha=0.6, lw=1, label=f"{name} train")  # fmt: skip
            ax.plot([v[x] for v in r["validation"]], [v["val_loss_bits"] for v in r["validation"]],
                    "o-", color=color, ms=3, label=f"{name} validation")  # fmt: skip
    axes[0].set(xlabel="step", ylabel="bits per byte" if pair == "text" else "bits per dim")
    axes[1].set(xlabel="training time (s)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{pair}: sparse vs dense at equal steps", fontsize=10)
    return _save(fig, path)


def plot_sweep(results: dict[str, Any], path: Path) -> Path | None:
    """Bits per byte against the minimum evaluation context."""
    import matplotlib.pyplot as plt

    sweeps = results.get("context_sweep", {})
    if not sweeps:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for name, s in sorted(sweeps.items()):
        rows = sorted(s["rows"], key=lambda r: r["min_context"])
        x, y = [r["min_context"] for r in rows], [r["bits"] for r in rows]
        ax.plot(x, y, "o-", color=ARM_COLORS[RUNS[name][1]], label=name)
    ax.set(xlabel="minimum evaluation context (bytes)", ylabel="validation bits per byte")
    ax.legend(fontsize=7)
    ax.set_title("bits per byte against evaluation context", fontsize=10)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw(results: dict[str, Any], plots_dir: Path) -> list[Path]:
    """Every plot the results allow, as PNGs in ``plots_dir`` (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        log("matplotlib is not installed (pip install -e .[bench]): no plots; --plots-only redraws")
        return []
    made = [
        plot_pair(results, "text", plots_dir / "reproduce_text.png"),
        plot_pair(results, "image", plots_dir / "reproduce_image.png"),
        plot_sweep(results, plots_dir / "reproduce_context.png"),
    ]
    return [p for p in made if p is not None]


# -- the command ----------------------------------------------------------------------------


def load_results(path: Path, smoke: bool) -> dict[str, Any]:
    """The JSON at ``path`` to merge into (a smoke run never merges with a real one)."""
    if path.exists():
        results = json.loads(path.read_text())
        if results.get("smoke") == smoke:
            return results
    return {"issue": 17, "smoke": smoke, "paper": PAPER, "runs": {}, "context_sweep": {}}


def save(results: dict[str, Any], path: Path) -> None:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results.update(device=gpu, torch=torch.__version__, updated=time.strftime("%Y-%m-%d %H:%M"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def run_steps(args: argparse.Namespace, results: dict[str, Any], json_path: Path) -> None:
    """Train the chosen arms, then sweep; the JSON is rewritten after each step."""
    if not args.cpu_smoke:
        return _run_steps(args, results, json_path, None)
    with tempfile.TemporaryDirectory(prefix="st-reproduce-") as work:  # data, runs: removed
        _run_steps(args, results, json_path, Path(work))


def _run_steps(
    args: argparse.Namespace, results: dict[str, Any], json_path: Path, work: Path | None
) -> None:
    chosen = args.steps.split(",")
    urls = smoke_data(work) if work else _prepared_urls(chosen)
    storage = work / "runs" if work else RUNS_DIR
    steps = {"text": args.text_steps, "image": args.image_steps}
    plan = {
        run: run_overrides(run, urls[RUNS[run][0]], storage, steps[RUNS[run][0]], args.cpu_smoke)
        for run in RUNS
        if run in chosen
    }
    if plan:
        with ray_session(*next(iter(plan.items()))):
            for run, overrides in plan.items():
                results["runs"][run] = train_run(run, overrides)
                save(results, json_path)
    if "sweep" in chosen:
        sweep_all(storage, urls["text"], results, json_path, args.cpu_smoke, args.sweep_tokens)


def sweep_all(
    storage: Path,
    url: str,
    results: dict[str, Any],
    json_path: Path,
    smoke: bool,
    max_tokens: int | None,
) -> None:
    """The context sweep of every text arm trained under ``storage`` (the fixed one first).

    An arm trained elsewhere is skipped (its sweep already in the JSON stays): each GPU
    command runs on a fresh machine, so the two arms are trained and swept in two."""
    from sparse_transformer.distributed.checkpoint import latest_checkpoint

    found = {run: latest_checkpoint(str(storage / f"reproduce-{run}")) for run in SWEEP_RUNS}
    if not any(found.values()):
        raise SystemExit(f"reproduce: no trained text model in {storage}: train one first")
    for run, ckpt in found.items():
        if ckpt is None:
            log(f"sweep: no checkpoint of {run} in {storage}: skipped")
            continue
        results["context_sweep"][run] = context_sweep(
            ckpt, url, batch=2 if smoke else 8, max_tokens=512 if smoke else max_tokens
        )
        save(results, json_path)


@contextlib.contextmanager
def ray_session(run: str, overrides: list[str]) -> Iterator[None]:
    """One local Ray instance for every arm (``run_training`` joins it instead of starting
    and stopping its own each time)."""
    import ray

    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import init_ray

    instance = init_ray(load_config(RUNS[run][2], overrides))
    try:
        yield
    finally:
        if instance.started:
            ray.shutdown()


def _prepared_urls(chosen: list[str]) -> dict[str, str]:
    """The prepared datasets' URLs; the ones the chosen steps need must exist."""
    from sparse_transformer.distributed.config import local_path

    needed = {RUNS[s][0] for s in chosen if s in RUNS} | ({"text"} if "sweep" in chosen else set())
    for pair in sorted(needed):
        url = PREPARED_URLS[pair]
        if not Path(local_path(url), "manifest.json").is_file():
            raise SystemExit(f"reproduce: no dataset at {url}: run --prepare-only first")
    return dict(PREPARED_URLS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {STEPS}")
    p.add_argument("--text-steps", type=int, default=None, help="both text arms (config's)")
    p.add_argument("--image-steps", type=int, default=None, help="both image arms (config's)")
    p.add_argument("--sweep-tokens", type=int, default=None, help="bytes scored (all)")
    p.add_argument("--json", default=None, help="default benchmarks/results/reproduce.json")
    p.add_argument("--plots-dir", default=None, help="default docs/results")
    p.add_argument("--prepare-only", action="store_true", help="prepare the data and exit")
    p.add_argument("--fashion-train", type=int, default=14000, help="train images kept")
    p.add_argument("--plots-only", action="store_true", help="tables and plots from --json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models and data, CPU")
    args = p.parse_args(argv)
    if unknown := set(args.steps.split(",")) - set(STEPS):
        p.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    if args.prepare_only:
        prepare_data(args.fashion_train)
        return 0
    smoke_dir = RUNS_DIR.parent / "reproduce-smoke"
    json_path = Path(args.json or (smoke_dir / "reproduce.json" if args.cpu_smoke
                                   else ROOT / "benchmarks/results/reproduce.json"))  # fmt: skip
    plots_dir = Path(args.plots_dir or (smoke_dir if args.cpu_smoke else ROOT / "docs/results"))
    if args.plots_only:
        results = json.loads(json_path.read_text())
    else:
        results = load_results(json_path, args.cpu_smoke)
        run_steps(args, results, json_path)
    for path in draw(results, plots_dir):
        log(f"plot: {path}")
    print("Table 2 (sparse vs dense at equal steps)\n\n" + table2(results))
    print("\nTable 3 (bits per byte against minimum evaluation context)\n\n" + table3(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
