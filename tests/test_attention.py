"""Every backend against the dense fp64 reference, values and gradients."""

from __future__ import annotations

import os

import pytest
import torch

from sparse_transformer.ops import Pattern, compile_layout, pattern_for_layer, sparse_attention
from sparse_transformer.ops.reference import reference_attention
from tests.ops_cases import mode_patterns, pattern_id

PATTERNS = mode_patterns(n_heads=4, stride=12, summary=4)


def _inputs(b, h, n, d, dtype=torch.float64, seed=None, device="cpu"):
    if seed is None:  # fresh inputs every run; the seed is shown with a failure's output
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        print(f"_inputs seed {seed}")
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype).to(device)
        for _ in range(4)
    ]


def _check_against_reference(pattern, n, d, block_q, block_k, h=4, b=2):
    layout = compile_layout(pattern, n, h, block_q, block_k)
    q, k, v, w = _inputs(b, h, n, d)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ref = reference_attention(q, k, v, layout)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    out = sparse_attention(q, k, v, layout, backend="torch")
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=lambda m, x=name: f"d{x}: {m}")
    with torch.no_grad():
        flex = sparse_attention(q, k, v, layout, backend="flex")
    torch.testing.assert_close(flex, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_id)
@pytest.mark.parametrize("n", [1, 17, 100, 203])
def test_backends_match_reference(pattern: Pattern, n: int) -> None:
    _check_against_reference(pattern, n, d=8, block_q=16, block_k=32)


@pytest.mark.parametrize(
    "pattern",
    [
        pattern_for_layer("fixed", mode="merged", layer=0, n_heads=4, stride=64, summary=16),
        pattern_for_layer("strided", mode="multihead", layer=0, n_heads=4, stride=32),
        pattern_for_layer("strided", mode="interleaved", layer=1, n_heads=4, stride=30),
    ],
    ids=pattern_id,
)
@pytest.mark.parametrize("n,d", [(1000, 32), (4097, 16)])
def test_backends_match_reference_long(pattern: Pattern, n: int, d: int) -> None:
    _check_against_reference(pattern, n, d, block_q=64, block_k=32, b=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_is_like_pytorchs_own(dtype: torch.dtype) -> None:
    """In low precision the torch backend's error against the fp64 truth is at most
    twice that of the dense reference run in the same precision (plus a tiny term)."""
    pattern = pattern_for_layer("fixed", mode="merged", layer=0, n_heads=2, stride=32, summary=8)
    layout = compile_layout(pattern, 300, 2, 32, 16)
    q, k, v, w = _inputs(2, 2, 300, 32)
    truth = reference_attention(q, k, v, layout)
    lo = [x.to(dtype) for x in (q, k, v)]
    ours = sparse_attention(*lo, layout, backend="torch")
    torchs = reference_attention(*lo, layout)
    assert ours.dtype == dtype
    err = (ours.double() - truth).abs().max()
    base = (torchs.double() - truth).abs().max()
    assert err <= 2 * base + 1e-5, (err, base)


@pytest.mark.slow
def test_long_sequence_memory_stays_far_below_n_squared() -> None:
    """Forward+backward at n = 32,768 in a fresh process: the peak resident memory
    it adds is far below one dense fp32 score matrix (2 heads: 8 GiB)."""
    from sparse_transformer.benchmarks.attention_cpu import run_isolated

    n, heads = 32768, 2
    row = run_isolated("torch", n, heads, 32, 181, 64, limit=8 << 30)
    assert row["status"] == "ok", row
    dense_scores = heads * n * n * 4
    assert row["peak_bytes"] < dense_scores / 10, row


def test_empty_rows_are_zero() -> None:
    """Fixed-A2 heads read nothing before the first summary cell: output 0, no NaN."""
    pattern = pattern_for_layer(
        "fixed", mode="interleaved", layer=1, n_heads=2, stride=16, summary=4
    )
    layout = compile_layout(pattern, 40, 2, 16, 16)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = sparse_attention(q, k, v, layout, backend="torch")
    assert torch.isfinite(out).all()
    assert (out[0, 0, :12] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bad_inputs_raise_value_errors() -> None:
    layout = compile_layout(Pattern("strided", stride=4), 32, 2, 16, 16)
    q = torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="shapes differ"):
        sparse_attention(q, q, q[..., :4], layout)
    with pytest.raises(ValueError, match="dtypes differ"):
        sparse_attention(q, q, q.double(), layout)
    with pytest.raises(ValueError, match="beyond"):
        sparse_attention(*(torch.randn(1, 2, 33, 8) for _ in range(3)), layout)
    with pytest.raises(ValueError, match="heads"):
        sparse_attention(*(torch.randn(1, 3, 32, 8) for _ in range(3)), layout)
    with pytest.raises(ValueError, match="causal"):
        sparse_attention(q, q, q, layout, causal=False)
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, layout, backend="cuda-magic")
    with pytest.raises(ValueError, match=r"\(batch, heads, n, d_head\)"):
        sparse_attention(q[0], q[0], q[0], layout)
    with pytest.raises(ValueError, match="dtype"):
        sparse_attention(*(torch.ones(1, 2, 32, 8, dtype=torch.int32) for _ in range(3)), layout)
    with pytest.raises(ValueError, match="no backward on CPU"):
        sparse_attention(q.requires_grad_(), q, q, layout, backend="flex")


