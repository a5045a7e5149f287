"""Training-step benchmark: tokens/s, MFU, kernels per step and peak memory, one GPU.

One training step of the bare model (forward + backward, fp16 weights, no optimizer,
recomputation as each config sets it) for enwik8, cifar10 (128 layers), music-65k and
music-1m; every row side by side in one run:

- ``sparse``: the config as it is (block-sparse Triton attention);
- ``dense-sdpa``: the same model with every attention dense causal through
  ``model.attention_backend: sdpa`` (cuDNN / FlashAttention), the strongest dense baseline;

each ``eager`` and ``compiled`` (``SparseTransformer.compile_blocks``). Then the same
step through Ray Train + DeepSpeed (fp16, dynamic loss scaling, Adam, ZeRO 1, compiled):
a real training run of a few dozen steps on text prepared from this repository; and
the whole step through the trainer's DeepSpeed engine in one process, without Ray
(``deepspeed``: fp16 weights in DeepSpeed's fp16 optimizer at ``--zero-stage``;
``deepspeed-cudagraphs``: the same with the blocks replayed as CUDA graphs;
``deepspeed-autocast``: fp32 weights under DeepSpeed's ``torch_autocast`` at ZeRO 0),
which tells what DeepSpeed's step adds to the bare one and what Ray adds to that.

    python -m sparse_transformer.benchmarks.train_step --json benchmarks/results/train_step.json

Per row: the compile (first-step) time, the step time (median of CUDA-event timings),
tokens/s, MFU = 6 N tokens/s / 760 TFLOP/s (N: parameters; 760 TFLOP/s: the H200's
measured dense fp16 matmul rate), and from one step under ``torch.profiler``: the
kernel count, the summed kernel time and the five costliest kernels; the host time is
how long the Python takes to issue one step (no sync). The JSON is rewritten after
every row, so a run cut short keeps what it measured. ``--cpu-smoke`` checks the
plumbing on the CPU (the tiny config, fp32; no figures to report).
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

import torch
from torch._dynamo.utils import counters

MATMUL_RATE = 760e12
"""The H200's measured dense fp16 matmul rate (benchmarks/attention.py, 8192^3)."""

SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
"""Profiler events where the host waits for the device (``.item()`` and friends)."""

CONFIGS: dict[str, dict[str, Any]] = {
    # batch: sequences per step; dense: whether the dense baseline runs (n^2 work)
    "enwik8": {"batch": 4, "dense": True},
    "cifar10": {"batch": 16, "dense": True},
    "music-65k": {"batch": 1, "dense": True},
    "music-1m": {"batch": 1, "dense": False},
    "scaled-text-fixed": {"batch": 4, "dense": True},  # issue 17's text pair (reproduce.py)
    "scaled-fmnist-strided": {"batch": 32, "dense": True},  # issue 17's image pair
    "tiny": {"batch": 2, "dense": True},  # --cpu-smoke
}


