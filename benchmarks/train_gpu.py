"""GPU training benchmark: Ray Train + DeepSpeed, fp16 with dynamic loss scaling, recomputation.

Runs the ``enwik8`` configuration and the 128-layer ``cifar10`` configuration for a few
hundred steps each on one GPU (one Ray Train worker, batch sized by ``--batch``) and
records tokens/s, peak memory, the loss-scale history and the skipped steps, plus the
first and last training loss (the loss must fall, the scale must settle). Results go to
``benchmarks/results/train_gpu.json``.

Data: ``--enwik8-url`` / ``--cifar10-url`` name prepared datasets; without them the
benchmark prepares the ``text`` source from this repository's own files (bytes, offline)
at each configuration's sequence length, which is enough to watch the loss fall and the
loss scale settle (not to compare bits/byte with the paper).

    python -m sparse_transformer.benchmarks.train_gpu --steps 300 \
        --batch-enwik8 4 --batch-cifar10 16

Not run on a GPU yet (no device time was left); `--cpu-smoke --configs tiny` checks the
plumbing on the CPU, and tests/test_cli.py validates the GPU overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _repo_text(out: Path) -> Path:
    """A text corpus from the repository's own sources and docs (several MB, offline)."""
    root = Path(__file__).resolve().parents[1]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".venv"]  # not walked (tens of thousands of files)
        files += [Path(folder, n) for n in names if Path(n).suffix in (".py", ".md", ".yaml")]
    text = b"".join(p.read_bytes() for p in sorted(files))  # in rglob's order, as before
    corpus = out / "corpus.txt"
    corpus.write_bytes(text * 8)
    return corpus


def repo_text_dataset(work: Path, seq_len: int) -> str:
    """The URL of the repository's own text prepared at ``seq_len`` under ``work`` (once)."""
    from sparse_transformer.data import prepare

    corpus = work / "corpus.txt"
    if not corpus.exists():
        _repo_text(work)
    url = f"file://{work}/text-{seq_len}"
    prepare("text", url, path=str(corpus), seq_len=seq_len, overwrite=False)
    return url


def read_history(cfg: Any) -> list[dict[str, Any]]:
    """Every metrics record rank 0 wrote for the run of ``cfg`` (metrics.jsonl)."""
    from sparse_transformer.distributed.trainer import local_state_dir

    text = (local_state_dir(cfg) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def bench_overrides(
    name: str,
    steps: int,
    batch: int,
    url: str,
    storage: Path,
    backend: str,
    *,
    precision: str = "fp16",
    use_gpu: bool = True,
    zero_stage: int = 1,
) -> list[str]:
    """The ``key=value`` overrides one benchmark run applies to the named config."""
    return [
        f"train.steps={steps}",
        f"train.warmup_steps={min(100, max(steps // 3, 1))}",
        f"train.log_every={min(10, steps)}",
        f"train.eval_every={steps}",
        "train.eval_batches=2",
        f"train.checkpoint_every={steps}",
        "train.sample_length=0",
        f"train.precision={precision}",
        f"train.zero_stage={zero_stage}",
        f"data.global_batch_size={batch}",
        f"data.eval_batch_size={batch}",
        f"data.url={url}",
        "data.prepare=false",
        "scaling.num_workers=1",
        f"scaling.use_gpu={'true' if use_gpu else 'false'}",
        f"run.storage_path={storage}",
        f"run.name=bench-{name}-{int(time.time())}",
        "run.max_failures=0",
        f"model.attention_backend={backend}",
        "model.recompute=block",
    ]


def bench(name: str, overrides: list[str]) -> dict:
    """Train config ``name`` with ``overrides`` (see :func:`bench_overrides`); the figures."""
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import run_training

    cfg = load_config(name, overrides)
    start = time.time()
    summary = run_training(cfg, verbose=False)
    wall = time.time() - start
    train = [m for m in read_history(cfg) if "loss_bits" in m]
    tps = [m["tokens_per_second"] for m in train[1:]] or [train[0]["tokens_per_second"]]
    return {
        "config": name,
        "steps": cfg.train.steps,
        "global_batch": cfg.data.global_batch_size,
        "seq_len": cfg.seq_len,
        "attention_backend": cfg.model.attention_backend,
        "wall_s": round(wall, 1),
        "tokens_per_second": round(sum(tps) / len(tps), 1),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in train),
        "loss_scale_history": [(m["step"], m["loss_scale"]) for m in train],
        "skipped_steps": train[-1]["skipped_steps"],
        "first_loss_bits": train[0]["loss_bits"],
        "last_loss_bits": train[-1]["loss_bits"],
        "val_loss_bits": summary.metrics.get("val_loss_bits"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-enwik8", type=int, default=4)
    p.add_argument("--batch-cifar10", type=int, default=16)
    p.add_argument("--enwik8-url", default="")
    p.add_argument("--cifar10-url", default="")
    p.add_argument("--backend", default="auto", help="attention backend (auto picks Triton)")
    p.add_argument("--configs", default="enwik8,cifar10")
    p.add_argument("--json", default="benchmarks/results/train_gpu.json")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run on the CPU in fp32 (a check of the plumbing with a small config, e.g. "
        "--configs tiny --batch-tiny 4 --steps 4; no figures to report)",
    )
    p.add_argument("--batch-tiny", type=int, default=4)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_gpu: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    precision, use_gpu = ("fp32", False) if args.cpu_smoke else ("fp16", True)
    from sparse_transformer.model import load_model_config

    work = Path(tempfile.mkdtemp(prefix="st-bench-"))
    results: list[dict[str, Any]] = []
    for name in args.configs.split(","):
        url = getattr(args, f"{name}_url", "") or repo_text_dataset(
            work, load_model_config(name).n_ctx
        )
        batch = getattr(args, f"batch_{name.replace('-', '_')}", None)
        if batch is None:
            p.error(f"no batch size option for config {name!r} (have enwik8, cifar10, tiny)")
        overrides = bench_overrides(
            name,
            args.steps,
            batch,
            url,
            work / "runs",
            args.backend,
            precision=precision,
            use_gpu=use_gpu,
        )
        res = bench(name, overrides)
        res["gpu"] = torch.cuda.get_device_name(0) if use_gpu else "cpu (smoke run)"
        res["data"] = url
        print(json.dumps(res), flush=True)
        results.append(res)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
