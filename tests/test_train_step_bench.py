"""``benchmarks/train_step.py`` on the CPU (``--cpu-smoke``): every row of the plan runs,
eager and compiled, sparse and dense-SDPA, and the JSON holds the figures the table in
docs/benchmarks.md is made of. The GPU figures come from the same code on the H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._inductor.config

from sparse_transformer.benchmarks import train_step


def test_cpu_smoke_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    # compile for real: no graphs from earlier tests in this process, none from disk
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        argv = ["--cpu-smoke", "--ray-configs", "", "--reps", "1", "--json", str(out)]
        rc = train_step.main(argv)
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["attention"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(a, m) for a in ("sparse", "dense-sdpa") for m in ("eager", "compiled")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["tokens_per_second"] > 0 and row["step_ms"] > 0
        assert row["tokens_per_second"] * row["step_ms"] / 1e3 == pytest.approx(2 * 1024, rel=0.01)
        assert row["params"] == 867_072
    # the compiled row pays its compile in the first step
    assert rows["sparse", "compiled"]["first_step_s"] > rows["sparse", "eager"]["first_step_s"]


def test_the_gpu_plan_puts_the_headline_rows_first() -> None:
    rows = train_step.plan(["enwik8", "cifar10", "music-65k", "music-1m"], ["enwik8"], False)
    assert rows[:4] == [
        ("bare", "enwik8", a, m, {})
        for a in ("sparse", "dense-sdpa")
        for m in ("eager", "compiled")
    ]
    ray = rows.index(("ray", "enwik8", "sparse", "ray-deepspeed", {}))
    assert rows[ray - 2 : ray] == [
        ("deepspeed", "enwik8", "sparse", mode, {}) for mode in ("deepspeed", "deepspeed-autocast")
    ]
    assert ray < min(i for i, r in enumerate(rows) if r[1].startswith("music"))
    assert not any(r[1] == "music-1m" and r[2] == "dense-sdpa" for r in rows)  # n^2 at 1M
    assert rows[-1] == ("bare", "cifar10", "sparse", "cudagraphs", {})
