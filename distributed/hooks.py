"""Extension points of the training loop, for code outside the trainer (tests, checks).

A :class:`TrainHooks` instance is handed to
:func:`sparse_transformer.distributed.trainer.run_training` (``hooks=``) and travels to
every worker with the loop's private config (Ray pickles it: define hooks in an
importable module). The trainer calls them at fixed points of each step; the base class
does nothing, so a run without hooks is the plain loop. No config field reaches them:
a user's YAML cannot inject faults.

The fault injections the recovery tests and ``benchmarks/gpu_check.py`` use are in
:mod:`sparse_transformer.benchmarks.faults`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RunInfo:
    """What a hook may know about the worker it runs in."""

    rank: int
    world_size: int
    local_dir: Path  # the run's local folder (metrics.jsonl, markers)
    driver_pid: int | None  # the driver process's PID when it runs on this node


class TrainHooks:
    """Called by every rank's trainer; override what you need."""

    def check(self, world_size: int) -> None:
        """On the driver, before Ray starts: raise ValueError for a hook the run cannot
        honour (e.g. a rank beyond the world size)."""

    def before_step(self, run: RunInfo, step: int) -> None:
        """Before step ``step`` (0-based: the number of steps done) fetches its batch."""

    def loss(self, run: RunInfo, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch of step ``step`` as it goes to backward."""
        return loss


__all__ = ["RunInfo", "TrainHooks"]
