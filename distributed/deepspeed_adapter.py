"""Everything the trainer asks of DeepSpeed, in one place.

The trainer reaches DeepSpeed only through these functions. They use DeepSpeed's public
engine API (``initialize``, ``forward``/``backward``/``step``, ``save_checkpoint``,
``load_checkpoint``, ``get_global_grad_norm``) plus the few attributes below, which are
not documented API; ``tests/test_deepspeed_adapter.py`` checks each of them against the
installed (pinned) DeepSpeed, so an upgrade that moves one fails a test instead of a run:

- ``engine.skipped_steps``: the fp16 overflow steps DeepSpeed skipped (an int the engine
  sets in ``__init__`` and checkpoints);
- ``engine.optimizer.loss_scale``: the current dynamic loss scale, a property of every
  fp16 optimizer wrapper (``FP16_Optimizer``, ``FP16_UnfusedOptimizer``, the ZeRO 1/2
  and ZeRO 3 optimizers);
- ``engine.optimizer.step`` is looked up on the instance, so an instance attribute can
  stand in for it during one ``engine.step()`` (:func:`step_without_update`).
"""

from __future__ import annotations

from typing import Any

import torch


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]) -> tuple[Any, Any]:
    """(engine, LR scheduler or None) for ``model`` under DeepSpeed's JSON ``ds_config``."""
    import deepspeed

    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    return engine, scheduler


def step_without_update(engine: Any) -> None:
    """``engine.step()`` without the optimizer update (non-finite fp32 gradients).

    fp16 overflow is DeepSpeed's to skip; in fp32 nothing would stop a NaN/inf update.
    DeepSpeed's bookkeeping (micro-step counters, LR schedule, zeroing the gradients)
    runs as usual; the optimizer's ``step`` is a no-op for this call, so no parameter,
    moment or weight-decay update happens.
    """
    opt = engine.optimizer
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()  # finite, so DeepSpeed's gradient clipping stays well-defined
    saved = vars(opt).get("step")
    opt.step = lambda *args, **kwargs: None
    try:
        engine.step()
    finally:
        if saved is None:
            del opt.step
        else:
            opt.step = saved


def grad_norm(engine: Any) -> float:
    """The global gradient norm of the last backward (DeepSpeed's, else computed here)."""
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [
        p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None
    ]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack(grads)))


def loss_scale(engine: Any, precision: str) -> float:
    """The dynamic loss scale under fp16; 1 for every other precision."""
    if precision != "fp16":
        return 1.0
    value = engine.optimizer.loss_scale  # None when the wrapper does no grad scaling
    return float("nan") if value is None else float(value)


def skipped_steps(engine: Any) -> int:
    """The fp16 overflow steps DeepSpeed has skipped in this run (checkpointed with it)."""
    return int(engine.skipped_steps)


__all__ = [
    "grad_norm",
    "initialize",
    "loss_scale",
    "skipped_steps",
    "step_without_update",
]
