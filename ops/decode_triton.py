"""The Triton kernel of ``ops.decode.decode_attention``: one program per (sequence, head).

Each program loads its query once, then walks the head's S rows in blocks of
``BLOCK_S``: it loads the block's row numbers and readable flags, gathers those
rows' keys and values from the cache buffer, and keeps an online softmax (the
running maximum m, the running sum l and the weighted values acc, all fp32), so
scores, softmax and weighted sum are one kernel. A block with nothing readable
loads no keys or values (the padding that heads reading fewer rows carry).
Dot products are elementwise products summed in fp32: one query row does not
fill a tensor-core tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    Q,
    KV,
    ROWS,
    OK,
    OUT,
    scale,
    S,
    H,
    stride_qb,
    stride_qh,
    stride_kvb,
    stride_kvr,
    stride_rh,
    stride_okh,
    stride_ob,
    stride_oh,
    D_QK: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DQ: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    dq = tl.arange(0, BLOCK_DQ)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + dq, mask=dq < D_QK, other=0.0)
    q = q.to(tl.float32) * scale
    kv_b = KV + b.to(tl.int64) * stride_kvb
    offs = tl.arange(0, BLOCK_S)
    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)  # a scalar: -inf
    l = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)  # a scalar: 0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for start in range(0, S, BLOCK_S):
        s = start + offs
        ok = tl.load(OK + h * stride_okh + s, mask=s < S, other=0) != 0
        if tl.max(ok.to(tl.int32), 0) > 0:
            row = tl.load(ROWS + h * stride_rh + s, mask=ok, other=0).to(tl.int64)
            ptr = kv_b + row[:, None] * stride_kvr
            k = tl.load(ptr + dq[None, :], mask=ok[:, None] & (dq[None, :] < D_QK), other=0.0)
            score = tl.sum(k.to(tl.float32) * q[None, :], 1)  # (BLOCK_S,)
            score = tl.where(ok, score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, 0))  # finite: something is readable
            alpha = tl.exp(m - m_new)  # 0 while m is -inf
            p = tl.exp(score - m_new)  # 0 where unreadable
            v = tl.load(ptr + D_QK + dv[None, :], mask=ok[:, None] & (dv[None, :] < D_V), other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
            l = l * alpha + tl.sum(p, 0)
            m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)
    tl.store(OUT + b * stride_ob + h * stride_oh + dv, out.to(OUT.dtype.element_ty), mask=dv < D_V)


def launch(
    q: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    readable: torch.Tensor,
    scale: float,
    d_qk: int,
) -> torch.Tensor:
    """Run ``_decode_kernel``: q (B, H, d_qk), kv (B, R, d_qk + d_v), rows and readable
    (H, S) -> (B, H, d_v). Inputs that are not contiguous are copied first (the static
    cache's are)."""
    batch, heads, _ = q.shape
    d_v = kv.shape[2] - d_qk
    out = q.new_empty(batch, heads, d_v)
    q, kv, rows = q.contiguous(), kv.contiguous(), rows.contiguous()
    ok = readable.contiguous().view(torch.uint8)
    n = rows.shape[1]
    block_s = min(128, triton.next_power_of_2(max(n, 16)))
    _decode_kernel[(batch * heads,)](
        q, kv, rows, ok, out, scale, n, heads,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
        rows.stride(0), ok.stride(0), out.stride(0), out.stride(1),
        D_QK=d_qk, D_V=d_v, BLOCK_S=block_s,
        BLOCK_DQ=triton.next_power_of_2(d_qk), BLOCK_DV=triton.next_power_of_2(d_v),
        num_warps=4,
    )  # fmt: skip
    return out
