"""The one door to ``torch.distributed`` collectives in the trainer.

A process group's backend takes tensors of some device types only: gloo takes CPU
tensors, NCCL only CUDA tensors (``RuntimeError: No backend type associated with
device type cpu``). Every collective the training code runs goes through this
module, which moves the tensor to a device the group's backend takes and back, so
the same loop runs on gloo (CPU tests) and NCCL (GPUs) whatever device a metric
happens to live on. ``tests/test_collectives.py`` checks that no other module of
``distributed/`` calls a collective directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors ``group``'s backend takes.

    The CPU when the backend has a CPU implementation (gloo, or a ``cpu:gloo,cuda:nccl``
    pair), else the current device of the backend's accelerator (NCCL: this process's
    CUDA device).
    """
    # e.g. "cpu:gloo,cuda:gloo" or "cuda:nccl"
    types = [entry.split(":")[0] for entry in dist.get_backend_config(group).split(",")]
    if "cpu" in types:
        return torch.device("cpu")
    accelerator = getattr(torch, types[0])  # torch.cuda for "cuda"
    return torch.device(types[0], accelerator.current_device())


def all_reduce(
    tensor: torch.Tensor,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``dist.all_reduce`` of ``tensor`` in place, on whatever device it lives; returns it.

    A tensor already on the backend's device is reduced as it is; any other is copied
    there, reduced, and copied back.
    """
    device = backend_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    tensor.copy_(moved)
    return tensor


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """``dist.barrier``, naming this process's device to a GPU backend (NCCL would guess)."""
    device = backend_device(group)
    if device.type == "cpu":
        dist.barrier(group=group)
    else:
        dist.barrier(group=group, device_ids=[device.index])


__all__ = ["all_reduce", "backend_device", "barrier"]
