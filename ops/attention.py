"""The one entry point: ``sparse_attention(q, k, v, layout, backend=...)``.

Always causal; softmax in fp32 (fp64 for fp64 inputs); q.k accumulated in fp32
for fp16/bf16 inputs; any n up to ``layout.n`` (padding is handled inside).

Backends:
- ``reference``: dense masked attention, O(n^2): the ground truth, works in fp64.
- ``torch``: block-sparse pure PyTorch with an online softmax and a real backward;
  never builds an n x n tensor; CPU and GPU.
- ``flex``: FlexAttention fed the same mask_mod (forward-only on CPU).
- ``triton``: the block-sparse Triton kernels (CUDA; see ``ops.triton_attention``).
- ``sdpa``: dense causal layouts only: ``F.scaled_dot_product_attention(is_causal=True)``
  (FlashAttention / cuDNN / memory-efficient kernels on a GPU), the strongest dense
  baseline; any other pattern is refused.
- ``auto``: the fastest available for the inputs: triton on CUDA when it is
  importable and supports the shape, else torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from sparse_transformer.ops.layout import BlockLayout

BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "flex", "triton", "sdpa")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(q, k, v, layout: BlockLayout, backend: str, causal: bool) -> None:
    if not causal:
        raise ValueError("sparse_attention: only causal attention is supported (causal=False)")
    if backend not in BACKENDS:
        raise ValueError(f"sparse_attention: unknown backend {backend!r}; expected {BACKENDS}")
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"sparse_attention: layout must be a BlockLayout, got {type(layout)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"sparse_attention: {name} must be (batch, heads, n, d_head), got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype not in _DTYPES:
            raise ValueError(f"sparse_attention: {name} has unsupported dtype {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"sparse_attention: q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"sparse_attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError("sparse_attention: q, k, v are on different devices")
    b, h, n, d = q.shape
    if h != layout.n_heads:
        raise ValueError(
            f"sparse_attention: inputs have {h} heads, layout was built for {layout.n_heads}"
        )
    if n > layout.n:
        raise ValueError(f"sparse_attention: n = {n} is beyond the layout's n = {layout.n}")
    if n == 0 or d == 0 or b == 0:
        raise ValueError(f"sparse_attention: empty input of shape {tuple(q.shape)}")


_HAVE_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Is the Triton backend importable here (Triton installed and a CUDA device)?"""
    return _HAVE_TRITON and torch.cuda.is_available()


def _triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: the kernels run on the CPU (tests, at tiny sizes)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pick_backend(q: torch.Tensor, layout: BlockLayout) -> str:
    if q.is_cuda and q.dtype != torch.float64 and triton_available():
        from sparse_transformer.ops import triton_attention

        if triton_attention.supports(q, layout):
            return "triton"
    return "torch"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    backend: str = "auto",
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Causal block-sparse attention of (batch, heads, n, d_head) tensors.

    ``layout`` comes from :func:`sparse_transformer.ops.compile_layout` for the
    same number of heads and an n at least as long as the inputs'. ``scale``
    defaults to ``d_head ** -0.5``. Returns a tensor shaped like ``q``.
    """
    _validate(q, k, v, layout, backend, causal)
    if layout.device != q.device:
        raise ValueError(
            f"sparse_attention: layout is on {layout.device}, inputs on {q.device}; build the "
            "layout on the inputs' device"
        )
    if backend == "auto":
        backend = _pick_backend(q, layout)
    if backend == "reference":
        from sparse_transformer.ops.reference import reference_attention

        return reference_attention(q, k, v, layout, scale=scale)
    if backend == "torch":
        from sparse_transformer.ops.blocksparse_torch import blocksparse_attention_torch

        return blocksparse_attention_torch(q, k, v, layout, scale=scale)
    if backend == "sdpa":
        if layout.pattern.kind != "dense":
            raise ValueError(
                f"sparse_attention: the sdpa backend runs dense causal attention only; this "
                f"layout's pattern is {layout.pattern.kind!r}"
            )
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if backend == "flex":
        if q.dtype == torch.float64 and q.is_cuda:
            raise ValueError("sparse_attention: the flex backend does not support fp64 on CUDA")
        from sparse_transformer.ops.flex import flex_attention_backend

        return flex_attention_backend(q, k, v, layout, scale=scale)
    if not (triton_available() or (_HAVE_TRITON and _triton_interpreter())):
        raise ValueError("sparse_attention: the triton backend needs Triton and a CUDA device")
    from sparse_transformer.ops import triton_attention

    return triton_attention.triton_sparse_attention(q, k, v, layout, scale=scale)
