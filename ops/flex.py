"""The ``flex`` backend: FlexAttention fed the same ``mask_mod`` as every other backend.

Our baseline on GPU. Heads that the layout runs in the transposed order (strided
A2) get the same permutation here, so FlexAttention sees contiguous blocks too:
the mask is evaluated on the original positions through each head's order.
FlexAttention has no CPU backward; on CPU this backend is forward-only.
"""

from __future__ import annotations

import torch

from sparse_transformer.ops.blocksparse_torch import from_head_order, to_head_order
from sparse_transformer.ops.layout import BlockLayout, head_order_mod


def flex_block_mask(layout: BlockLayout, block_size: int | None = None, compile: bool = False):
    """FlexAttention's BlockMask for ``layout`` in head order, kept in the layout's
    ``flex_masks`` (a field: this runs inside compiled blocks) and freed with it."""
    from torch.nn.attention.flex_attention import create_block_mask

    block_size = block_size or 128
    key = (block_size, compile)
    if key not in layout.flex_masks:
        # the mask_mod holds what it reads, not the layout: the BlockMask keeps it
        n, pattern, permuted = layout.n, layout.pattern, layout.any_permuted

        def mask_mod(b, h, q_idx, kv_idx):
            qo = head_order_mod(pattern, n, permuted, h, q_idx)
            ko = head_order_mod(pattern, n, permuted, h, kv_idx)
            return pattern.mask_mod(b, h, qo, ko) & (ko < n)

        layout.flex_masks[key] = create_block_mask(
            mask_mod,
            None,
            layout.n_heads,
            layout.n_padded,
            layout.n_padded,
            device=layout.device,
            BLOCK_SIZE=block_size,
            _compile=compile,
        )
    return layout.flex_masks[key]


_COMPILED = {}


def compiled_flex_attention():
    """``torch.compile``-d flex_attention (one per process): FlexAttention's fast path."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def flex_attention_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    block_size: int | tuple[int, int] | None = None,
    kernel=None,
    kernel_options: dict | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention through FlexAttention. ``kernel`` may be a ``torch.compile``-d
    ``flex_attention``; by default the compiled one on CUDA, the eager one on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    n = q.shape[2]
    if not q.is_cuda and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError(
            "sparse_attention: the flex backend has no backward on CPU (FlexAttention's "
            "limit); use backend='torch' or run it under torch.no_grad()"
        )
    block_mask = flex_block_mask(layout, block_size, compile=q.is_cuda)
    fn = kernel or (compiled_flex_attention() if q.is_cuda else flex_attention)
    qh, kh, vh = (to_head_order(x, layout) for x in (q, k, v))
    out, lse = fn(
        qh,
        kh,
        vh,
        block_mask=block_mask,
        scale=scale,
        return_lse=True,
        kernel_options=kernel_options,
    )
    out = from_head_order(out, layout, n)
    if return_lse:
        return out, from_head_order(lse[..., None], layout, n)[..., 0].float()
    return out
