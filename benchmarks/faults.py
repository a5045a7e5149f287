"""Fault injection for the recovery tests and ``gpu_check``: :class:`TrainHooks` that
kill a worker (or the driver) at a step, or make a step's gradients overflow.

They are installed by the caller of ``run_training(cfg, hooks=[...])``, never by a
config: a worker that kills itself is test machinery, not a training option.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

import torch

from sparse_transformer.distributed.hooks import RunInfo, TrainHooks

#: Written into the run's local folder by :class:`KillAt` before it kills.
MARKER = ".fault-injected"


@dataclass(frozen=True)
class KillAt(TrainHooks):
    """Rank ``rank`` dies before step ``step`` (0-based), once per run folder.

    ``target="worker"``: the worker process exits (Ray Train restarts the group).
    ``target="driver"``: the driver is SIGKILLed (the local Ray instance goes with it;
    a relaunch resumes). The marker file makes a restarted group run on; a second
    ``KillAt`` with another ``marker`` kills the same run once more (the scaling
    benchmark's recovery: a restart, then a relaunch on fewer workers).
    """

    step: int
    rank: int = 1
    target: Literal["worker", "driver"] = "worker"
    marker: str = MARKER

    def check(self, world_size: int) -> None:
        if not 0 <= self.rank < world_size:
            raise ValueError(f"KillAt.rank: {self.rank} is not a rank of {world_size} worker(s)")

    def before_step(self, run: RunInfo, step: int) -> None:
        marker = run.local_dir / self.marker
        if step != self.step or run.rank != self.rank or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"fault injected at step {step} on rank {run.rank}\n")
        if self.target == "driver" and run.driver_pid:
            os.kill(run.driver_pid, signal.SIGKILL)
            time.sleep(30)  # the whole local Ray instance goes down with the driver
        os._exit(1)


@dataclass(frozen=True)
class OverflowAt(TrainHooks):
    """Step ``step``'s (0-based) gradients overflow: its loss is scaled by inf on its
    way to backward (the logged loss stays finite)."""

    step: int

    def loss(self, run: RunInfo, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("inf") if step == self.step else loss


__all__ = ["MARKER", "KillAt", "OverflowAt"]
