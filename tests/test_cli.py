"""The command line: every sub-command answers --help, through both entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sparse_transformer.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_known_subcommands_are_registered() -> None:
    names = _subcommands()
    assert {"bench", "data"} <= set(names), names


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert name in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "sparse-transformer" in proc.stdout


def test_bench_layouts_runs(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "layouts"]) == 0
    out = capsys.readouterr().out
    assert "enwik8" in out and "music-1m" in out


@pytest.mark.parametrize("name", ["enwik8", "cifar10"])
def test_gpu_training_benchmark_overrides_validate(name: str, tmp_path: Path) -> None:
    """The GPU training benchmark's config (fp16, recompute, one GPU worker) passes the
    same validation a launch does, so a GPU session does not fail on a typo."""
    from sparse_transformer.benchmarks.train_gpu import bench_overrides
    from sparse_transformer.distributed.config import deepspeed_config, load_config

    cfg = load_config(name, bench_overrides(name, 300, 8, "file:///data/x", tmp_path, "triton"))
    assert cfg.train.precision == "fp16" and cfg.model.recompute == "block"
    assert cfg.scaling.num_workers == 1 and cfg.model.attention_backend == "triton"
    ds = deepspeed_config(cfg, 1, on_gpu=True)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
