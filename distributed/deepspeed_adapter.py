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
  stand in for it during one ``engine.step()`` (:func:`step_without_update`);
- ``engine.backward`` scales the loss only for a ZeRO optimizer (or torch autocast's
  grad scaler), not for ``FP16_Optimizer``, DeepSpeed's fp16 wrapper at ZeRO stage 0,
  which still divides the gradients by the loss scale in ``step``: :func:`backward`
  scales the loss itself there.
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


def _scales_the_loss(engine: Any) -> bool:
    """Whether ``engine.backward`` multiplies the loss by the loss scale itself."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    if not engine.fp16_enabled() or isinstance(engine.optimizer, ZeROOptimizer):
        return True
    return getattr(engine, "torch_autocast_z0_gradscaler", None) is not None


def backward(engine: Any, loss: torch.Tensor) -> None:
    """``engine.backward(loss)`` with the loss scaled under fp16 at every ZeRO stage.

    DeepSpeed 0.19.8 scales the loss in ``engine.backward`` for its ZeRO optimizers only;
    at stage 0 its ``FP16_Optimizer`` then divides unscaled gradients by the loss scale
    (updates 65,536 times too small, fp16 gradients underflowing, clipping never
    applied). There the loss is multiplied by the current scale here, which is what the
    ZeRO optimizers do (``scale_if_loss``) and what ``FP16_Optimizer.backward`` does.
    """
    if not _scales_the_loss(engine):
        loss = loss.float() * engine.optimizer.loss_scale
    engine.backward(loss)


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
    "backward",
    "grad_norm",
    "initialize",
    "loss_scale",
    "skipped_steps",
    "step_without_update",
]
