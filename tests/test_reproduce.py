"""benchmarks/reproduce.py (issue 17): the scaled config pairs differ only in their
attention, and ``--cpu-smoke`` trains arms through the real trainer, sweeps the
evaluation context, writes the JSON and draws PNGs that decode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparse_transformer.benchmarks import reproduce
from sparse_transformer.distributed.config import load_config
from sparse_transformer.model import SparseTransformer

PAIRS = [
    ("scaled-text-fixed", "scaled-text-dense"),
    ("scaled-fmnist-strided", "scaled-fmnist-dense"),
]


@pytest.mark.parametrize(("sparse", "dense"), PAIRS)
def test_each_pair_differs_only_in_its_attention(sparse: str, dense: str) -> None:
    a, b = load_config(sparse), load_config(dense)
    assert (a.model.pattern, b.model.pattern) in {("fixed", "dense"), ("strided", "dense")}
    assert b.model.attention_backend == "sdpa"  # the strongest dense kernel
    attention = {"pattern": "dense", "attention_backend": "sdpa"}
    assert a.model.replace(**attention) == b.model
    assert (a.data, a.train, a.scaling) == (b.data, b.train, b.scaling)  # seed, steps, batch
    with torch.device("meta"):
        assert SparseTransformer(a.model).num_params() == SparseTransformer(b.model).num_params()


def test_text_pair_matches_the_issue_and_the_paper_context() -> None:
    m = load_config("scaled-text-fixed").model
    assert 8 <= m.n_layers <= 12 and 256 <= m.d_model <= 512 and m.n_ctx == 12288
    contexts = reproduce.min_contexts(m.n_ctx, m.stride)
    assert contexts == [6144, 9216, 10752, 11904, 12096, 12160]  # table 3's, at n = 12,288


def test_curves_put_each_window_on_the_training_clock() -> None:
    history = [
        {"step": 2, "loss_bits": 7.0, "tokens_per_second": 100.0},
        {"step": 4, "loss_bits": 6.0, "tokens_per_second": 200.0, "val_loss_bits": 6.5},
        {"step": 4, "attention_launch_configs": {}},
    ]
    c = reproduce.curves(history, tokens_per_step=50)
    assert [w["train_s"] for w in c["train"]] == [1.0, 1.5]
    assert [w["step_s"] for w in c["train"]] == [0.5, 0.25]
    assert c["validation"] == [{"step": 4, "val_loss_bits": 6.5, "train_s": 1.5}]


@pytest.mark.slow
def test_cpu_smoke_writes_the_json_tables_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "reproduce.json"
    # every code path, with three of the four arms (each costs CI ~25 s of Ray Train's
    # start and stop): the image arm's data and pattern, and SDPA through the dense text arm
    steps = "text-fixed,text-dense,image-strided,sweep"
    argv = ["--cpu-smoke", "--steps", steps, "--json", str(out), "--plots-dir", str(tmp_path)]
    assert reproduce.main(argv) == 0
    results = json.loads(out.read_text())
    assert results["smoke"] is True and set(results["runs"]) == set(steps.split(",")[:3])
    for pair, arms_run in (("text", {"sparse", "dense"}), ("image", {"sparse"})):
        arms = [r for r in results["runs"].values() if r["pair"] == pair]
        assert {r["arm"] for r in arms} == arms_run
        assert len({(r["steps"], r["seed"], r["global_batch"], r["params"]) for r in arms}) == 1
        for r in arms:
            assert [w["step"] for w in r["train"]] == [1, 2, 3, 4]
            assert [v["step"] for v in r["validation"]] == [2, 4]
            clock = [w["train_s"] for w in r["train"]]
            assert clock == sorted(clock) and r["step_s"] > 0
            assert 0 < r["final_val_bits"] < 8.5 and r["checkpoint"]
    assert {r["attention_backend"] for r in results["runs"].values()} >= {"sdpa"}
    for name in reproduce.SWEEP_RUNS:
        sweep = results["context_sweep"][name]
        assert [row["min_context"] for row in sweep["rows"]] == [128, 192, 208, 224, 232, 240]
        assert {row["tokens"] for row in sweep["rows"]} == {512}  # the same bytes each time
        assert all(math.isfinite(row["bits"]) for row in sweep["rows"])
    for png in ("reproduce_text.png", "reproduce_image.png", "reproduce_context.png"):
        with Image.open(tmp_path / png) as image:
            image.load()
            assert image.format == "PNG" and image.width > 300
    printed = capsys.readouterr().out
    assert "Table 2" in printed and "| text | sparse / dense |" in printed
    assert "Table 3" in printed and "| 240 |" in printed


def test_the_sweep_needs_a_trained_text_model_here(tmp_path: Path) -> None:
    results: dict = {"context_sweep": {"text-dense": {"rows": []}}}
    with pytest.raises(SystemExit, match="no trained text model"):
        reproduce.sweep_all(tmp_path, "file:///nowhere", results, tmp_path / "r.json", True, None)
    assert results["context_sweep"] == {"text-dense": {"rows": []}}  # what was there stays


def test_a_later_command_merges_into_real_runs_but_a_smoke_run_starts_afresh(
    tmp_path: Path,
) -> None:
    path = tmp_path / "reproduce.json"
    real = reproduce.load_results(path, smoke=False)
    real["runs"]["text-fixed"] = {"final_val_bits": 2.0}
    path.write_text(json.dumps(real))
    assert reproduce.load_results(path, smoke=False)["runs"] == {
        "text-fixed": {"final_val_bits": 2.0}
    }
    assert reproduce.load_results(path, smoke=True)["runs"] == {}
