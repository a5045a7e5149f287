"""The GPU attention benchmark's report: goals judged and tables written from its rows.

The measuring itself needs a GPU (``benchmarks/attention.py``); what it makes of the
numbers is checked here on rows shaped as it writes them.
"""

from __future__ import annotations

from sparse_transformer.benchmarks.attention import GOALS, goals, markdown


def _row(config: str, ours: float, flex: float | None, sdpa: float, bwd_over_fwd: float) -> dict:
    def m(fb: float, **extra) -> dict:
        return {"fwd_ms": fb / 3, "fwd_bwd_ms": fb, "peak_bytes": 2**20, **extra}

    profile = {
        "kernels_per_call": 4,
        "kernel_ms": ours * 0.95,
        "host_issue_ms": 0.2,
        "wall_ms": ours,
        "host_share": 0.05,
        "kernels": {"_fwd_kernel": {"count": 1, "ms": ours / 3}},
    }
    return {
        "config": config,
        "n": 4096,
        "batch": 1,
        "heads": 2,
        "d_head": 64,
        "ours": m(
            ours,
            block="64x64",
            bwd_over_fwd=bwd_over_fwd,
            tflops_fwd=400.0,
            tflops_fwd_bwd=300.0,
            profile=profile,
            backward="two-pass",
            by_backward={"two-pass": {"block": "64x64", "fwd_ms": ours / 3, "fwd_bwd_ms": ours}},
        ),
        "flex": m(flex, block="128") if flex else None,
        "sdpa": m(sdpa),
        "attended_pairs": 1000.0,
        "dense_pairs": 8000.0,
    }


def test_goals_name_the_worst_shape_and_judge_each_goal() -> None:
    result = {
        "matmul_tflops": 760.0,
        "rows": [
            _row("enwik8", ours=1.0, flex=3.0, sdpa=2.0, bwd_over_fwd=2.5),
            _row("cifar10", ours=1.0, flex=1.2, sdpa=0.9, bwd_over_fwd=3.4),
            _row("music-65k", ours=1.0, flex=None, sdpa=60.0, bwd_over_fwd=2.0),
        ],
    }
    g = goals(result)
    assert g["vs_flex_min"]["value"] == 1.2 and not g["vs_flex_min"]["met"]
    assert "cifar10" in g["vs_flex_min"]["goal"]
    assert abs(g["vs_flex_geomean"]["value"] - 3.6**0.5) < 1e-12
    assert g["vs_sdpa_enwik8"]["met"] and g["vs_sdpa_music-65k"]["met"]
    assert not g["vs_sdpa_cifar10"]["met"]  # 0.9x of SDPA against a goal of 1.0x
    assert g["bwd_over_fwd"]["value"] == 3.4 and not g["bwd_over_fwd"]["met"]
    assert g["host_share_music_65k"]["met"]
    share = g["enwik8_fwd_share_of_matmul"]
    assert share["value"] == 400 / 760 and share["met"] == (400 / 760 >= 0.5)
    assert set(GOALS["vs_sdpa"]) >= {"enwik8", "cifar10", "music-65k"}


def test_markdown_has_a_row_per_shape_in_each_table() -> None:
    result = {
        "gpu": "test",
        "matmul_tflops": 760.0,
        "layout_build": {"seconds": 0.02},
        "rows": [_row("enwik8", 1.0, 3.0, 2.0, 2.5), _row("cifar10", 1.0, None, 0.9, 3.4)],
    }
    result["goals"] = goals(result)
    text = markdown(result)
    assert text.count("| enwik8 |") == 3 and text.count("| cifar10 |") == 3
    assert "| enwik8 | 1.00 (64x64) | n/a |" in text  # the fused backward was not measured
    assert "3.00x" in text  # enwik8 vs flex
    assert "| n/a |" in text  # cifar10 has no flex number
    assert "**no**" in text  # cifar10 misses the SDPA goal
