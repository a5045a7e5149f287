"""GPU benchmark: our Triton block-sparse kernels vs FlexAttention vs dense causal SDPA.

One command, one GPU, every baseline in the same run:

    python -m sparse_transformer.benchmarks.attention [--configs enwik8,cifar10] [--json PATH]

For each of the paper's shapes it times forward and forward+backward (median of
CUDA-event timings), reports TFLOP/s on the executed blocks and the peak memory
of the forward+backward, for:

- ``ours``: the ``triton`` backend, at each candidate block shape (best kept);
- ``flex``: FlexAttention, compiled, fed the same mask_mod and the same
  transposed order for strided A2 heads, at each block size that compiles (best kept);
- ``sdpa``: dense causal ``scaled_dot_product_attention`` (FlashAttention / cuDNN).

Per shape it also profiles ours (``torch.profiler``): the kernels of one
forward+backward by name, their count, their summed time, the host's time to issue
them and the wall time per call when calls follow each other, so the host time the
GPU waits on shows as wall minus kernel time. It measures the GPU's dense fp16
matmul rate (8192^3) and the layout compiler's time at n = 1,048,576, and checks
the goals of issue 14 (``goals``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from sparse_transformer.ops import compile_layout, pattern_for_layer, sparse_attention
from sparse_transformer.ops.layout import BlockLayout

CONFIGS = {
    # name: (kind, mode, heads, d_head, n, l, c, batch, candidate (block_q, block_k))
    "enwik8": ("fixed", "merged", 8, 64, 12288, 128, 32, 4, [(64, 32)]),
    "cifar10": ("strided", "multihead", 2, 128, 3072, 96, 0, 16, [(64, 32), (64, 64)]),
    "imagenet64": ("strided", "multihead", 16, 32, 12288, 128, 0, 4, [(64, 64)]),
    "music-65k": ("strided", "multihead", 2, 64, 65536, 256, 0, 4, [(64, 64)]),
    "music-262k": ("strided", "multihead", 2, 64, 262144, 512, 0, 1, [(64, 64)]),
    "music-1m": ("strided", "multihead", 2, 64, 1048576, 1024, 0, 1, [(64, 64)]),
}
"""Block shapes: the ones that won earlier runs (64x32 for enwik8's 32-wide summaries,
64x64 elsewhere; 128-row query blocks and 128x64 never won and cost compile time:
enwik8 at 128x32 took 3.13 ms against 2.67 at 64x32, ``results/attention_h200.log``)."""
BACKWARDS = ("two-pass", "fused")
"""Our two backwards (``triton_attention.BACKWARD``): dQ in its own kernel
(deterministic), or added by the dK/dV kernel with atomics."""
FLEX_VARIANTS = [(128, None), (128, {"BACKEND": "FLASH"})]
"""FlexAttention's block sizes and kernel options tried (the best kept): its Triton
template at 128, its default (blocks under 128 do not compile at these head sizes;
(128, 64) never won), and its CuTe-DSL flash backend where the GPU image has it.
``--flex-tma`` adds the Triton template with Hopper's tensor-memory loads (a compile
of its own per shape)."""
GOALS = {
    "vs_flex_min": 1.5,
    "vs_flex_geomean": 2.0,
    "bwd_over_fwd_max": 3.0,
    "host_share_max": 0.10,
    "enwik8_fwd_share_of_matmul": 0.5,
    "vs_sdpa": {"cifar10": 1.0, "enwik8": 1.95, "music-65k": 50.0, "music-262k": 170.0},
}
"""Issue 14's goals, checked by ``goals``."""


