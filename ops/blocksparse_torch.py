"""Block-sparse attention in pure PyTorch: the ``torch`` backend.

Walks a :class:`BlockLayout`'s padded key-block lists with an online softmax,
a chunk of query blocks and a chunk of key slots at a time, so no n x n tensor
is ever built and peak memory is bounded by ``chunk_elements``. The backward is
written out (flash-attention style: recompute the probabilities from the saved
log-sum-exp, then dV = P^T dO, dS = P * (dP - rowsum(dO * O)), dQ = dS K,
dK = dS^T Q), so activations are O(n d), not O(n * keys).

Runs on CPU and GPU, in fp64, fp32, bf16 and fp16 (low precision is computed in
fp32). Inputs arrive in each head's order, padded to ``layout.n_padded`` (see
:func:`to_head_order`). The padded key-block lists of every live layout are kept in
this backend's :class:`~sparse_transformer.ops.layout.LayoutCache` and go with it.
"""

from __future__ import annotations

import torch

from sparse_transformer.ops.layout import BlockLayout, LayoutCache, layout_by_uid

DEFAULT_CHUNK_ELEMENTS = 1 << 22
_ELL: LayoutCache[tuple[torch.Tensor, torch.Tensor]] = LayoutCache(
    "torch backend: padded key-block lists (BlockLayout.ell)"
)


