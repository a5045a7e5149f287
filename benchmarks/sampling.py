"""Sampling benchmark (issue 16): ms per decoding step and tokens/s, eager vs fast, one GPU.

``generate`` on untrained weights (``init_weights(0)``), fp16, for enwik8 (batch 4,
a 1,024-byte prompt), cifar10 (batch 16, the top half of the image: 1,536 of
3,072) and music-65k (batch 1, a 4,096-sample prompt). One row per path:

- ``eager``: the reference path, ``generate(fast=False)`` (``KVCache``, step by step);
- ``static``, ``graph``, ``compile-blocks``, ``compile``: ``generate(fast=MODE)``, the
  static cache with its step run eagerly, as one CUDA graph of the eager kernels, with
  compiled blocks in one CUDA graph, or compiled whole by ``torch.compile`` in
  ``reduce-overhead`` mode (``model/fast_decode.py``).

A step's time is (T(w + s) - T(w)) / s, with T(k) the wall time of one ``generate``
call of k new tokens (after a first call that compiles or captures, reported as
``setup_s``): the prefill cancels out and what remains is all a step costs, the
host's part included. tokens/s = batch / step. Each fast row says whether its tokens
equal the eager row's for the same seed (``same_tokens``; fp16 kernels fused
differently may round a near tie the other way, so ``first_difference`` says where)
and whether its steps run without a host synchronisation
(``torch.cuda.set_sync_debug_mode("error")``). Per config, the cache's bytes per layer
beside a dense cache's (``model.cache_bytes``).

    python -m sparse_transformer.benchmarks.sampling --json benchmarks/results/sampling.json

The JSON is rewritten after every row; a markdown table is printed at the end.
``--cpu-smoke`` runs the tiny config on the CPU in fp32 (the plumbing; no figures), by
default every path but ``graph`` (CUDA only).
:func:`sampling_check` is the short fast == eager check for ``gpu_check``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparse_transformer.benchmarks import train_step
from sparse_transformer.model import SparseTransformer, generate, load_model_config
from sparse_transformer.model.fast_decode import decoder_for
from sparse_transformer.model.static_cache import cache_bytes

CONFIGS: dict[str, dict[str, int]] = {
    "enwik8": {"batch": 4, "prompt": 1024},
    "cifar10": {"batch": 16, "prompt": 1536},  # the top half of each image
    "music-65k": {"batch": 1, "prompt": 4096},
    "tiny": {"batch": 2, "prompt": 16},  # --cpu-smoke
}
PATHS = ("eager", "static", "graph", "compile-blocks", "compile")
CUDA_ONLY = ("graph",)  # captures a CUDA graph: not among --cpu-smoke's default paths
SAMPLING = {"temperature": 1.0, "top_p": 1.0}


def log(msg: str) -> None:
    print(f"[sampling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(name: str, device: torch.device, dtype: torch.dtype) -> SparseTransformer:
    """The named model with untrained weights (``init_weights(0)``), no dropout, eval mode."""
    return train_step.build(name, "sparse", device, dtype, dropout=0.0).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t = time.perf_counter()
    out = run()
    _sync(device)
    return time.perf_counter() - t, out


def measure(
    model: SparseTransformer, prompt: torch.Tensor, path: str, steps: int, warmup: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """One row's timings and its tokens: (row, tokens of warmup + steps new positions)."""
    device = prompt.device
    fast: bool | str = False if path == "eager" else path

    def run(n: int) -> torch.Tensor:
        return generate(model, prompt, n, **SAMPLING, generator=0, fast=fast)

    setup, _ = _seconds(lambda: run(warmup), device)  # compiles / captures on the first call
    short = statistics.median(_seconds(lambda: run(warmup), device)[0] for _ in range(2))
    long, tokens = _seconds(lambda: run(warmup + steps), device)
    step_s = max(long - short, 1e-9) / steps
    row = {
        "path": path,
        "steps": steps,
        "setup_s": round(setup, 2),
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(prompt.shape[0] / step_s, 1),
    }
    if path != "eager":
        row["sync_free"] = sync_free(model, prompt, path)
        if device.type == "cuda":
            row["profile"] = step_profile(model, prompt, path)
    return row, tokens