def bench(fn, min_time: float = 0.25, max_reps: int = 50) -> float:
    """Median seconds of ``fn()`` over CUDA-event-timed repetitions."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t
    reps = int(max(3, min(max_reps, min_time / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory(fn) -> int:
    """Peak bytes allocated by ``fn()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def attended_pairs(layout: BlockLayout) -> float:
    """Exact number of (query, key) pairs the pattern allows, averaged over heads:
    full blocks count whole, partial blocks are evaluated element by element."""
    total = 0
    dev = layout.device
    bq, bk = layout.block_q, layout.block_k
    for h in range(layout.n_heads):
        g = int(layout.head_group[h])
        lo, hi = int(layout.q2k_indptr[g, 0]), int(layout.q2k_indptr[g, -1])
        counts = (layout.q2k_indptr[g, 1:] - layout.q2k_indptr[g, :-1]).long()
        qb = torch.repeat_interleave(torch.arange(layout.n_qblocks, device=dev), counts)
        kb = layout.q2k_index[lo:hi].long()
        full = layout.q2k_full[lo:hi]
        order = layout.order(g)
        n = layout.n
        # full blocks: all pairs are real only where both positions are real
        qv = (order < n).view(-1, bq).sum(1)
        kv = (order < n).view(-1, bk).sum(1)
        total += int((qv[qb[full]] * kv[kb[full]]).sum())
        pq, pk = qb[~full], kb[~full]
        ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
        hh = torch.tensor(h, device=dev)
        zero = torch.zeros((), dtype=torch.long, device=dev)
        step = max(1, (1 << 24) // (bq * bk))
        for s in range(0, pq.numel(), step):
            i = order[(pq[s : s + step, None] * bq + ar_q)][:, :, None]
            j = order[(pk[s : s + step, None] * bk + ar_k)][:, None, :]
            m = layout.pattern.mask_mod(zero, hh, i, j) & (i < n) & (j < n)
            total += int(m.sum())
    return total / layout.n_heads


def matmul_rate() -> float:
    """Measured dense fp16 matmul TFLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t = bench(lambda: a @ b)
    return 2 * 8192**3 / t / 1e12


def _fwd_bwd(attn, q, k, v, dout):
    def run():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    return run


def _measure(attn, q, k, v, dout) -> dict:
    with torch.no_grad():
        fwd = bench(lambda: attn(q, k, v))
    fb = _fwd_bwd(attn, q, k, v, dout)
    fwd_bwd = bench(fb)
    return {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": fwd_bwd * 1e3, "peak_bytes": peak_memory(fb)}


def log(msg: str) -> None:
    """Progress on stderr, so a run cut short still shows where it was."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def profile(fn, calls: int = 20) -> dict:
    """One ``fn()`` (a forward+backward) seen by ``torch.profiler``, over ``calls``
    back-to-back calls: the GPU kernels per call by name (count and ms), their summed
    time, the host's time to issue a call and the wall time per call. Wall minus kernel
    time is time the GPU sat idle waiting on the host (``host_share`` of the wall)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        end = time.perf_counter()
    kernels: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.device_time > 0:
            kernels.setdefault(evt.name, []).append(evt.device_time / 1e3)  # ms
    by_name = {
        name[:60]: {"count": len(ts) / calls, "ms": sum(ts) / calls}
        for name, ts in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))
    }
    kernel_ms = sum(v["ms"] for v in by_name.values())
    wall_ms = (end - start) * 1e3 / calls
    return {
        "calls": calls,
        "kernels_per_call": sum(v["count"] for v in by_name.values()),
        "kernel_ms": kernel_ms,
        "host_issue_ms": (issued - start) * 1e3 / calls,
        "wall_ms": wall_ms,
        "host_share": max(0.0, 1.0 - kernel_ms / wall_ms),
        "kernels": by_name,
        "note": "times under the profiler, which adds host time of its own",
    }


def measure_ours(name: str, q, k, v, dout) -> tuple[dict, BlockLayout]:
    """Our kernels at each candidate block shape with the two-pass backward, then with
    the fused one (``BACKWARDS``) at the best of those shapes; the fastest
    forward+backward kept, with its profile and the launch configurations the autotuner
    chose, and the best of each backward beside it."""
    from sparse_transformer.ops import triton_attention

    kind, mode, heads, d, n, l, c, batch, blocks = CONFIGS[name]
    pattern = pattern_for_layer(kind, mode=mode, layer=0, n_heads=heads, stride=l, summary=c)
    layouts = {b: compile_layout(pattern, n, heads, *b, device="cuda") for b in blocks}
    runs, found = {}, triton_attention.BACKWARD
    try:
        for backward in BACKWARDS:
            triton_attention.BACKWARD = backward
            shapes = blocks if backward == BACKWARDS[0] else [_best(runs)["shape"]]
            for shape in shapes:
                runs[shape, backward] = _measure_layout(
                    name, layouts[shape], backward, q, k, v, dout
                )
        best = _best(runs)
        triton_attention.BACKWARD = best["backward"]
        attn = _ours(layouts[best["shape"]])
        best["profile"] = profile(_fwd_bwd(attn, q, k, v, dout))
    finally:
        triton_attention.BACKWARD = found  # what the caller had set
    best["by_backward"] = {
        backward: {key: _best(m)[key] for key in ("block", "fwd_ms", "fwd_bwd_ms")}
        for backward in BACKWARDS
        if (m := {key: r for key, r in runs.items() if key[1] == backward})
    }
    best["autotuned"] = triton_attention.autotuned_configs()
    return best, layouts[best["shape"]]


def _best(runs: dict) -> dict:
    """The run with the fastest forward+backward."""
    return min(runs.values(), key=lambda m: m["fwd_bwd_ms"])


def _ours(layout: BlockLayout):
    def attn(a, b_, c_):
        return sparse_attention(a, b_, c_, layout, backend="triton")

    return attn


def _measure_layout(name: str, layout: BlockLayout, backward: str, q, k, v, dout) -> dict:
    """One block shape and backward: times, TFLOP/s on the executed blocks, density."""
    batch, heads, _, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    m = _measure(_ours(layout), q, k, v, dout)
    stats = layout.stats()
    flops = 4 * stats["blocks"] * bq * bk * d * batch * heads
    m.update(block=f"{bq}x{bk}", shape=(bq, bk), backward=backward)
    m.update(
        tflops_fwd=flops / m["fwd_ms"] / 1e9, tflops_fwd_bwd=3.5 * flops / m["fwd_bwd_ms"] / 1e9
    )
    m["bwd_over_fwd"] = (m["fwd_bwd_ms"] - m["fwd_ms"]) / m["fwd_ms"]
    m["density"] = stats["density"]
    m["executed_pairs"] = stats["pairs"]
    log(f"{name} ours {bq}x{bk} {backward}: {m['fwd_ms']:.3f} / {m['fwd_bwd_ms']:.3f} ms")
    return m


def _flex_attn(layout: BlockLayout, block, options):
    from sparse_transformer.ops.flex import compiled_flex_attention, flex_attention_backend

    fn = compiled_flex_attention()

    def attn(a, b_, c_):
        return flex_attention_backend(
            a, b_, c_, layout, block_size=block, kernel=fn, kernel_options=options
        )

    return attn


def measure_flex(
    name: str, layout: BlockLayout, q, k, v, dout, row: dict, variants: list
) -> dict | None:
    """FlexAttention, compiled, at each of ``variants`` that compiles; the best kept."""
    best = None
    for block, options in variants:
        label = f"{block} {options or ''}".strip()
        try:
            t = time.perf_counter()
            m = _measure(_flex_attn(layout, block, options), q, k, v, dout)
        except Exception as exc:  # a variant FlexAttention cannot compile here
            failure = f"{label}: {type(exc).__name__}: {exc}"
            row.setdefault("flex_failures", []).append(failure[:300])
            log(f"{name} flex {label}: failed ({type(exc).__name__})")
            torch.cuda.empty_cache()
            continue
        m["block"] = label
        log(
            f"{name} flex {label}: {m['fwd_ms']:.3f} / {m['fwd_bwd_ms']:.3f} ms "
            f"(with compile {time.perf_counter() - t:.0f} s)"
        )
        if best is None or m["fwd_bwd_ms"] < best["fwd_bwd_ms"]:
            best = m
    return best


def _sdpa(a, b_, c_):
    return torch.nn.functional.scaled_dot_product_attention(a, b_, c_, is_causal=True)


def run_config(
    name: str, dtype: torch.dtype, baselines: tuple[str, ...], flex_variants: list
) -> dict:
    kind, mode, heads, d, n, l, c, batch, _ = CONFIGS[name]
    pattern = pattern_for_layer(kind, mode=mode, layer=0, n_heads=heads, stride=l, summary=c)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)
    )
    for x in (q, k, v):
        x.requires_grad_()
    row: dict = {"config": name, "pattern": pattern.describe(), "batch": batch, "heads": heads}
    row.update({"n": n, "d_head": d, "dtype": str(dtype).replace("torch.", "")})
    row["ours"], layout = measure_ours(name, q, k, v, dout)
    row["attended_pairs"] = attended_pairs(layout)
    row["dense_pairs"] = n * (n + 1) / 2
    row["flex"] = None
    if "flex" in baselines:
        row["flex"] = measure_flex(name, layout, q, k, v, dout, row, flex_variants)
    row["sdpa"] = None
    if "sdpa" in baselines:
        try:
            row["sdpa"] = _measure(_sdpa, q, k, v, dout)
            log(f"{name} sdpa: {row['sdpa']['fwd_ms']:.3f} / {row['sdpa']['fwd_bwd_ms']:.3f} ms")
        except torch.OutOfMemoryError as exc:
            row["sdpa_failure"] = str(exc)[:200]
    torch.cuda.empty_cache()
    return row


def layout_build_time() -> dict:
    """Seconds to compile the music-1m layout on the GPU (cache bypassed)."""
    from sparse_transformer.ops.layout import _build

    pattern = pattern_for_layer("strided", mode="multihead", layer=0, n_heads=2, stride=1024)
    dev = torch.device("cuda", torch.cuda.current_device())
    _build(pattern, 4096, 2, 64, 64, dev)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    _build(pattern, 1 << 20, 2, 64, 64, dev)
    torch.cuda.synchronize()
    return {"n": 1 << 20, "block": "64x64", "seconds": time.perf_counter() - t}


def _goal(text: str, value: float, met: bool) -> dict:
    return {"goal": text, "value": value, "met": met}


def goals(result: dict) -> dict[str, dict]:
    """Issue 14's goals against one run's rows: each with its value and whether met."""
    rows = {r["config"]: r for r in result["rows"]}
    out = {}
    vs_flex = {
        name: r["flex"]["fwd_bwd_ms"] / r["ours"]["fwd_bwd_ms"]
        for name, r in rows.items()
        if r.get("flex")
    }
    if vs_flex:
        worst = min(vs_flex, key=vs_flex.get)
        text = f">= {GOALS['vs_flex_min']}x FlexAttention on every shape (worst: {worst})"
        out["vs_flex_min"] = _goal(text, vs_flex[worst], vs_flex[worst] >= GOALS["vs_flex_min"])
        geo = math.exp(sum(map(math.log, vs_flex.values())) / len(vs_flex))
        text = f"geometric mean >= {GOALS['vs_flex_geomean']}x FlexAttention"
        out["vs_flex_geomean"] = _goal(text, geo, geo >= GOALS["vs_flex_geomean"])
    for name, want in GOALS["vs_sdpa"].items():
        r = rows.get(name)
        if r and r.get("sdpa"):
            got = r["sdpa"]["fwd_bwd_ms"] / r["ours"]["fwd_bwd_ms"]
            out[f"vs_sdpa_{name}"] = _goal(f"{name}: >= {want}x dense SDPA", got, got >= want)
    if rows:
        ratios = {name: r["ours"]["bwd_over_fwd"] for name, r in rows.items()}
        worst = max(ratios, key=ratios.get)
        want = GOALS["bwd_over_fwd_max"]
        text = f"backward <= {want}x forward on every shape (worst: {worst})"
        out["bwd_over_fwd"] = _goal(text, ratios[worst], ratios[worst] <= want)
    if "music-65k" in rows:
        share = rows["music-65k"]["ours"]["profile"]["host_share"]
        want = GOALS["host_share_max"]
        text = f"music-65k: host time < {want:.0%} of a forward+backward's wall time"
        out["host_share_music_65k"] = _goal(text, share, share < want)
    if "enwik8" in rows:
        share = rows["enwik8"]["ours"]["tflops_fwd"] / result["matmul_tflops"]
        want = GOALS["enwik8_fwd_share_of_matmul"]
        text = f"enwik8 forward: executed blocks at >= {want:.0%} of the dense matmul rate"
        out["enwik8_fwd_share_of_matmul"] = _goal(text, share, share >= want)
    return out


def _ms(m: dict | None) -> str:
    return f"{m['fwd_ms']:.2f} / {m['fwd_bwd_ms']:.2f}" if m else "n/a"


def _mb(m: dict | None) -> str:
    return f"{m['peak_bytes'] / 2**20:,.0f}" if m else "n/a"


def markdown(result: dict) -> str:
    """The headline table, the profile table and the goals."""
    lines = [
        f"GPU: {result['gpu']}; dense fp16 matmul {result['matmul_tflops']:.0f} TFLOP/s; "
        f"layout build at n = 1,048,576: {result['layout_build']['seconds'] * 1e3:.0f} ms",
        "",
        "| config | n | B x H x d | ours block | ours fwd / fwd+bwd ms | bwd / fwd | "
        "TFLOP/s fwd / fwd+bwd | flex fwd / fwd+bwd ms (variant) | sdpa fwd / fwd+bwd ms | "
        "vs flex | vs sdpa | pair ratio | peak MB ours / flex / sdpa |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        o, f, s = r["ours"], r.get("flex"), r.get("sdpa")
        vs_flex = f"{f['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x" if f else "n/a"
        vs_sdpa = f"{s['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x" if s else "n/a"
        flex = f"{_ms(f)} ({f['block']})" if f else "n/a"
        lines.append(
            f"| {r['config']} | {r['n']:,} | {r['batch']}x{r['heads']}x{r['d_head']} | "
            f"{o['block']} {o.get('backward', '')} | {_ms(o)} | {o['bwd_over_fwd']:.2f} | "
            f"{o['tflops_fwd']:.0f} / {o['tflops_fwd_bwd']:.0f} | {flex} | {_ms(s)} | "
            f"{vs_flex} | {vs_sdpa} | {r['dense_pairs'] / r['attended_pairs']:.1f}x | "
            f"{_mb(o)} / {_mb(f)} / {_mb(s)} |"
        )
    lines += [
        "",
        "| config | kernels per fwd+bwd | kernel ms | host issue ms | wall ms | host share "
        "| costliest kernels (ms) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        p = r["ours"]["profile"]
        top = ", ".join(f"{k} {v['ms']:.3f}" for k, v in list(p["kernels"].items())[:4])
        lines.append(
            f"| {r['config']} | {p['kernels_per_call']:.0f} | {p['kernel_ms']:.3f} | "
            f"{p['host_issue_ms']:.3f} | {p['wall_ms']:.3f} | {p['host_share']:.0%} | {top} |"
        )
    lines += ["", "| config | " + " | ".join(f"{b} fwd+bwd ms (block)" for b in BACKWARDS) + " |"]
    lines.append("|---|" + "---:|" * len(BACKWARDS))
    for r in result["rows"]:
        by = r["ours"].get("by_backward", {})
        cells = [
            f"{by[b]['fwd_bwd_ms']:.2f} ({by[b]['block']})" if b in by else "n/a" for b in BACKWARDS
        ]
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    lines += ["", "| goal | value | met |", "|---|---:|---|"]
    for g in result.get("goals", {}).values():
        lines.append(f"| {g['goal']} | {g['value']:.3g} | {'yes' if g['met'] else '**no**'} |")
    return "\n".join(lines)


def _resumed(path: str | None, result: dict) -> dict[str, dict]:
    """Rows of an earlier, interrupted run of this command on the same GPU and torch."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    if (earlier["gpu"], earlier["torch"]) != (result["gpu"], result["torch"]):
        raise SystemExit(f"--resume: {path} was measured on another GPU or torch")
    result["resumed_from"] = earlier["command"]
    log(f"resuming: {[r['config'] for r in earlier['rows']]} kept from {path}")
    return {r["config"]: r for r in earlier["rows"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--baselines", default="flex,sdpa", help="comma list: flex, sdpa")
    parser.add_argument("--json", help="write the full results as JSON here")
    parser.add_argument(
        "--flex-tma", action="store_true", help="also try FlexAttention with USE_TMA"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --json (same GPU and torch) and measure the rest",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/attention.py needs a CUDA GPU (see attention_cpu.py)")
    dtype = getattr(torch, args.dtype)
    # every (block size, shape, grad mode) is its own FlexAttention graph
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    result = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(
            ["python -m sparse_transformer.benchmarks.attention", *(argv or sys.argv[1:])]
        ),
        "matmul_tflops": matmul_rate(),
        "layout_build": layout_build_time(),
        "rows": [],
    }
    log(f"matmul {result['matmul_tflops']:.0f} TFLOP/s, layout {result['layout_build']}")
    done = _resumed(args.json, result) if args.resume else {}
    flex_variants = FLEX_VARIANTS + ([(128, {"USE_TMA": True})] if args.flex_tma else [])
    for name in args.configs.split(","):
        if name in done:
            result["rows"].append(done[name])
            continue
        row = run_config(name, dtype, tuple(args.baselines.split(",")), flex_variants)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    result["goals"] = goals(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
