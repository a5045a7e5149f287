"""The harness behind the GPU kernel checks (``ops.kernel_check``), run on the CPU.

The GPU grid (tests/test_triton_gpu.py, gpu_check) judges the Triton kernels with it;
here the block-sparse PyTorch backend stands in for the kernel, so a harness that breaks
is seen without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from sparse_transformer.ops.kernel_check import KernelCheck, check_kernel


@pytest.mark.parametrize(
    ("kind", "mode", "layer"), [("fixed", "merged", 0), ("strided", "interleaved", 1)]
)
def test_the_pytorch_backend_passes_the_harness(kind: str, mode: str, layer: int) -> None:
    result = check_kernel(
        kind, mode, layer, 1000, 32, torch.bfloat16, backend="torch", device="cpu", seed=3
    )
    assert result.ok, result.describe()
    assert not result.unwritten
    assert all(0 < result.torch_err[k] < 0.1 for k in ("out", "dq", "dk", "dv"))
    assert f"torch {kind}/{mode}/layer {layer} n=1000 d=32 bfloat16 seed=3" in result.describe()


def test_the_bound_is_twice_pytorchs_error_plus_atol() -> None:
    errs = {"out": 0.01, "dq": 0.01, "dk": 0.01, "dv": 0.01}
    within = KernelCheck("c", {**errs, "dk": 0.02 + 1e-3}, errs, atol=1e-3, unwritten=[])
    beyond = KernelCheck("c", {**errs, "dk": 0.0212}, errs, atol=1e-3, unwritten=[])
    unwritten = KernelCheck("c", errs, errs, atol=1e-3, unwritten=["dv"])
    assert within.ok and not beyond.ok and not unwritten.ok
    assert "worst dk" in beyond.describe() and "unwritten (NaN): dv" in unwritten.describe()