def to_head_order(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(B, H, n, D) in the original order -> (B, H, N, D) in every head's order, padded."""
    b, h, n, d = x.shape
    pad = layout.n_padded - n
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    if not layout.any_permuted:
        return x
    order = layout.head_orders()  # (H, N)
    return torch.gather(x, 2, order[None, :, :, None].expand(b, h, -1, d))


def from_head_order(y: torch.Tensor, layout: BlockLayout, n: int) -> torch.Tensor:
    """Inverse of :func:`to_head_order`: (B, H, N, D) -> (B, H, n, D)."""
    if layout.any_permuted:
        b, h, _, d = y.shape
        inverse = layout.head_inverse_orders()  # (H, N)
        y = torch.gather(y, 2, inverse[None, :, :, None].expand(b, h, -1, d))
    return y[:, :, :n]


def _chunks(b: int, h: int, layout: BlockLayout, kmax: int, budget: int) -> tuple[int, int]:
    """(query blocks, key slots) per step so that one score tile stays under budget."""
    row = b * h * layout.block_q * layout.block_k
    slots = max(1, min(kmax, budget // row))
    qblocks = max(1, budget // (row * slots))
    return qblocks, slots


class _Plan:
    """Per-call constants shared by forward and backward."""

    def __init__(self, layout: BlockLayout, n: int, h: int, device: torch.device) -> None:
        ell_idx, ell_full = _ELL.get(layout, BlockLayout.ell)
        group = layout.head_group.long().to(device)
        self.idx = ell_idx.to(device)[group]  # (H, NQB, K)
        self.full = ell_full.to(device)[group]
        self.orders = layout.head_orders().to(device)  # (H, N)
        self.korders = self.orders.view(h, layout.n_kblocks, layout.block_k)
        self.hidx = torch.arange(h, device=device)[:, None, None]
        self.heads = torch.arange(h, device=device).view(h, 1, 1, 1, 1)
        self.zero = torch.zeros((), dtype=torch.long, device=device)
        self.layout, self.n = layout, n

    def tile(self, c0: int, c1: int, s0: int, s1: int):
        """Key-block ids (clamped), and the allowed mask (H, C, BQ, S, BK) of one tile."""
        lay = self.layout
        idx = self.idx[:, c0:c1, s0:s1]  # (H, C, S)
        kb = idx.clamp(min=0)
        qo = self.orders[:, c0 * lay.block_q : c1 * lay.block_q].view(
            idx.shape[0], c1 - c0, lay.block_q
        )  # (H, C, BQ) original positions
        ko = self.korders[self.hidx, kb]  # (H, C, S, BK)
        allowed = lay.pattern.mask_mod(
            self.zero, self.heads, qo[:, :, :, None, None], ko[:, :, None, :, :]
        )
        allowed = allowed & (ko < self.n)[:, :, None]
        allowed = allowed | self.full[:, c0:c1, s0:s1][:, :, None, :, None]
        allowed = allowed & (idx >= 0)[:, :, None, :, None]
        return kb, allowed


def _forward(q, k, v, layout: BlockLayout, n: int, scale: float, budget: int):
    """(out, lse) in the heads' order: the online softmax over the block lists."""
    b, h, big_n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    nqb, nkb = big_n // bq, big_n // bk
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    plan = _Plan(layout, n, h, q.device)
    kmax = plan.idx.shape[-1]
    cq, cs = _chunks(b, h, layout, kmax, budget)
    qv = q.view(b, h, nqb, bq, d)
    kv = k.view(b, h, nkb, bk, d)
    vv = v.view(b, h, nkb, bk, d)
    out = torch.empty(b, h, nqb, bq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, nqb, bq, dtype=compute, device=q.device)
    for c0 in range(0, nqb, cq):
        c1 = min(nqb, c0 + cq)
        qc = qv[:, :, c0:c1].to(compute)  # (B, H, C, BQ, D)
        m = torch.full(qc.shape[:-1], float("-inf"), dtype=compute, device=q.device)
        denom = torch.zeros_like(m)
        acc = torch.zeros_like(qc)
        for s0 in range(0, kmax, cs):
            s1 = min(kmax, s0 + cs)
            kb, allowed = plan.tile(c0, c1, s0, s1)
            kc = kv[:, plan.hidx, kb].to(compute)  # (B, H, C, S, BK, D)
            vc = vv[:, plan.hidx, kb].to(compute)
            s = torch.einsum("bhcqd,bhcskd->bhcqsk", qc, kc) * scale
            s = s.masked_fill(~allowed, float("-inf")).flatten(-2)  # (B, H, C, BQ, S*BK)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            denom = denom * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("bhcqs,bhcsd->bhcqd", p, vc.flatten(3, 4))
            m = m_new
        empty = denom == 0
        out[:, :, c0:c1] = (acc / torch.where(empty, 1.0, denom)[..., None]).to(q.dtype)
        lse[:, :, c0:c1] = torch.where(empty, float("-inf"), m + torch.log(denom))
    return out.view(b, h, big_n, d), lse.view(b, h, big_n)


def _backward(q, k, v, out, lse, dout, layout: BlockLayout, n: int, scale: float, budget: int):
    """(dq, dk, dv): probabilities recomputed from the saved log-sum-exp."""
    b, h, big_n, d = q.shape
    bq, bk = layout.block_q, layout.block_k
    nqb, nkb = big_n // bq, big_n // bk
    compute = lse.dtype
    plan = _Plan(layout, n, h, q.device)
    kmax = plan.idx.shape[-1]
    cq, cs = _chunks(b, h, layout, kmax, budget)
    qv = q.view(b, h, nqb, bq, d)
    kv = k.view(b, h, nkb, bk, d)
    vv = v.view(b, h, nkb, bk, d)
    dov = dout.view(b, h, nqb, bq, d)
    delta = (dout.to(compute) * out.to(compute)).sum(-1).view(b, h, nqb, bq)
    lse_safe = torch.where(torch.isinf(lse), 0.0, lse).view(b, h, nqb, bq)
    dq = torch.zeros(b, h, nqb, bq, d, dtype=compute, device=q.device)
    dk = torch.zeros(b, h * nkb, bk * d, dtype=compute, device=q.device)
    dv = torch.zeros_like(dk)
    for c0 in range(0, nqb, cq):
        c1 = min(nqb, c0 + cq)
        qc = qv[:, :, c0:c1].to(compute)
        doc = dov[:, :, c0:c1].to(compute)
        for s0 in range(0, kmax, cs):
            s1 = min(kmax, s0 + cs)
            kb, allowed = plan.tile(c0, c1, s0, s1)
            kc = kv[:, plan.hidx, kb].to(compute).flatten(3, 4)  # (B, H, C, S*BK, D)
            vc = vv[:, plan.hidx, kb].to(compute).flatten(3, 4)
            s = torch.einsum("bhcqd,bhcsd->bhcqs", qc, kc) * scale
            p = torch.exp(s - lse_safe[:, :, c0:c1, :, None])
            p = p * allowed.flatten(-2)
            dp = torch.einsum("bhcqd,bhcsd->bhcqs", doc, vc)
            ds = p * (dp - delta[:, :, c0:c1, :, None]) * scale
            dq[:, :, c0:c1] += torch.einsum("bhcqs,bhcsd->bhcqd", ds, kc)
            n_slots = (c1 - c0) * (s1 - s0)
            flat = (plan.hidx * nkb + kb).reshape(-1)  # (H * C * S)
            dv_tile = torch.einsum("bhcqs,bhcqd->bhcsd", p, doc)
            dk_tile = torch.einsum("bhcqs,bhcqd->bhcsd", ds, qc)
            dv.index_add_(1, flat, dv_tile.reshape(b, h * n_slots, bk * d))
            dk.index_add_(1, flat, dk_tile.reshape(b, h * n_slots, bk * d))
    dq = dq.view(b, h, big_n, d).to(q.dtype)
    dk = dk.view(b, h, big_n, d).to(k.dtype)
    dv = dv.view(b, h, big_n, d).to(v.dtype)
    return dq, dk, dv


# Custom ops (the layout travels as its uid): torch.compile sees one opaque op with a
# known output shape instead of tracing the Python loops, which depend on the layout.
@torch.library.custom_op("sparse_transformer::blocksparse_torch_fwd", mutates_args=())
def blocksparse_torch_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, uid: int, n: int, scale: float, budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward in the heads' order: (out, lse in nats, fp32 or fp64)."""
    return _forward(q, k, v, layout_by_uid(uid), n, scale, budget)


@blocksparse_torch_fwd.register_fake
def _(q, k, v, uid, n, scale, budget):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=compute)


@torch.library.custom_op("sparse_transformer::blocksparse_torch_bwd", mutates_args=())
def blocksparse_torch_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    uid: int,
    n: int,
    scale: float,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward in the heads' order: (dq, dk, dv)."""
    return _backward(q, k, v, out, lse, dout, layout_by_uid(uid), n, scale, budget)


@blocksparse_torch_bwd.register_fake
def _(q, k, v, out, lse, dout, uid, n, scale, budget):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, uid, n, scale, budget = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.args = uid, n, scale, budget
    ctx.layout = layout_by_uid(uid)  # alive until the backward has run


def _grad(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = blocksparse_torch_bwd(q, k, v, out, lse, dout.contiguous(), *ctx.args)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd(
    "sparse_transformer::blocksparse_torch_fwd", _grad, setup_context=_setup_context
)


def blocksparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention of (B, H, n, D) inputs in the original order."""
    n, d = q.shape[2], q.shape[3]
    scale = d**-0.5 if scale is None else scale
    qh, kh, vh = (to_head_order(x, layout) for x in (q, k, v))
    out, lse = blocksparse_torch_fwd(
        qh.contiguous(), kh.contiguous(), vh.contiguous(), layout.uid, n, float(scale),
        chunk_elements,
    )  # fmt: skip
    out = from_head_order(out, layout, n)
    if return_lse:
        return out, from_head_order(lse[..., None], layout, n)[..., 0].float()
    return out
