"""``benchmarks/train_step.py`` on the CPU (``--cpu-smoke``): every row of the plan runs,
eager and compiled, sparse and dense-SDPA, and the JSON holds the figures the table in
docs/benchmarks.md is made of. The GPU figures come from the same code on the H200."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparse_transformer.benchmarks import train_step


def test_cpu_smoke_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "train_step.json"
    rc = train_step.main(["--cpu-smoke", "--ray-configs", "", "--reps", "1", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["attention"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(a, m) for a in ("sparse", "dense-sdpa") for m in ("eager", "compiled")}
    for row in rows.values():
        assert "error" not in row, row
        assert row["tokens_per_second"] > 0 and row["step_ms"] > 0
        assert row["tokens_per_second"] * row["step_ms"] / 1e3 == pytest.approx(2 * 1024, rel=0.01)
        assert row["params"] == 867_072
    # the compiled rows compile inside their timed first step (so first_step_s holds the
    # compile; its length varies with Inductor's on-disk cache, so it is not compared)
    for (_, mode), row in rows.items():
        assert (row["graphs_compiled_first_step"] > 0) == (mode == "compiled"), row


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
