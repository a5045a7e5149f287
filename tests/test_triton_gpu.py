"""Triton kernels on the GPU against the fp32 reference, by the flash-attention rule.

For out, dq, dk, dv: the kernel's max error against the fp32 truth is at most
twice the error of PyTorch attention run in the same low precision, plus a small
absolute term. Outputs start as NaN, so an unwritten element fails the test.
Skipped without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SPARSE_TRANSFORMER_AUTOTUNE", "0")  # compile time; numbers don't change
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import sparse_transformer.ops.triton_attention as ta  # noqa: E402
from sparse_transformer.ops import compile_layout, pattern_for_layer, sparse_attention  # noqa: E402
from sparse_transformer.ops.reference import reference_attention  # noqa: E402

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


def _blocks(kind: str, d: int) -> tuple[int, int]:
    if kind == "fixed":
        return (64, 32) if d == 128 else (128, 32)
    return (64, 64)


def _grads(fn, q, k, v, dout):
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(qs, ks, vs)
    out.backward(dout)
    return [out.detach(), qs.grad, ks.grad, vs.grad]


def _check(kind, mode, layer, n, d, dtype, heads=2, batch=1, dense_truth=True):
    stride = {1000: 32, 4096: 64, 12288: 128, 65536: 256}[n]
    pattern = pattern_for_layer(
        kind, mode=mode, layer=layer, n_heads=heads, stride=stride, summary=16
    )
    bq, bk = _blocks(kind, d)
    layout = compile_layout(pattern, n, heads, bq, bk, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    q, k, v, dout = (
        torch.randn(batch, heads, n, d, device="cuda", generator=gen) for _ in range(4)
    )
    if dense_truth:
        truth = _grads(lambda a, b, c: reference_attention(a, b, c, layout), q, k, v, dout)
        lo = [x.to(dtype) for x in (q, k, v, dout)]
        base = _grads(lambda a, b, c: reference_attention(a, b, c, layout, upcast=False), *lo)
    else:  # n too long for O(n^2): block-sparse fp32 truth, FlexAttention as PyTorch's own
        truth = _grads(
            lambda a, b, c: sparse_attention(a, b, c, layout, backend="torch"), q, k, v, dout
        )
        lo = [x.to(dtype) for x in (q, k, v, dout)]
        base = _grads(lambda a, b, c: sparse_attention(a, b, c, layout, backend="flex"), *lo)
    ta.POISON_OUTPUTS = True
    try:
        ours = _grads(lambda a, b, c: sparse_attention(a, b, c, layout, backend="triton"), *lo)
    finally:
        ta.POISON_OUTPUTS = False
    for name, o, b, t in zip(("out", "dq", "dk", "dv"), ours, base, truth):
        assert not o.isnan().any(), f"{name}: unwritten (NaN) elements"
        err = (o.float() - t).abs().max().item()
        base_err = (b.float() - t).abs().max().item()
        atol = 1e-3 if dtype == torch.float16 else 8e-3
        assert err <= 2 * base_err + atol, f"{name}: kernel {err:.3g} vs PyTorch {base_err:.3g}"


@pytest.mark.parametrize("kind,mode,layer", MODES)
@pytest.mark.parametrize("n", [1000, 4096])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference(kind, mode, layer, n, d, dtype):
    _check(kind, mode, layer, n, d, dtype)


@pytest.mark.parametrize("kind,mode,layer", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_12k(kind, mode, layer, dtype):
    _check(kind, mode, layer, 12288, 64, dtype)


@pytest.mark.parametrize("kind,mode,layer", [m for m in MODES if m[0] != "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_65k(kind, mode, layer, dtype):
    _check(kind, mode, layer, 65536, 64, dtype, dense_truth=False)


def test_auto_picks_triton_and_compiles():
    pattern = pattern_for_layer("fixed", mode="merged", layer=0, n_heads=2, stride=64, summary=16)
    layout = compile_layout(pattern, 2048, 2, 64, 32, device="cuda")
    q, k, v = (torch.randn(2, 2, 2048, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    eager = sparse_attention(q, k, v, layout, backend="triton")
    assert torch.equal(sparse_attention(q, k, v, layout), eager)
    compiled = torch.compile(lambda a, b, c: sparse_attention(a, b, c, layout), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), eager)
