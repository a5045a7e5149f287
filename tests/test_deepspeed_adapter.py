"""The DeepSpeed adapter's undocumented attributes, checked against the installed
(pinned) DeepSpeed: an upgrade that moves one fails here, not in a run on a GPU."""

from __future__ import annotations

import inspect

import pytest

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