def test_triton_backend_refuses_what_its_grid_cannot_hold() -> None:
    """A head's blocks run on the grid's second axis (at most 65,535): past that the
    backend says so before any launch instead of failing inside CUDA."""
    ta = pytest.importorskip("sparse_transformer.ops.triton_attention")
    n = 16 * (ta.MAX_BLOCKS + 1)
    layout = compile_layout(Pattern("local", stride=16), n, 1, 16, 16)
    assert layout.n_qblocks == ta.MAX_BLOCKS + 1
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="at most 65535 blocks per head; this layout has 65536"):
        ta.triton_sparse_attention(q, q, q, layout)


@pytest.mark.parametrize("n", [1, 37, 128])
def test_sdpa_backend_is_dense_causal_attention(n: int) -> None:
    """``sdpa`` (PyTorch's fused kernels) on a dense layout equals the reference, at the
    layout's n and shorter, with an explicit scale."""
    layout = compile_layout(
        pattern_for_layer("dense", mode="merged", layer=0, n_heads=2), 128, 2, 32, 32
    )
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = sparse_attention(q, k, v, layout, backend="sdpa", scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, scale=0.3))


def test_sdpa_backend_refuses_sparse_layouts() -> None:
    pattern = pattern_for_layer("fixed", mode="merged", layer=0, n_heads=2, stride=16, summary=4)
    layout = compile_layout(pattern, 64, 2, 16, 16)
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="sdpa backend runs dense causal attention only"):
        sparse_attention(q, q, q, layout, backend="sdpa")


def test_backend_tables_die_with_their_layout() -> None:
    """What a backend derives from a layout lives in that backend's LayoutCache (one
    typed value per layout, keyed weakly; no free-form dict on the layout) or, for what
    compiled code reads, in a declared field of the layout. Once nothing holds the
    layout (compile_layout's cache evicted it), all of it is freed."""
    import gc
    import weakref

    from sparse_transformer.ops import blocksparse_torch
    from sparse_transformer.ops.layout import BlockLayout, LayoutCache, _compile_cached

    ta = pytest.importorskip("sparse_transformer.ops.triton_attention")
    pattern = pattern_for_layer("strided", mode="multihead", layer=0, n_heads=2, stride=8)
    layout = compile_layout(pattern, 64, 2, 16, 16)
    assert layout.any_permuted  # so the torch and flex backends fill the head orders
    q, k, v = (torch.randn(1, 2, 64, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sparse_attention(q, k, v, layout, backend="torch").sum().backward()
    with torch.no_grad():
        sparse_attention(q, k, v, layout, backend="flex")
    plan = ta._launch_plan(layout)  # what the Triton kernels read (no kernel runs here)

    assert not hasattr(layout, "_cache")
    for cache in (ta._PLANS, blocksparse_torch._ELL):
        assert isinstance(cache, LayoutCache) and not isinstance(cache, dict)
        assert layout in cache
    assert ta._launch_plan(layout) is plan  # built once per layout
    assert isinstance(plan, ta._LaunchPlan)
    ell = blocksparse_torch._ELL.get(layout, BlockLayout.ell)
    assert [t.shape[:2] for t in ell] == [(layout.n_groups, layout.n_qblocks)] * 2
    masks = list(layout.flex_masks.values())
    assert len(masks) == 1
    derived = [
        plan.table,
        plan.q_order,
        plan.k_order,
        *ell,
        layout.head_orders(),
        layout.head_inverse_orders(),
        masks[0].kv_num_blocks,
    ]
    refs = [weakref.ref(x) for x in (layout, *derived)]
    del layout, plan, ell, masks, derived
    _compile_cached.cache_clear()
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
