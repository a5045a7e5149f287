"""Density table of the paper's attention layouts (no timing: pure counting).

For each configuration of the paper, how many blocks a kernel visits relative
to dense causal attention at the same block sizes, with and without the
transposed order for strided A2 heads.

    python -m sparse_transformer.benchmarks.layouts [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time

from sparse_transformer.ops import compile_layout, pattern_for_layer

# name, kind, mode, heads, n, l, c, block_q, block_k
PAPER_LAYOUTS = [
    ("cifar10", "strided", "multihead", 2, 3072, 96, 0, 64, 64),
    ("enwik8", "fixed", "merged", 8, 12288, 128, 32, 128, 32),
    ("enwik8 (64x64 blocks)", "fixed", "merged", 8, 12288, 128, 32, 64, 64),
    ("imagenet64", "strided", "multihead", 16, 12288, 128, 0, 64, 64),
    ("music-65k", "strided", "multihead", 2, 65536, 256, 0, 64, 64),
    ("music-262k", "strided", "multihead", 2, 262144, 512, 0, 64, 64),
    ("music-1m", "strided", "multihead", 2, 1048576, 1024, 0, 64, 64),
]


def density_table() -> list[dict]:
    """One row per paper configuration."""
    rows = []
    for name, kind, mode, heads, n, l, c, bq, bk in PAPER_LAYOUTS:
        pattern = pattern_for_layer(kind, mode=mode, layer=0, n_heads=heads, stride=l, summary=c)
        t = time.perf_counter()
        layout = compile_layout(pattern, n, heads, bq, bk)
        build_s = time.perf_counter() - t
        stats = layout.stats()
        rows.append(
            {
                "config": name,
                "pattern": pattern.describe(),
                "n": n,
                "block_q": bq,
                "block_k": bk,
                "blocks_per_head": stats["blocks"],
                "full_fraction": stats["full_blocks"] / stats["blocks"],
                "density": stats["density"],
                "density_unpermuted": layout.density_unpermuted(),
                "build_s_cpu": build_s,
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """The table as Markdown."""
    out = [
        "| config | pattern | n | blocks (q x k) | density | without permutation | full blocks |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['config']} | {r['pattern']} | {r['n']:,} | {r['block_q']}x{r['block_k']} | "
            f"{r['density']:.2%} | {r['density_unpermuted']:.2%} | {r['full_fraction']:.0%} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = density_table()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
