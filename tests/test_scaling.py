"""benchmarks/scaling.py (issue 18): the GPU plan puts the headline runs first, and
``--cpu-smoke`` runs the whole plan on 2 CPU workers through the real trainer: weak
scaling at ZeRO 1 and 2, the loss-curve match against one worker at the same global
batch, and a killed worker's restart plus a relaunch on one worker from the checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sparse_transformer.benchmarks import scaling


def test_the_gpu_plan_measures_the_headline_first_and_each_run_once() -> None:
    specs = scaling.plan(["enwik8"], [1, 2, 3], [1, 2, 4], recovery=True, memory_config="music-65k")
    keys = [s.key for s in specs]
    assert keys[:5] == [
        "scaling/enwik8/z1/n1/b4",
        "scaling/enwik8/z1/n2/b8",
        "scaling/enwik8/z1/n4/b16",
        "loss-n/enwik8/z1/n4/b16",  # enwik8 has dropout: the loss match runs without it
        "loss-ref/enwik8/z1/n1/b16",
    ]
    assert len(keys) == len(set(keys)) == 5 + 6 + 1 + 3
    assert keys[-4:] == ["recovery/enwik8/z1/n4/b16"] + [
        f"scaling/music-65k/z{z}/n4/b4" for z in (1, 2, 3)
    ]


def test_on_one_gpu_recovery_is_planned_only_with_another_relaunch_stage() -> None:
    """One worker cannot relaunch on fewer: a relaunch at another ZeRO stage is what takes
    it through the universal checkpoint there; at the same stage it adds nothing."""
    same = scaling.plan(["enwik8"], [1], [1], recovery=True, relaunch_zero=1)
    assert [s.key for s in same] == ["scaling/enwik8/z1/n1/b4"]
    other = scaling.plan(["enwik8"], [1], [1], recovery=True, relaunch_zero=2)
    assert [s.key for s in other][-1] == "recovery/enwik8/z1/n1/b4/rz2"
    # on several workers the first stage again is the plain plan, keys and all
    plain = scaling.plan(["enwik8"], [1], [1, 4], recovery=True)
    assert scaling.plan(["enwik8"], [1], [1, 4], recovery=True, relaunch_zero=1) == plain
    assert plain[-1].key == "recovery/enwik8/z1/n4/b16"


def test_one_worker_recovery_tells_the_restart_from_the_relaunch() -> None:
    """On one worker every start has world size 1: which fit logged a start tells Ray's
    restart from the relaunch, and only a changed stage makes it universal."""
    spec = scaling.Spec("recovery", "enwik8", 1, 1, 4, relaunch_zero=2)
    first = [{"step": 0, "world_size": 1}, {"step": 10, "world_size": 1}]
    again = [{"step": 20, "world_size": 1}]
    out = scaling.recovery_outcome(spec, first, again)
    assert out["restarted_by_ray"] and out["relaunched"] and out["universal"]
    assert out["resumed_from"] == [10, 20]
    same_stage = dataclasses.replace(spec, relaunch_zero=None)
    assert not scaling.recovery_outcome(same_stage, first, again)["universal"]
    no_restart = scaling.recovery_outcome(spec, first[:1], again)
    assert not no_restart["restarted_by_ray"] and no_restart["relaunched"]
    fresh_relaunch = [{"step": 0, "world_size": 1}]  # started over: no resume
    assert not scaling.recovery_outcome(spec, first, fresh_relaunch)["relaunched"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--relaunch-zero", "2"],  # without --recovery
        ["--recovery", "--relaunch-zero", "0"],  # stage 0 cannot take stage 1-3 state
        ["--recovery", "--zero", "0", "--relaunch-zero", "1"],
    ],
)
def test_a_relaunch_stage_deepspeed_cannot_resume_is_refused_up_front(argv, capsys) -> None:
    with pytest.raises(SystemExit):
        scaling.parse_args(argv)
    assert "error: --relaunch-zero:" in capsys.readouterr().err
    scaling.parse_args(["--recovery", "--relaunch-zero", "2"])  # a stage of 1-3: accepted


@pytest.mark.slow
def test_cpu_smoke_writes_scaling_loss_match_and_recovery(tmp_path: Path) -> None:
    """The smoke run at ZeRO 1 only (docs/scaling.md's command adds ZeRO 2: two more
    Ray Train runs of ~20 s each, which CI's budget does not have room for); its relaunch
    at ZeRO 2 repartitions for another world size and another stage at once."""
    out = tmp_path / "scaling.json"
    argv = ["--cpu-smoke", "--zero", "1", "--relaunch-zero", "2"]
    argv += ["--work", str(tmp_path), "--json", str(out)]
    assert scaling.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["kind"], r["workers"]): r for r in result["rows"]}
    assert set(rows) == {("scaling", 1), ("scaling", 2), ("loss-ref", 1), ("recovery", 2)}
    assert "train.zero_stage=2" in rows["recovery", 2]["relaunch_command"].split()
    assert all(
        r["command"].startswith("sparse-transformer train --config tiny ") for r in rows.values()
    )
    one, two = rows["scaling", 1], rows["scaling", 2]
    assert (one["global_batch"], two["global_batch"]) == (2, 4)  # the same batch per worker
    (eff,) = [e for e in result["efficiency"] if e["workers"] == 2]
    expected = two["tokens_per_second"] / (2 * one["tokens_per_second"])
    assert eff["efficiency"] == pytest.approx(expected, abs=1e-4) and eff["efficiency"] > 0
    (match,) = result["loss_match"]
    assert (match["zero"], match["workers"], match["global_batch"]) == (1, 2, 4)
    assert match["steps_compared"] == [2, 4, 6]
    assert match["max_abs_diff_bits"] < 1e-3  # fp32, the same batches: reduction order only
    (rec,) = result["recovery"]
    assert [(s["step"], s["world_size"]) for s in rec["starts"]] == [(0, 2), (2, 2), (4, 1)]
    assert rec["resumed_from"] == [2, 4] and rec["universal"] and rec["final_step"] == 8
    (memory,) = result["memory"]
    assert (memory["zero"], memory["workers"]) == (1, 2) and memory["peak_memory_bytes"] > 0


def test_a_later_command_without_memory_keeps_the_memory_table(tmp_path: Path) -> None:
    """docs/scaling.md's second command (cifar10, no --memory) merges into the first's JSON:
    the memory table, derived from the merged rows on every save, keeps its config."""
    row = {"key": "scaling/music-65k/z1/n2/b2", "kind": "scaling", "config": "music-65k",
           "zero": 1, "workers": 2, "batch_per_worker": 1, "seq_len": 65536,
           "peak_memory_bytes": 123, "tokens_per_second": 1.0, "steps": 4}  # fmt: skip
    first = scaling.metadata({}, "first", False, "music-65k")
    before = scaling.save(tmp_path / "s.json", [row], first)
    second = scaling.metadata(before, "second", False, None)
    assert second["commands"] == ["first", "second"]
    after = scaling.save(tmp_path / "s.json", [row], second)
    assert [m["peak_memory_bytes"] for m in after["memory"]] == [123]


def test_a_row_counts_as_measured_only_with_this_commands_steps_and_dropout(tmp_path) -> None:
    """The run key names neither the steps nor the dropout: a later command with another
    --steps (or a no-dropout loss-match run) measures again instead of keeping the row."""
    urls = {"enwik8": f"file://{tmp_path}/data"}
    s = scaling.Settings(tmp_path, steps=30, log_every=5, recovery_steps=40, urls=urls)
    spec = scaling.Spec("scaling", "enwik8", 1, 2, 8)
    no_dropout = scaling.Spec("loss-n", "enwik8", 1, 2, 8, dropout=0.0)
    dropout = scaling.config_dropout("enwik8", None)
    assert dropout > 0  # enwik8 trains with dropout: the two specs differ only there
    row = {"steps": 30, "dropout": dropout}
    assert scaling.measured_as_planned(row, spec, s)
    assert not scaling.measured_as_planned({**row, "steps": 20}, spec, s)
    assert not scaling.measured_as_planned(row, no_dropout, s)
    recovery = scaling.Spec("recovery", "enwik8", 1, 2, 8)
    assert scaling.measured_as_planned({**row, "steps": 40}, recovery, s)
