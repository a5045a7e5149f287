"""Shared pattern grids for the ops tests."""

from __future__ import annotations

from sparse_transformer.ops import Pattern, pattern_for_layer


def mode_patterns(n_heads: int, stride: int, summary: int) -> list[Pattern]:
    """Every kind x head mode x layer parity, with and without the options."""
    out: list[Pattern] = [Pattern("dense"), Pattern("local", stride=stride + 3)]
    for mode in ("interleaved", "merged", "multihead"):
        for layer in (0, 1):
            out.append(
                pattern_for_layer("strided", mode=mode, layer=layer, n_heads=n_heads, stride=stride)
            )
            out.append(
                pattern_for_layer(
                    "strided", mode=mode, layer=layer, n_heads=n_heads, stride=stride, permute=False
                )
            )
            out.append(
                pattern_for_layer(
                    "fixed", mode=mode, layer=layer, n_heads=n_heads, stride=stride, summary=summary
                )
            )
            out.append(
                pattern_for_layer(
                    "fixed",
                    mode=mode,
                    layer=layer,
                    n_heads=n_heads,
                    stride=stride,
                    summary=summary,
                    distinct_summary=False,
                )
            )
    # dedupe (interleaved/merged give the same pattern for dense/local), keep order
    return list(dict.fromkeys(out))


def pattern_id(p: Pattern) -> str:
    extra = "" if p.permute else "-noperm"
    extra += "" if p.distinct_summary else "-shared"
    return p.describe() + extra
