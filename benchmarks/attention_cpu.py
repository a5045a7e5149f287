"""CPU time and peak memory of the ``torch`` block-sparse backend vs the dense ``reference``.

Each measurement runs in a fresh subprocess so that its peak resident memory
(``ru_maxrss``, minus the process's footprint before the call) belongs to it
alone; the reference is given an address-space limit and recorded as "OOM" where
it cannot allocate.

    python -m sparse_transformer.benchmarks.attention_cpu [--max-n 65536] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_NS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


def measure_one(backend: str, n: int, heads: int, d: int, stride: int, block: int) -> dict:
    """Time forward and forward+backward once (after a warm-up at small n) in this process."""
    import resource
    import time

    import torch

    from sparse_transformer.ops import compile_layout, pattern_for_layer, sparse_attention

    torch.manual_seed(0)
    pattern = pattern_for_layer("strided", mode="multihead", layer=0, n_heads=heads, stride=stride)
    layout = compile_layout(pattern, n, heads, block, block)
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    with torch.no_grad():
        sparse_attention(q, k, v, layout, backend=backend)
    fwd = time.perf_counter() - t
    t = time.perf_counter()
    out = sparse_attention(q, k, v, layout, backend=backend)
    out.square().sum().backward()
    fwd_bwd = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "backend": backend,
        "n": n,
        "heads": heads,
        "d_head": d,
        "stride": stride,
        "fwd_s": fwd,
        "fwd_bwd_s": fwd_bwd,
        "peak_bytes": peak - base,
        "status": "ok",
    }


def run_isolated(backend: str, n: int, heads: int, d: int, stride: int, block: int, limit: int):
    """:func:`measure_one` in a subprocess with an address-space limit of ``limit`` bytes."""
    code = (
        "import json, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
        "from sparse_transformer.benchmarks.attention_cpu import measure_one\n"
        f"print(json.dumps(measure_one({backend!r}, {n}, {heads}, {d}, {stride}, {block})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    if proc.returncode != 0:
        oom = "memory" in proc.stderr.lower() or "alloc" in proc.stderr.lower()
        return {
            "backend": backend,
            "n": n,
            "status": "OOM" if oom else "error",
            "detail": proc.stderr.strip().splitlines()[-1:] or [""],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-n", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--limit-gb", type=float, default=16.0, help="address-space cap per run")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    limit = int(args.limit_gb * 2**30)
    print("| n | stride | backend | fwd s | fwd+bwd s | peak MB |")
    print("|---:|---:|---|---:|---:|---:|")
    for n in (x for x in DEFAULT_NS if x <= args.max_n):
        stride = 256 if n == 65536 else max(16, int(round(n**0.5)))
        reference_failed = any(r["backend"] == "reference" and r["status"] != "ok" for r in rows)
        for backend in ("torch", "reference"):
            if backend == "reference" and reference_failed:
                row = {"backend": backend, "n": n, "status": "OOM (skipped: smaller n failed)"}
            else:
                row = run_isolated(backend, n, args.heads, args.d_head, stride, args.block, limit)
            row["stride"] = stride
            rows.append(row)
            if row["status"] == "ok":
                print(
                    f"| {n:,} | {stride} | {backend} | {row['fwd_s']:.3f} | "
                    f"{row['fwd_bwd_s']:.3f} | {row['peak_bytes'] / 2**20:,.0f} |",
                    flush=True,
                )
            else:
                print(f"| {n:,} | {stride} | {backend} | {row['status']} | | |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
