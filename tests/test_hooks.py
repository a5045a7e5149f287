"""The training loop's hooks and the fault injections built on them.

Faults are test machinery: no config field reaches them, a caller installs them with
``run_training(cfg, hooks=[...])``. The runs that use them (recovery, overflow, ZeRO 3,
elastic) are in test_train.py and test_recovery.py; these check the hooks themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_transformer.benchmarks.faults import MARKER, KillAt, OverflowAt
from sparse_transformer.distributed.config import ConfigError, load_config
from sparse_transformer.distributed.hooks import RunInfo, TrainHooks


def info(tmp_path: Path, rank: int = 0) -> RunInfo:
    return RunInfo(rank=rank, world_size=2, local_dir=tmp_path, driver_pid=None)


def test_the_base_hooks_change_nothing(tmp_path: Path) -> None:
    loss = torch.tensor(2.5)
    hooks = TrainHooks()
    hooks.check(1)
    hooks.before_step(info(tmp_path), 0)
    assert hooks.loss(info(tmp_path), 0, loss) is loss


def test_overflow_hits_only_its_step(tmp_path: Path) -> None:
    hook = OverflowAt(3)
    loss = torch.tensor(1.5, requires_grad=True)
    assert torch.equal(hook.loss(info(tmp_path), 2, loss), loss)
    overflowed = hook.loss(info(tmp_path), 3, loss)
    assert torch.isinf(overflowed)
    overflowed.backward()
    assert not torch.isfinite(loss.grad)  # the gradients overflow, as fp16 would


def test_kill_waits_for_its_step_and_rank(tmp_path: Path) -> None:
    hook = KillAt(5, rank=1)
    hook.before_step(info(tmp_path, rank=1), 4)  # another step
    hook.before_step(info(tmp_path, rank=0), 5)  # another rank
    (tmp_path / MARKER).write_text("earlier attempt\n")
    hook.before_step(info(tmp_path, rank=1), 5)  # the marker says it happened already
    assert (tmp_path / MARKER).read_text() == "earlier attempt\n"


def test_kill_exits_the_process_and_leaves_its_marker(tmp_path: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from sparse_transformer.benchmarks.faults import KillAt\n"
        "from sparse_transformer.distributed.hooks import RunInfo\n"
        f"run = RunInfo(rank=1, world_size=2, local_dir=Path({str(tmp_path)!r}), driver_pid=None)\n"
        "KillAt(5, rank=1).before_step(run, 5)\n"
        "print('still alive')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "still alive" not in done.stdout, done.stderr
    assert (tmp_path / MARKER).read_text() == "fault injected at step 5 on rank 1\n"


def test_a_hook_the_run_cannot_honour_fails_before_ray_starts() -> None:
    from sparse_transformer.distributed.trainer import run_training

    cfg = load_config("tiny")  # 2 workers
    with pytest.raises(ConfigError, match=r"KillAt.rank: 5 is not a rank of 2 worker\(s\)"):
        run_training(cfg, verbose=False, hooks=[KillAt(3, rank=5)])


def test_no_config_field_injects_faults() -> None:
    cfg = load_config("tiny")
    fields = [f"{section}.{name}" for section, values in cfg.to_dict().items()
              if isinstance(values, dict) for name in values]  # fmt: skip
    assert not [f for f in fields if "fault" in f], fields
