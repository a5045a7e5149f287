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

It also measures the GPU's dense fp16 matmul rate (8192^3) and the layout
compiler's time at n = 1,048,576.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from sparse_transformer.ops import compile_layout, pattern_for_layer, sparse_attention
from sparse_transformer.ops.layout import BlockLayout

CONFIGS = {
    # name: (kind, mode, heads, d_head, n, l, c, batch, candidate (block_q, block_k))
    "enwik8": ("fixed", "merged", 8, 64, 12288, 128, 32, 4, [(128, 32), (64, 32)]),
    "cifar10": ("strided", "multihead", 2, 128, 3072, 96, 0, 16, [(64, 64), (64, 32), (128, 64)]),
    "imagenet64": ("strided", "multihead", 16, 32, 12288, 128, 0, 4, [(64, 64), (128, 64)]),
    "music-65k": ("strided", "multihead", 2, 64, 65536, 256, 0, 4, [(64, 64), (128, 64)]),
    "music-262k": ("strided", "multihead", 2, 64, 262144, 512, 0, 1, [(64, 64), (128, 64)]),
    "music-1m": ("strided", "multihead", 2, 64, 1048576, 1024, 0, 1, [(64, 64), (128, 64)]),
}
FLEX_BLOCKS = [128, 64, (128, 64)]


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


def run_config(name: str, dtype: torch.dtype, baselines: tuple[str, ...]) -> dict:
    kind, mode, heads, d, n, l, c, batch, blocks = CONFIGS[name]
    pattern = pattern_for_layer(kind, mode=mode, layer=0, n_heads=heads, stride=l, summary=c)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, heads, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)
    )
    for x in (q, k, v):
        x.requires_grad_()
    row: dict = {"config": name, "pattern": pattern.describe(), "batch": batch, "heads": heads}
    row.update({"n": n, "d_head": d, "dtype": str(dtype).replace("torch.", "")})

    best = None
    for bq, bk in blocks:
        layout = compile_layout(pattern, n, heads, bq, bk, device="cuda")
        m = _measure(
            lambda a, b_, c_, lay=layout: sparse_attention(a, b_, c_, lay, backend="triton"),
            q, k, v, dout,
        )  # fmt: skip
        stats = layout.stats()
        flops = 4 * stats["blocks"] * bq * bk * d * batch * heads
        m.update(block=f"{bq}x{bk}", tflops_fwd=flops / m["fwd_ms"] / 1e9)
        m["tflops_fwd_bwd"] = 3.5 * flops / m["fwd_bwd_ms"] / 1e9
        m["density"] = stats["density"]
        m["executed_pairs"] = stats["pairs"]
        log(f"{name} ours {bq}x{bk}: {m['fwd_ms']:.3f} / {m['fwd_bwd_ms']:.3f} ms")
        if best is None or m["fwd_bwd_ms"] < best["fwd_bwd_ms"]:
            best, best_layout = m, layout
    row["ours"] = best
    row["attended_pairs"] = attended_pairs(best_layout)
    row["dense_pairs"] = n * (n + 1) / 2

    from sparse_transformer.ops.flex import compiled_flex_attention, flex_attention_backend

    flex = None
    for bs in FLEX_BLOCKS if "flex" in baselines else ():
        layout = best_layout
        try:
            fn = compiled_flex_attention()

            bm, bn = bs if isinstance(bs, tuple) else (bs, bs)
            opts = None
            if (bm, bn) != (128, 128):  # FlexAttention's kernel tiles must divide the mask's
                opts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_M1": min(bm, bn), "BLOCK_N1": bn}
                opts.update(BLOCK_M2=bm, BLOCK_N2=min(bm, bn))

            def attn(a, b_, c_, lay=layout, bs=bs, fn=fn, opts=opts):
                return flex_attention_backend(
                    a, b_, c_, lay, block_size=bs, kernel=fn, kernel_options=opts
                )

            t = time.perf_counter()
            m = _measure(attn, q, k, v, dout)
            m["block"] = str(bs)
            log(
                f"{name} flex {bs}: {m['fwd_ms']:.3f} / {m['fwd_bwd_ms']:.3f} ms "
                f"(with compile {time.perf_counter() - t:.0f} s)"
            )
        except Exception as exc:  # a block size FlexAttention cannot compile
            row.setdefault("flex_failures", []).append(f"{bs}: {type(exc).__name__}: {exc}"[:300])
            torch.cuda.empty_cache()
            continue
        if flex is None or m["fwd_bwd_ms"] < flex["fwd_bwd_ms"]:
            flex = m
    row["flex"] = flex

    def sdpa(a, b_, c_):
        return torch.nn.functional.scaled_dot_product_attention(a, b_, c_, is_causal=True)

    row["sdpa"] = None
    if "sdpa" in baselines:
        try:
            row["sdpa"] = _measure(sdpa, q, k, v, dout)
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


def markdown(result: dict) -> str:
    """The headline table."""
    lines = [
        f"GPU: {result['gpu']}; dense fp16 matmul {result['matmul_tflops']:.0f} TFLOP/s; "
        f"layout build at n = 1,048,576: {result['layout_build']['seconds'] * 1e3:.0f} ms",
        "",
        "| config | n | B x H x d | ours block | ours fwd / fwd+bwd ms | TFLOP/s fwd+bwd | "
        "flex fwd / fwd+bwd ms | sdpa fwd / fwd+bwd ms | vs flex | vs sdpa | pair ratio | "
        "peak MB ours / flex / sdpa |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(m):
        return f"{m['fwd_ms']:.2f} / {m['fwd_bwd_ms']:.2f}" if m else "n/a"

    def mb(m):
        return f"{m['peak_bytes'] / 2**20:,.0f}" if m else "n/a"

    for r in result["rows"]:
        o, f, s = r["ours"], r.get("flex"), r.get("sdpa")
        vs_flex = f"{f['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x" if f else "n/a"
        vs_sdpa = f"{s['fwd_bwd_ms'] / o['fwd_bwd_ms']:.2f}x" if s else "n/a"
        lines.append(
            f"| {r['config']} | {r['n']:,} | {r['batch']}x{r['heads']}x{r['d_head']} | "
            f"{o['block']} | {ms(o)} | {o['tflops_fwd_bwd']:.0f} | {ms(f)} | {ms(s)} | "
            f"{vs_flex} | {vs_sdpa} | {r['dense_pairs'] / r['attended_pairs']:.1f}x | "
            f"{mb(o)} / {mb(f)} / {mb(s)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--baselines", default="flex,sdpa", help="comma list: flex, sdpa")
    parser.add_argument("--json", help="write the full results as JSON here")
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
    for name in args.configs.split(","):
        row = run_config(name, dtype, tuple(args.baselines.split(",")))
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    if result["rows"]:
        speedups = [
            r["flex"]["fwd_bwd_ms"] / r["ours"]["fwd_bwd_ms"]
            for r in result["rows"]
            if r.get("flex")
        ]
        if speedups:
            result["geomean_vs_flex"] = math.exp(sum(map(math.log, speedups)) / len(speedups))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(markdown(result))
    if "geomean_vs_flex" in result:
        print(f"\ngeometric mean speed-up vs FlexAttention: {result['geomean_vs_flex']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