def log(msg: str) -> None:
    print(f"[train_step {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(name: str, attention: str, device: torch.device, dtype: torch.dtype, **changes):
    """The named model, or its dense-SDPA twin, initialised on ``device`` in ``dtype``."""
    from sparse_transformer.model import SparseTransformer, load_model_config

    cfg = load_model_config(name)
    if attention == "dense-sdpa":
        changes = {"pattern": "dense", "attention_backend": "sdpa", **changes}
    cfg = cfg.replace(**changes)
    with torch.device("meta"):
        model = SparseTransformer(cfg)
    model.to_empty(device=device)
    model.init_weights(0)
    return model.to(dtype).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_fn(model, batch: torch.Tensor, targets: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        _, loss = model(batch, targets)
        loss.backward()

    return step


def _time_steps(step, device: torch.device, reps: int) -> list[float]:
    """Seconds per step: CUDA events on a GPU, the host clock on the CPU."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times


def _host_time(step, device: torch.device) -> float:
    """Seconds the host takes to issue one step, without waiting for the device."""
    _sync(device)
    t = time.perf_counter()
    step()
    issued = time.perf_counter() - t
    _sync(device)
    return issued


def profile_step(step, device: torch.device) -> dict[str, Any]:
    """Kernel count, summed kernel time and the costliest kernels of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    kernels = [
        e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
    ]  # fmt: skip
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total / 1e3
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    syncs = [e for e in prof.events() if e.name in SYNC_EVENTS]
    return {
        "host_syncs_per_step": len(syncs),
        "kernels_per_step": len(kernels) if device.type == "cuda" else None,
        "kernel_ms": round(sum(by_name.values()), 2),
        "top_kernels_ms": [[name[:90], round(ms, 2)] for name, ms in top],
    }


def measure(name: str, attention: str, mode: str, device, dtype, reps: int, **changes) -> dict:
    """One row of the bare step: build, compile (timed in the first step), time, profile."""
    model = build(name, attention, device, dtype, **changes)
    if mode != "eager":
        model.compile_blocks(**({"mode": "reduce-overhead"} if mode == "cudagraphs" else {}))
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    batch_size = CONFIGS[name]["batch"]
    batch = torch.randint(0, cfg.vocab_size, (batch_size, cfg.n_ctx), device=device, generator=g)
    step = _step_fn(model, batch, batch.roll(-1, dims=1))
    return _timed_row(name, attention, mode, model, step, device, reps)


def _timed_row(
    name: str, attention: str, mode: str, model, step, device, reps: int, n_params: int = 0
) -> dict:
    """Time and profile ``step``; ``n_params`` (0: the model's own count) for the MFU."""
    cfg = model.config
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    graphs = counters["stats"]["unique_graphs"]
    t = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t
    graphs = counters["stats"]["unique_graphs"] - graphs  # compiled inside the timed step
    step()  # a second warm-up: autotuning and lazy allocations settle
    times = sorted(_time_steps(step, device, reps))
    step_s = times[len(times) // 2]
    batch_size = CONFIGS[name]["batch"]
    tokens = batch_size * cfg.n_ctx
    n_params = n_params or model.num_params()
    row = {
        "config": name,
        "attention": attention,
        "mode": mode,
        "recompute": cfg.recompute,
        "batch": batch_size,
        "seq_len": cfg.n_ctx,
        "params": n_params,
        "first_step_s": round(first, 2),
        "graphs_compiled_first_step": graphs,
        "step_ms": round(step_s * 1e3, 2),
        "tokens_per_second": round(tokens / step_s),
        "mfu": round(6 * n_params * tokens / step_s / MATMUL_RATE, 4),
        "host_ms": round(_host_time(step, device) * 1e3, 2),
        "peak_memory_gb": (
            round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            if device.type == "cuda"
            else None
        ),
    }
    row.update(profile_step(step, device))
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _deepspeed_engine(name: str, model, cpu: bool, zero_stage: int, autocast: bool = False):
    """A one-process DeepSpeed engine with the trainer's own DeepSpeed config; with
    ``autocast``, fp32 weights under DeepSpeed's ``torch_autocast`` (fp16) instead of its
    fp16 optimizer wrapper: the optimizer steps the fp32 weights directly, and torch's
    GradScaler scales the loss and checks the gradients with multi-tensor kernels."""
    import socket

    from sparse_transformer.distributed import deepspeed_adapter
    from sparse_transformer.distributed.config import deepspeed_config, load_config

    cfg = load_config(
        name,
        [
            f"data.global_batch_size={CONFIGS[name]['batch']}",
            "scaling.num_workers=1",
            f"train.zero_stage={zero_stage}",
            f"train.precision={'fp32' if cpu else 'fp16'}",
        ],
    )
    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}
        os.environ.update({**env, "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        torch.distributed.init_process_group("gloo" if cpu else "nccl", rank=0, world_size=1)
    config = deepspeed_config(cfg, 1, on_gpu=not cpu)
    if autocast:
        config["fp16"] = {"enabled": False}
        config["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    engine, _ = deepspeed_adapter.initialize(model, config)
    return engine


def measure_deepspeed(
    name: str, device: torch.device, reps: int, zero_stage: int = 1, mode: str = "deepspeed"
) -> dict:
    """A whole training step (forward, backward, loss scaling, Adam) through the
    trainer's DeepSpeed engine, compiled, without Ray: what DeepSpeed adds to the bare
    step, and where (its own host syncs included). ``mode`` ``deepspeed-cudagraphs``
    replays the compiled blocks as CUDA graphs (``model.compile: cudagraphs``);
    ``deepspeed-autocast`` runs fp32 weights under ``torch_autocast`` at ZeRO 0."""
    from sparse_transformer.distributed import deepspeed_adapter

    cpu = device.type == "cpu"
    model = build(name, "sparse", device, torch.float32)
    graphs = mode == "deepspeed-cudagraphs"
    autocast = mode == "deepspeed-autocast"
    zero_stage = 0 if autocast else zero_stage  # its lean path: no ZeRO optimizer wrapper
    if zero_stage < 3:  # ZeRO 3's parameter hooks and compiled blocks do not mix
        model.compile_blocks(mode="reduce-overhead" if graphs else "default")
    n_params = model.num_params()  # ZeRO 3 leaves each parameter an empty placeholder
    engine = _deepspeed_engine(name, model, cpu, zero_stage, autocast)
    cfg = model.config
    batch = torch.randint(0, cfg.vocab_size, (CONFIGS[name]["batch"], cfg.n_ctx), device=device)
    targets = batch.roll(-1, dims=1)

    def step() -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        _, loss = engine(batch, targets)
        deepspeed_adapter.backward(engine, loss)  # the trainer's backward (loss scaling)
        engine.step()

    row = _timed_row(name, "sparse", mode, model, step, device, reps, n_params)
    return {**row, "zero_stage": zero_stage}


def ray_deepspeed(name: str, steps: int, work: Path, cpu: bool, zero_stage: int = 1) -> dict:
    """The same config trained through Ray Train + DeepSpeed (compiled), tokens/s from
    the run's own metrics (the first log window, which compiles, left out)."""
    from sparse_transformer.benchmarks.train_gpu import bench, bench_overrides, repo_text_dataset
    from sparse_transformer.model import load_model_config

    url = repo_text_dataset(work, load_model_config(name).n_ctx)
    overrides = bench_overrides(
        name,
        steps,
        CONFIGS[name]["batch"],
        url,
        work / "runs",
        "auto",
        precision="fp32" if cpu else "fp16",
        use_gpu=not cpu,
        zero_stage=zero_stage,
    )
    overrides.append("model.compile=true")
    res = bench(name, overrides)
    res["attention"], res["mode"], res["zero_stage"] = "sparse", "ray-deepspeed", zero_stage
    return res


def plan(configs: list[str], ray_configs: list[str], cpu: bool) -> list[tuple]:
    """(kind, config, attention, mode, model changes) for every row, most important first:
    enwik8 and cifar10 bare and through Ray Train, then the music configs, then what
    recomputation and CUDA graphs change."""

    def bare(name: str) -> list[tuple]:
        return [
            ("bare", name, attention, mode, {})
            for attention in ("sparse", "dense-sdpa")
            if attention == "sparse" or CONFIGS[name]["dense"]
            for mode in ("eager", "compiled")
        ]

    first = [c for c in configs if c in ("enwik8", "cifar10", "tiny")]
    rows = [row for name in first for row in bare(name)]
    rows += [("deepspeed", name, "sparse", "deepspeed", {}) for name in ray_configs]
    rows += [("deepspeed", name, "sparse", "deepspeed-autocast", {}) for name in ray_configs]
    if "cifar10" in ray_configs and not cpu:  # CUDA graphs inside DeepSpeed's step
        rows.append(("deepspeed", "cifar10", "sparse", "deepspeed-cudagraphs", {}))
    rows += [("ray", name, "sparse", "ray-deepspeed", {}) for name in ray_configs]
    rows += [row for name in configs if name not in first for row in bare(name)]
    for name in ("music-1m", "enwik8"):  # what recomputation saves, and costs
        if name in configs:
            rows.append(("bare", name, "sparse", "compiled", {"recompute": "none"}))
    if "cifar10" in configs and not cpu:  # launch-bound: do CUDA graphs pay?
        rows.append(("bare", "cifar10", "sparse", "cudagraphs", {}))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="enwik8,cifar10,music-65k,music-1m")
    p.add_argument("--reps", type=int, default=5, help="timed steps per row (median kept)")
    p.add_argument("--ray-configs", default="enwik8,cifar10", help="'' to skip Ray Train")
    p.add_argument("--ray-steps", type=int, default=60)
    p.add_argument(
        "--zero-stage", type=int, default=1, help="ZeRO stage of the DeepSpeed and Ray rows"
    )
    p.add_argument("--modes", default="", help="only rows of these modes (eager,compiled,...)")
    p.add_argument("--budget-s", type=float, default=500, help="skip rows after this long")
    p.add_argument("--json", default="benchmarks/results/train_step.json")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU, fp32")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_step: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    dtype = torch.float32 if args.cpu_smoke else torch.float16
    configs = ["tiny"] if args.cpu_smoke else args.configs.split(",")
    ray_configs = [c for c in args.ray_configs.split(",") if c]
    if args.cpu_smoke and ray_configs:
        ray_configs = ["tiny"]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "matmul_rate_flops": MATMUL_RATE,
        "rows": [],
    }
    start = time.time()
    jobs = plan(configs, ray_configs, args.cpu_smoke)
    if args.modes:
        jobs = [job for job in jobs if job[3] in args.modes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="st-train-step-"))
    for kind, name, attention, mode, changes in jobs:
        label = f"{name} {attention} {mode} {changes or ''}".strip()
        if time.time() - start > args.budget_s:
            log(f"{label}: skipped (past --budget-s {args.budget_s:g})")
            continue
        log(f"{label} ...")
        try:
            if kind == "bare":
                row = measure(name, attention, mode, device, dtype, args.reps, **changes)
            elif kind == "deepspeed":
                row = measure_deepspeed(name, device, args.reps, args.zero_stage, mode)
            else:
                row = ray_deepspeed(name, args.ray_steps, work, args.cpu_smoke, args.zero_stage)
        except Exception as err:  # noqa: BLE001 - a failed row is a result too
            row = {"config": name, "attention": attention, "mode": mode, "error": repr(err)[:500]}
        log(json.dumps(row))
        out["rows"].append(row)
        out["wall_s"] = round(time.time() - start, 1)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    failed = [r for r in out["rows"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
