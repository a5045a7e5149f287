"""Triton kernels on the GPU against the fp32 reference, by the flash-attention rule.

For out, dq, dk, dv: the kernel's max error against the fp32 truth is at most
twice the error of PyTorch attention run in the same low precision, plus a small
absolute term (``ops.kernel_check``). Outputs start as NaN, so an unwritten element
fails the test. Skipped without CUDA; ``benchmarks/gpu_check.py`` runs a quick grid.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SPARSE_TRANSFORMER_AUTOTUNE", "0")  # compile time; numbers don't change
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from sparse_transformer.ops import compile_layout, pattern_for_layer, sparse_attention  # noqa: E402
from sparse_transformer.ops import triton_attention as ta  # noqa: E402
from sparse_transformer.ops.kernel_check import check_kernel, check_launches  # noqa: E402

MODES = [
    ("strided", "interleaved", 0),
    ("strided", "interleaved", 1),
    ("strided", "merged", 0),
    ("strided", "multihead", 0),
    ("fixed", "interleaved", 0),
    ("fixed", "interleaved", 1),
    ("fixed", "merged", 0),
    ("fixed", "multihead", 0),
    ("dense", "merged", 0),
]


def _check(kind, mode, layer, n, d, dtype):
    result = check_kernel(kind, mode, layer, n, d, dtype)
    assert result.ok, result.describe()


@pytest.mark.parametrize("kind,mode,layer", MODES)
@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference(kind, mode, layer, n, d, dtype):
    _check(kind, mode, layer, n, d, dtype)


@pytest.mark.parametrize("kind,mode,layer", MODES)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backward_matches_reference(kind, mode, layer, d, dtype, monkeypatch):
    """dQ added by the dK/dV kernel with atomics (``BACKWARD = "fused"``)."""
    monkeypatch.setattr(ta, "BACKWARD", "fused")
    _check(kind, mode, layer, 4096, d, dtype)


@pytest.mark.parametrize("kind,mode,layer", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_12k(kind, mode, layer, dtype):
    _check(kind, mode, layer, 12288, 64, dtype)


@pytest.mark.parametrize("kind,mode,layer", [m for m in MODES if m[0] != "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_65k(kind, mode, layer, dtype):
    _check(kind, mode, layer, 65536, 64, dtype)


@pytest.mark.parametrize("kind,mode", [("strided", "interleaved"), ("fixed", "merged")])
@pytest.mark.parametrize("d", [32, 128])
def test_cached_launches_follow_what_triton_specialises(kind, mode, d):
    """Misaligned and transposed inputs between aligned ones: each launch signature gets
    its own compiled kernel (``triton_attention._cached_launch``)."""
    result = check_launches(kind, mode, d=d)
    assert result.ok, result.describe()


def test_auto_picks_triton_and_compiles():
    pattern = pattern_for_layer("fixed", mode="merged", layer=0, n_heads=2, stride=64, summary=16)
    layout = compile_layout(pattern, 2048, 2, 64, 32, device="cuda")
    q, k, v = (torch.randn(2, 2, 2048, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    eager = sparse_attention(q, k, v, layout, backend="triton")
    assert torch.equal(sparse_attention(q, k, v, layout), eager)
    compiled = torch.compile(lambda a, b, c: sparse_attention(a, b, c, layout), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
