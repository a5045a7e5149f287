"""A crafted checkpoint cannot run code: eval, sample and a resume refuse it (issue 11).

The folder below is complete by its commit markers, and its DeepSpeed file holds a pickle
that calls ``os.system``. DeepSpeed's loaders (its checkpoint engine, ``zero_to_fp32``)
load with ``weights_only=False``; on the landed code ``eval`` ran the payload. Now every
load goes through PyTorch's restricted unpickler (``checkpoint.weights_only_loads``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sparse_transformer.cli import main
from sparse_transformer.distributed.checkpoint import weights_only_loads
from tests.test_train import local_ray, small_config, small_dataset  # noqa: F401 - fixtures


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(folder: Path, marker: Path, world: int = 1) -> Path:
    (folder / "commit").mkdir(parents=True)
    (folder / "ds").mkdir()
    meta = {"step": 4, "world_size": world, "zero_stage": 0, "model": {}, "data_url": ""}
    (folder / "meta.json").write_text(json.dumps(meta))
    for r in range(world):
        (folder / "commit" / f"rank{r}.json").write_text(json.dumps({"step": 4}))
    torch.save({"module": _Payload(marker)}, folder / "ds" / "mp_rank_00_model_states.pt")
    return folder


def test_the_payload_is_real(tmp_path: Path) -> None:
    """What the tests below guard against: an unrestricted load runs the command."""
    ckpt = crafted_checkpoint(tmp_path / "c", tmp_path / "ran")
    torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_deepspeed_style_loads_are_restricted(tmp_path: Path) -> None:
    import pickle

    ckpt = crafted_checkpoint(tmp_path / "c", tmp_path / "ran")
    original = torch.load
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="posix.system"):
        torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not (tmp_path / "ran").exists()
    assert torch.load is original  # restored on leaving, even after the error


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_eval_and_sample_refuse_a_crafted_checkpoint(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = crafted_checkpoint(tmp_path / "c", tmp_path / "ran")
    assert main([command, "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and str(ckpt) in err, err
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_resume_refuses_a_crafted_checkpoint(
    small_dataset: str,  # noqa: F811
    tmp_path: Path,
    local_ray: None,  # noqa: F811
) -> None:
    from sparse_transformer.distributed.trainer import TrainingError, run_training

    cfg = small_config(tmp_path, small_dataset, "victim", steps=8)
    cfg.run.max_failures = 0
    marker = tmp_path / "ran"
    crafted_checkpoint(tmp_path / "victim" / "checkpoint_crafted", marker, world=2)
    with pytest.raises(TrainingError, match="Weights only load failed"):
        run_training(cfg, verbose=False)
    assert not marker.exists()
