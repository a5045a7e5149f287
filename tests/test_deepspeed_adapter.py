"""The DeepSpeed adapter's undocumented attributes, checked against the installed
(pinned) DeepSpeed: an upgrade that moves one fails here, not in a run on a GPU."""

from __future__ import annotations

import inspect

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")


def fp16_optimizer_classes() -> list[type]:
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return [FP16_Optimizer, FP16_UnfusedOptimizer, DeepSpeedZeroOptimizer,
            DeepSpeedZeroOptimizer_Stage3]  # fmt: skip


@pytest.mark.parametrize("cls", fp16_optimizer_classes(), ids=lambda c: c.__name__)
def test_every_fp16_optimizer_has_a_loss_scale_property(cls: type) -> None:
    assert isinstance(inspect.getattr_static(cls, "loss_scale"), property)


def test_the_engine_counts_skipped_steps_and_reports_the_grad_norm() -> None:
    from deepspeed.runtime.engine import DeepSpeedEngine

    init = inspect.getsource(DeepSpeedEngine.__init__)
    assert "self.skipped_steps = 0" in init
    assert "skipped_steps" in inspect.getsource(DeepSpeedEngine._take_model_step)
    assert callable(DeepSpeedEngine.get_global_grad_norm)
    # step_without_update's stand-in is an instance attribute: the engine must call
    # self.optimizer.step() through the instance, not through the class
    assert "self.optimizer.step(" in inspect.getsource(DeepSpeedEngine._take_model_step)


def test_engine_backward_still_leaves_the_zero0_fp16_loss_unscaled() -> None:
    """``deepspeed_adapter.backward`` scales the loss where ``engine.backward`` does not
    (fp16 at ZeRO stage 0): if an upgrade made the engine scale it, the loss would be
    scaled twice. The engine must still scale only for ZeRO optimizers and autocast."""
    from deepspeed.runtime import engine

    module = inspect.getsource(engine)  # the method is wrapped (nvtx) without functools.wraps
    start = module.index("\n    def backward(self")
    source = module[start : module.index("\n    def ", start + 1)]
    scaling = [x.strip() for x in source.splitlines() if "loss = self." in x and "scale" in x]
    assert scaling == [
        "loss = self.optimizer.scale_if_loss(loss)",
        "loss = self.torch_autocast_z0_gradscaler.scale(loss)",
    ], scaling
    assert "if isinstance(self.optimizer, ZeROOptimizer):" in source


def _sgd_update(zero_stage: int, scaled: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(update of one fp16 SGD step, -lr x the fp32 gradient, loss scale) for a linear
    layer through a one-process DeepSpeed engine on the GPU."""
    import os
    import socket

    import torch.distributed as dist

    from sparse_transformer.distributed import deepspeed_adapter as ds

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64).cuda()
    x = torch.randn(8, 64, device="cuda")
    ref = model(x).float().pow(2).mean()
    lr = 0.1
    expected = -lr * torch.autograd.grad(ref, model.weight)[0]
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "fp16": {"enabled": True, "initial_scale_power": 12},
        "optimizer": {"type": "SGD", "params": {"lr": lr}},
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # SGD: its update is -lr x the gradient
    }
    engine, _ = ds.initialize(model, config)
    before = engine.module.weight.detach().float().clone()
    loss = engine(x.half()).float().pow(2).mean()
    ds.backward(engine, loss) if scaled else engine.backward(loss)
    engine.step()
    update = engine.module.weight.detach().float() - before
    return update, expected, ds.loss_scale(engine, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_updates_are_right_at_every_zero_stage() -> None:
    """One fp16 SGD step equals -lr x the gradient at ZeRO 0 and 1 through the adapter.
    DeepSpeed's own backward at ZeRO 0 (the bug the adapter works around) divides the
    unscaled gradient by the loss scale: the update, 4,096 times too small, mostly falls
    below the fp16 weights' resolution."""
    for stage in (0, 1):
        update, expected, scale = _sgd_update(stage, scaled=True)
        assert scale == 2.0**12
        torch.testing.assert_close(update, expected, rtol=2e-2, atol=2e-4)
    update, expected, _ = _sgd_update(0, scaled=False)
    assert update.abs().max() < expected.abs().max() / 100, (update.abs().max(), expected)
