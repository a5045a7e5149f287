"""The ground truth: dense masked causal attention, O(n^2) in time and memory.

Works in any floating dtype including fp64; low-precision inputs are computed in
fp32 and the output cast back. Rows whose pattern allows no key (for example a
fixed-A2 head before the first summary cell) produce zeros, as FlexAttention
does.
"""

from __future__ import annotations

import torch

from sparse_transformer.ops.layout import BlockLayout
from sparse_transformer.ops.patterns import dense_mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of (B, H, n, D) inputs under ``layout.pattern``, computed densely.

    ``upcast=False`` keeps the matrix products in the input precision (softmax
    still in fp32), which is what plain PyTorch attention code does in fp16/bf16:
    its error is the yardstick for low-precision kernels.
    """
    b, h, n, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if not upcast:
        mask = dense_mask(layout.pattern, n, h, q.device)
        s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)
        return torch.matmul(p, v)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = dense_mask(layout.pattern, n, h, q.device)  # (H, n, n)
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(compute), k.to(compute)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, n); -inf where a row reads nothing
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.to(compute)).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out