def step_profile(
    model: SparseTransformer, prompt: torch.Tensor, mode: str, steps: int = 16
) -> dict:
    """The fast path's step under ``torch.profiler`` (CUDA): kernels per step, their summed
    time, the host's time to issue a step and the wall time per step, the costliest kernels."""
    from sparse_transformer.benchmarks.attention import profile

    decoder = decoder_for(model, prompt.shape[0], mode=mode, **SAMPLING)
    g = torch.Generator(device=prompt.device).manual_seed(0)
    decoder.start(model, prompt, g)
    out = profile(lambda: decoder.advance(model, g), calls=steps)
    out["kernels"] = dict(list(out["kernels"].items())[:24])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def sync_free(
    model: SparseTransformer, prompt: torch.Tensor, mode: str, steps: int = 4, **sampling: float
) -> bool | str | None:
    """Do the fast path's steps run without a host synchronisation? (None off CUDA; the
    error's text when one does.) ``sampling``: temperature, top_p (default ``SAMPLING``)."""
    if prompt.device.type != "cuda":
        return None
    decoder = decoder_for(model, prompt.shape[0], mode=mode, **{**SAMPLING, **sampling})
    g = torch.Generator(device=prompt.device).manual_seed(0)
    decoder.start(model, prompt, g)  # the prefill may synchronise (it is not a step)
    decoder.advance(model, g)  # the first step captures where the mode does
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            decoder.advance(model, g)
    except RuntimeError as err:
        return str(err)[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True


def compare(tokens: torch.Tensor, reference: torch.Tensor, start: int) -> dict[str, Any]:
    """Do two runs' new tokens agree over their common length? Where they first differ."""
    n = min(tokens.shape[1], reference.shape[1])
    differ = (tokens[:, start:n] != reference[:, start:n]).any(0).nonzero()
    first = int(differ[0]) if len(differ) else None
    return {"same_tokens": first is None, "first_difference": first, "compared": n - start}


def cache_rows(name: str, batch: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The static cache per layer against a dense one, layers of one pattern together."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in cache_bytes(load_model_config(name), batch=batch, dtype=dtype):
        key = (r.pattern, r.slots)
        if key not in rows:
            rows[key] = {"config": name, "pattern": r.pattern, "layers": 0, "slots": list(r.slots)}
            rows[key].update(sparse_bytes=r.sparse_bytes, dense_bytes=r.dense_bytes)
        rows[key]["layers"] += 1
    return list(rows.values())


def run_config(name: str, paths: list[str], args: argparse.Namespace, out: dict) -> None:
    """Every path of one config: rows appended to ``out`` (and written) as they finish."""
    device, dtype = _device_dtype(args.cpu_smoke)
    batch, length = CONFIGS[name]["batch"], CONFIGS[name]["prompt"]
    out["cache"] += cache_rows(name, batch, dtype)
    model = build(name, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (batch, length), device=device, generator=g)
    reference = None
    for path in paths:
        if time.time() - out["started"] > args.budget_s:
            log(f"{name} {path}: skipped (past --budget-s {args.budget_s:g})")
            continue
        log(f"{name} {path} ...")
        row: dict[str, Any] = {"config": name, "batch": batch, "prompt": length}
        try:
            steps = args.eager_steps if path == "eager" else args.steps
            timing, tokens = measure(model, prompt, path, steps, args.warmup)
            row.update(timing)
            if path == "eager":
                reference = tokens
            elif reference is not None:
                row.update(compare(tokens, reference, length))
        except Exception as err:  # noqa: BLE001 - a failed row is a result too
            row.update(path=path, error=repr(err)[:500])
        log(json.dumps(row))
        out["rows"].append(row)
        _write(out, args.json)
    del model
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device_dtype(cpu: bool) -> tuple[torch.device, torch.dtype]:
    if cpu:
        return torch.device("cpu"), torch.float32
    return torch.device("cuda", 0), torch.float16


def _write(out: dict, path: str) -> None:
    out["wall_s"] = round(time.time() - out["started"], 1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1))


def markdown(out: dict) -> str:
    """The step table and the cache table."""
    lines = [
        "| config | batch | prompt | path | ms per step | tokens/s | setup s | same tokens "
        "| kernels per step | kernel ms |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['batch']} | {r['prompt']} | {r['path']} | "
                         f"error: {r['error'][:60]} | | | | | |")  # fmt: skip
            continue
        same = "" if r["path"] == "eager" else _same(r)
        prof = r.get("profile") or {}
        count = f"{prof['kernels_per_call']:,.0f}" if prof else ""
        kernel_ms = f"{prof['kernel_ms']:.2f}" if prof else ""
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['prompt']} | {r['path']} | {r['step_ms']:.2f} "
            f"| {r['tokens_per_s']:,.0f} | {r['setup_s']:.1f} | {same} | {count} | {kernel_ms} |"
        )
    lines += [
        "",
        "| config | layers | pattern | slots per head | MB per layer | dense MB | of dense |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for c in out["cache"]:
        slots = "/".join(str(s) for s in sorted(set(c["slots"])))
        lines.append(
            f"| {c['config']} | {c['layers']} | {c['pattern']} | {slots} "
            f"| {c['sparse_bytes'] / 1e6:.2f} | {c['dense_bytes'] / 1e6:.2f} "
            f"| {c['sparse_bytes'] / c['dense_bytes']:.0%} |"
        )
    return "\n".join(lines)


def _same(r: dict) -> str:
    if "same_tokens" not in r:
        return "n/a"
    if r["same_tokens"]:
        return f"yes ({r['compared']})"
    return f"from {r['first_difference']} of {r['compared']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="enwik8,cifar10,music-65k")
    p.add_argument(
        "--paths", default=None, help=f"of {', '.join(PATHS)} (default: all; on the CPU no graph)"
    )
    p.add_argument("--steps", type=int, default=64, help="timed steps of the fast paths")
    p.add_argument("--eager-steps", type=int, default=16, help="timed steps of the eager path")
    p.add_argument("--warmup", type=int, default=4, help="steps in the short (subtracted) call")
    p.add_argument("--budget-s", type=float, default=540, help="skip rows after this long")
    p.add_argument("--json", default="benchmarks/results/sampling.json")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny config on the CPU, fp32")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("sampling: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    if args.paths is None:
        paths = [x for x in PATHS if not (args.cpu_smoke and x in CUDA_ONLY)]
    else:
        paths = [x for x in args.paths.split(",") if x]
    if unknown := [x for x in paths if x not in PATHS]:
        print(f"sampling: unknown paths {unknown}; expected some of {PATHS}", file=sys.stderr)
        return 2
    device, _ = _device_dtype(args.cpu_smoke)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "sampling": SAMPLING,
        "started": time.time(),
        "rows": [],
        "cache": [],
    }
    for name in ["tiny"] if args.cpu_smoke else args.configs.split(","):
        run_config(name, paths, args, out)
    print(markdown(out))
    return 1 if any("error" in r for r in out["rows"]) else 0


# -- the check for gpu_check -----------------------------------------------------------------------


def sampling_check(device: str = "cuda") -> tuple[bool, str]:
    """fp32 on ``device``: every fast mode samples the eager path's tokens for the same
    seed (fixed merged, strided multihead and fixed interleaved, 2 layers), and on CUDA
    its steps do not synchronise with the host. Where the decoding kernel can run
    (``ops.decode``), every mode runs twice: as chosen (these tiny heads read too few rows
    for the kernel) and with the kernel at every layer. Off CUDA only the ``static`` mode
    runs (the CUDA-graph modes need CUDA; tests/test_fast_sampling.py compiles on the CPU)."""
    from sparse_transformer.ops import decode

    if device == "cuda" and not torch.cuda.is_available():
        return False, "no CUDA device"
    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    modes = ("static", "graph", "compile-blocks", "compile") if dev.type == "cuda" else ("static",)
    kernel = decode.uses_kernel(torch.empty(0, device=dev))
    problems, checked = [], 0
    chosen = decode.KERNEL_MIN_ROWS
    try:
        for min_rows in (chosen, 0) if kernel else (chosen,):
            decode.KERNEL_MIN_ROWS = min_rows  # read when a step is traced: new models
            for pattern, mode in _CHECK_PATTERNS:
                found, n = _check_modes(
                    pattern, mode, dev, modes, "kernel " if not min_rows else ""
                )
                problems += found
                checked += n
    finally:
        decode.KERNEL_MIN_ROWS = chosen
    if problems:
        return False, "; ".join(problems)
    synced = "no host sync per step" if dev.type == "cuda" else "syncs not checked off CUDA"
    how = ", as chosen and with the kernel everywhere" if kernel else ""
    return True, f"{checked} fast runs ({', '.join(modes)}{how}): the eager path's tokens; {synced}"


_CHECK_PATTERNS = (("fixed", "merged"), ("strided", "multihead"), ("fixed", "interleaved"))


def _check_modes(
    pattern: str, mode: str, dev: torch.device, modes: tuple[str, ...], label: str
) -> tuple[list[str], int]:
    """One tiny model of the pattern: (problems, fast runs checked) over ``modes``."""
    from sparse_transformer.model import SparseTransformerConfig

    cfg = SparseTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, ff_mult=2, qk_mult=0.5, n_ctx=256,
        pattern=pattern, stride=16, summary=4, head_mode=mode, block_q=16, block_k=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SparseTransformer(cfg).to(dev).eval()
    with torch.no_grad():  # untrained logits are 0: give the output matrix weights
        model.head.weight.normal_(0.0, 0.5)
    g = torch.Generator(device=dev).manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 24), device=dev, generator=g)
    sampling = dict(temperature=1.0, top_p=0.9)
    eager = generate(model, prompt, 64, **sampling, generator=7)
    problems, checked = [], 0
    for fast in modes:
        name = f"{label}{pattern}-{mode} {fast}"
        try:
            tokens = generate(model, prompt, 64, **sampling, generator=7, fast=fast)
            synced = sync_free(model, prompt, fast, **sampling)
        except Exception as err:  # noqa: BLE001 - reported
            problems.append(f"{name}: {err!r}"[:300])
            continue
        checked += 1
        if not torch.equal(tokens, eager):
            problems.append(f"{name}: tokens differ from the eager path's")
        if synced not in (True, None):  # None: not on CUDA, nothing to check
            problems.append(f"{name}: a step synchronises: {synced}")
    return problems, checked


if __name__ == "__main__":
    sys.exit(main())
