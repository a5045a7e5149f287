"""Block-sparse causal attention in Triton: the ``triton`` backend.

Forward: one program per (query block, batch x head) walks the query block's
list of key blocks (``layout.q2k_*``) with an online softmax in fp32 (base 2),
applying the element mask only on blocks the layout flags partial; blocks
outside the layout are never touched. It stores the output and the row
log-sum-exp.

Backward (deterministic, no atomics): one program per (key block, batch x head)
walks the transposed lists (``layout.k2q_*``) and accumulates dK and dV in
registers; one program per (query block, batch x head) walks the query-major
lists for dQ. Probabilities are recomputed from the saved log-sum-exp.

Heads that run in the transposed (R, l) order (strided A2) are handled inside
the kernels: a program's rows are positions of the head's order, mapped to
original rows by ``p -> (p % R) * l + p // R``; every load and store goes
through that map, so no permuted copy of q, k, v is ever made. Rows at or
beyond n load as zeros and are never stored.

The pattern's component kinds are compile-time constants: the heads are
launched in groups that share them (for example the A1 and the A2 heads of a
multi-head layer), and the row/column predicates are computed on vectors, so a
partial block costs little more than a full one. The numbers of each head group
(its order, its components' sizes and summary windows) are one row of a small
int32 table, :class:`GroupRow`; the kernels read its columns, and compare the
kinds, through ``tl.constexpr`` globals made from those names and from the
layout's ``PART_*`` kinds, so host and kernels share one definition. A layout's
table and launches are built once, in this module's ``LayoutCache``, and are
freed with the layout.

Registered as the custom ops ``sparse_transformer::block_sparse_attn_fwd`` /
``_bwd`` with fake implementations, so ``torch.compile`` and activation
checkpointing see a known op.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from sparse_transformer.ops.layout import (
    PART_BAND,
    PART_CHUNK,
    PART_COLUMN,
    PART_SUMMARY,
    BlockLayout,
    HeadSpec,
    LayoutCache,
    Part,
    layout_by_uid,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
NO_PART = -1
"""The kind of a group's second component when it has only one."""
_INT32_BIG = 1 << 30
POISON_OUTPUTS = False
"""Tests set this: outputs start as NaN instead of uninitialised memory, so an
element a kernel fails to write shows."""


class GroupRow(NamedTuple):
    """One row of the kernels' per-group table (int32): a head group's order and its
    one or two pattern components (see ``layout.Part``)."""

    perm_stride: int
    """l of the group's transposed (R, l) order; 0 for the natural order."""
    rows: int
    """R = ceil(n / l) of the transposed order; 1 for the natural order."""
    size0: int
    """The first component's width (band), length (chunk) or period (column, summary)."""
    lo0: int
    """The first component's summary window is [lo0, hi0) (0, 0 for other kinds)."""
    hi0: int
    size1: int
    """The second component's, as the first's (1, 0, 0 when there is none)."""
    lo1: int
    hi1: int


def _new_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan")) if POISON_OUTPUTS else torch.empty_like(x)


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
# Compile-time constants of the kernels, made from the very numbers the host side uses
# (Triton reads a module global inside @triton.jit only if it is a tl.constexpr).
_BAND = tl.constexpr(PART_BAND)
_CHUNK = tl.constexpr(PART_CHUNK)
_COLUMN = tl.constexpr(PART_COLUMN)
_NO_PART = tl.constexpr(NO_PART)
_GROUP_COLUMNS = tl.constexpr(len(GroupRow._fields))
_COL_PERM_STRIDE = tl.constexpr(GroupRow._fields.index("perm_stride"))
_COL_ROWS = tl.constexpr(GroupRow._fields.index("rows"))
_COL_SIZE0 = tl.constexpr(GroupRow._fields.index("size0"))
_COL_LO0 = tl.constexpr(GroupRow._fields.index("lo0"))
_COL_HI0 = tl.constexpr(GroupRow._fields.index("hi0"))
_COL_SIZE1 = tl.constexpr(GroupRow._fields.index("size1"))
_COL_LO1 = tl.constexpr(GroupRow._fields.index("lo1"))
_COL_HI1 = tl.constexpr(GroupRow._fields.index("hi1"))


@triton.jit
def _program_head(heads, head_group, group_table, HS):
    """This program's batch ``b``, head ``h``, the head's group ``g``, the group's table
    row and its order (``perm_l``, ``rows``). Program axis 1 runs over batch x the
    launch's ``HS`` heads."""
    bh = tl.program_id(1)
    b = bh // HS
    h = tl.load(heads + bh % HS)
    g = tl.load(head_group + h)
    group_row = group_table + g * _GROUP_COLUMNS
    perm_l = tl.load(group_row + _COL_PERM_STRIDE)
    rows = tl.load(group_row + _COL_ROWS)
    return b, h, g, group_row, perm_l, rows


@triton.jit
def _block_rows(blk, BLOCK: tl.constexpr, perm_l, rows, n, PERMUTED: tl.constexpr):
    """Block ``blk``'s head-order positions ``p``, their original rows and which of
    those are real rows (below n)."""
    p = blk * BLOCK + tl.arange(0, BLOCK)
    if PERMUTED:
        orig = tl.where(p < rows * perm_l, (p % rows) * perm_l + p // rows, p)
    else:
        orig = p
    return p, orig, orig < n


@triton.jit
def _block_list(indptr, g, blk, NBLK):
    """[start, end) of block ``blk``'s entries in group ``g``'s CSR lists."""
    ptr = indptr + g * (NBLK + 1) + blk
    return tl.load(ptr), tl.load(ptr + 1)


@triton.jit
def _load_tile(base, orig, valid, stride, offs_d):
    """Rows ``orig`` of the (n, D) matrix at ``base`` (row stride ``stride``); zeros
    for rows that are not ``valid``."""
    return tl.load(base + orig[:, None] * stride + offs_d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _store_tile(base, orig, valid, stride, offs_d, x):
    """Store ``x`` as rows ``orig`` of the (n, D) matrix at ``base``, real rows only."""
    tl.store(
        base + orig[:, None] * stride + offs_d[None, :],
        x.to(base.dtype.element_ty),
        mask=valid[:, None],
    )


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, orig, valid):
    """The forward's log-sum-exp of rows ``orig`` (+inf where a row read nothing, so
    its probabilities come out 0) and delta = rowsum(dO * O)."""
    lse = tl.load(LSE + row_base + orig, mask=valid, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_base + orig, mask=valid, other=0.0)
    return lse, delta


@triton.jit
def _part_mask(i, j, KIND: tl.constexpr, size, lo, hi):
    """Is (i, j) allowed by one component? ``i`` and ``j`` broadcast to the tile;
    ``size`` is the component's width, length or period (``GroupRow``)."""
    causal = j <= i
    if KIND == _BAND:  # 0 <= i - j < width
        m = causal & (i - j < size)
    elif KIND == _CHUNK:  # the same chunk of length
        m = causal & ((i // size) == (j // size))
    elif KIND == _COLUMN:  # the same residue mod period
        m = causal & ((i % size) == (j % size))
    else:  # summary: the cells lo <= j % period < hi
        r = j % size
        m = causal & (r >= lo) & (r < hi)
    return m


@triton.jit
def _allowed(i, j, group_row, KIND0: tl.constexpr, KIND1: tl.constexpr):
    m = _part_mask(
        i,
        j,
        KIND0,
        tl.load(group_row + _COL_SIZE0),
        tl.load(group_row + _COL_LO0),
        tl.load(group_row + _COL_HI0),
    )
    if KIND1 != _NO_PART:
        m = m | _part_mask(
            i,
            j,
            KIND1,
            tl.load(group_row + _COL_SIZE1),
            tl.load(group_row + _COL_LO1),
            tl.load(group_row + _COL_HI1),
        )
    return m


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    heads, head_group, group_table,
    indptr, index, full,
    sm_scale_log2, n, H, HS, NQB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    KIND0: tl.constexpr, KIND1: tl.constexpr, PERMUTED: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    b, h, g, group_row, perm_l, rows = _program_head(heads, head_group, group_table, HS)
    p_q, o_q, v_q = _block_rows(qb, BLOCK_Q, perm_l, rows, n, PERMUTED)
    offs_d = tl.arange(0, D)
    q = _load_tile(Q + b * sqb + h * sqh, o_q, v_q, sqn, offs_d)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)

    start, end = _block_list(indptr, g, qb, NQB)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for e in range(start, end):
        kb = tl.load(index + e)
        is_full = tl.load(full + e)
        p_k, o_k, v_k = _block_rows(kb, BLOCK_K, perm_l, rows, n, PERMUTED)
        k = _load_tile(k_base, o_k, v_k, skn, offs_d)
        v = _load_tile(v_base, o_k, v_k, svn, offs_d)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        if is_full == 0:
            allowed = _allowed(p_q[:, None], p_k[None, :], group_row, KIND0, KIND1)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    _store_tile(O + b * sob + h * soh, o_q, v_q, son, offs_d, out)
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + (b * H + h) * n + o_q, lse, mask=v_q)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    heads, head_group, group_table,
    indptr, index, full,
    sm_scale, sm_scale_log2, n, H, HS, NQB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    KIND0: tl.constexpr, KIND1: tl.constexpr, PERMUTED: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    b, h, g, group_row, perm_l, rows = _program_head(heads, head_group, group_table, HS)
    p_q, o_q, v_q = _block_rows(qb, BLOCK_Q, perm_l, rows, n, PERMUTED)
    offs_d = tl.arange(0, D)
    q = _load_tile(Q + b * sqb + h * sqh, o_q, v_q, sqn, offs_d)
    do = _load_tile(DO + b * sdob + h * sdoh, o_q, v_q, sdon, offs_d)
    lse, delta = _load_row_stats(LSE, DELTA, (b * H + h) * n, o_q, v_q)
    dq = tl.zeros([BLOCK_Q, D], tl.float32)

    start, end = _block_list(indptr, g, qb, NQB)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    for e in range(start, end):
        kb = tl.load(index + e)
        is_full = tl.load(full + e)
        p_k, o_k, v_k = _block_rows(kb, BLOCK_K, perm_l, rows, n, PERMUTED)
        k = _load_tile(k_base, o_k, v_k, skn, offs_d)
        v = _load_tile(v_base, o_k, v_k, svn, offs_d)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        p = tl.math.exp2(s - lse[:, None])
        if is_full == 0:
            allowed = _allowed(p_q[:, None], p_k[None, :], group_row, KIND0, KIND1)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    _store_tile(DQ + b * sdqb + h * sdqh, o_q, v_q, sdqn, offs_d, dq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    heads, head_group, group_table,
    indptr, index, full,
    sm_scale, sm_scale_log2, n, H, HS, NKB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    KIND0: tl.constexpr, KIND1: tl.constexpr, PERMUTED: tl.constexpr,
):  # fmt: skip
    kb = tl.program_id(0)
    b, h, g, group_row, perm_l, rows = _program_head(heads, head_group, group_table, HS)
    p_k, o_k, v_k = _block_rows(kb, BLOCK_K, perm_l, rows, n, PERMUTED)
    offs_d = tl.arange(0, D)
    k = _load_tile(K + b * skb + h * skh, o_k, v_k, skn, offs_d)
    v = _load_tile(V + b * svb + h * svh, o_k, v_k, svn, offs_d)
    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)

    start, end = _block_list(indptr, g, kb, NKB)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    row_base = (b * H + h) * n
    for e in range(start, end):
        qb = tl.load(index + e)
        is_full = tl.load(full + e)
        p_q, o_q, v_q = _block_rows(qb, BLOCK_Q, perm_l, rows, n, PERMUTED)
        q = _load_tile(q_base, o_q, v_q, sqn, offs_d)
        do = _load_tile(do_base, o_q, v_q, sdon, offs_d)
        lse, delta = _load_row_stats(LSE, DELTA, row_base, o_q, v_q)
        st = tl.dot(k, tl.trans(q)) * sm_scale_log2  # (BLOCK_K, BLOCK_Q)
        pt = tl.math.exp2(st - lse[None, :])
        if is_full == 0:
            allowed = _allowed(p_q[None, :], p_k[:, None], group_row, KIND0, KIND1)
            pt = tl.where(allowed, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)

    dk = dk * sm_scale
    _store_tile(DK + b * sdkb + h * sdkh, o_k, v_k, sdkn, offs_d, dk)
    _store_tile(DV + b * sdvb + h * sdvh, o_k, v_k, sdvn, offs_d, dv)


# ----------------------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------------------
class _Launch(NamedTuple):
    """One launch of each kernel: the heads whose groups share the kernels' compile-time
    signature (the kinds of their components, whether their order is transposed)."""

    kind0: int
    kind1: int
    permuted: bool
    heads: torch.Tensor  # (HS,) int32


class _LaunchPlan(NamedTuple):
    """What the kernels read of a layout besides its CSR lists."""

    table: torch.Tensor  # (G, len(GroupRow._fields)) int32: one GroupRow per group
    launches: list[_Launch]


_PLANS: LayoutCache[_LaunchPlan] = LayoutCache("triton backend: launch plans")


def _part_size(part: Part) -> int:
    """The one length ``_part_mask`` reads for ``part``."""
    if part.kind == PART_BAND:
        return part.width
    if part.kind == PART_CHUNK:
        return part.length
    assert part.kind in (PART_COLUMN, PART_SUMMARY)
    return part.period


def _group_row(spec: HeadSpec, n: int) -> tuple[GroupRow, int, int]:
    """A group's table row and the kinds of its two components (``NO_PART`` for none)."""
    if len(spec.parts) > 2:
        raise ValueError("triton backend: at most two components per head")
    cols, kinds = [], []
    for part in spec.parts:
        cols += [min(_part_size(part), _INT32_BIG), part.lo, part.hi]
        kinds.append(part.kind)
    while len(kinds) < 2:
        cols += [1, 0, 0]
        kinds.append(NO_PART)
    rows = -(-n // spec.perm_stride) if spec.perm_stride else 1
    return GroupRow(spec.perm_stride, rows, *cols), kinds[0], kinds[1]


def _build_plan(layout: BlockLayout) -> _LaunchPlan:
    table, sig_of_group = [], []
    for spec in layout.specs:
        row, kind0, kind1 = _group_row(spec, layout.n)
        table.append(row)
        sig_of_group.append((kind0, kind1, bool(spec.perm_stride)))
    sigs: dict[tuple[int, int, bool], list[int]] = {}
    for h, g in enumerate(layout.head_group.tolist()):
        sigs.setdefault(sig_of_group[g], []).append(h)
    dev = layout.device
    return _LaunchPlan(
        table=torch.tensor(table, dtype=torch.int32, device=dev),
        launches=[
            _Launch(k0, k1, perm, torch.tensor(hs, dtype=torch.int32, device=dev))
            for (k0, k1, perm), hs in sigs.items()
        ],
    )


def _launch_plan(layout: BlockLayout) -> _LaunchPlan:
    """The layout's group table and launches, built once per layout and freed with it."""
    return _PLANS.get(layout, _build_plan)


_TUNE_KEY = ["D", "BLOCK_Q", "BLOCK_K", "KIND0", "KIND1", "PERMUTED"]
_TUNE_CONFIGS = [
    triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (4, 3), (8, 2), (8, 3))
]


def _tuned(kernel):
    """Autotuned launcher on a GPU; the plain kernel (Triton's default warps and
    stages) under TRITON_INTERPRET=1 or with SPARSE_TRANSFORMER_AUTOTUNE=0, which
    the correctness tests set to keep compile time down."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel
    if os.environ.get("SPARSE_TRANSFORMER_AUTOTUNE", "1") == "0":
        return kernel
    return triton.autotune(configs=_TUNE_CONFIGS, key=_TUNE_KEY)(kernel)


_TUNED = {k: _tuned(k) for k in (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel)}


def _launcher(kernel):
    """The autotuned launcher of ``kernel``, or the kernel at its fixed default
    configuration under ``torch.use_deterministic_algorithms``: the autotuner picks a
    configuration by timing in each process, and configurations may round differently,
    so a restarted process could compute other bits (PyTorch's Inductor likewise stops
    autotuning in deterministic mode)."""
    return kernel if torch.are_deterministic_algorithms_enabled() else _TUNED[kernel]


def autotuned_configs() -> dict[str, list[str]]:
    """The launch configuration the autotuner chose for each kernel and key, this process."""
    out = {}
    for kernel, tuned in _TUNED.items():
        cache = getattr(tuned, "cache", {})
        out[kernel.fn.__name__] = sorted(f"{key}: {cfg}" for key, cfg in cache.items())
    return out


def supports(q: torch.Tensor, layout: BlockLayout) -> bool:
    """Can the kernels run these inputs?"""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and layout.block_q >= 16
        and layout.block_k >= 16
        and all(len(s.parts) <= 2 for s in layout.specs)
    )


def _fwd_impl(q, k, v, layout: BlockLayout, scale: float):
    b, h, n, d = q.shape
    plan = _launch_plan(layout)
    out = _new_like(q)
    lse = _new_like(q.new_empty(b, h, n, dtype=torch.float32))
    for launch in plan.launches:
        hs = launch.heads.numel()
        grid = (layout.n_qblocks, b * hs)
        _launcher(_fwd_kernel)[grid](
            q, k, v, out, lse,
            launch.heads, layout.head_group, plan.table,
            layout.q2k_indptr, layout.q2k_index, layout.q2k_full,
            scale * LOG2E, n, h, hs, layout.n_qblocks,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            D=d, BLOCK_Q=layout.block_q, BLOCK_K=layout.block_k,
            KIND0=launch.kind0, KIND1=launch.kind1, PERMUTED=launch.permuted,
        )  # fmt: skip
    return out, lse


def _bwd_impl(q, k, v, out, lse, dout, layout: BlockLayout, scale: float):
    b, h, n, d = q.shape
    plan = _launch_plan(layout)
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (B, H, n)
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    for launch in plan.launches:
        hs = launch.heads.numel()
        _launcher(_bwd_dq_kernel)[(layout.n_qblocks, b * hs)](
            q, k, v, dout, dq, lse, delta,
            launch.heads, layout.head_group, plan.table,
            layout.q2k_indptr, layout.q2k_index, layout.q2k_full,
            scale, scale * LOG2E, n, h, hs, layout.n_qblocks,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            D=d, BLOCK_Q=layout.block_q, BLOCK_K=layout.block_k,
            KIND0=launch.kind0, KIND1=launch.kind1, PERMUTED=launch.permuted,
        )  # fmt: skip
        _launcher(_bwd_dkdv_kernel)[(layout.n_kblocks, b * hs)](
            q, k, v, dout, dk, dv, lse, delta,
            launch.heads, layout.head_group, plan.table,
            layout.k2q_indptr, layout.k2q_index, layout.k2q_full,
            scale, scale * LOG2E, n, h, hs, layout.n_kblocks,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            D=d, BLOCK_Q=layout.block_q, BLOCK_K=layout.block_k,
            KIND0=launch.kind0, KIND1=launch.kind1, PERMUTED=launch.permuted,
        )  # fmt: skip
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------
# Layouts are not tensors: the ops receive their tensors and the layout's ``uid``, and
# look the parsed plan up through ``layout_by_uid``; a compiled graph bakes the uid in.
@torch.library.custom_op("sparse_transformer::block_sparse_attn_fwd", mutates_args=())
def block_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_id: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the Triton kernels: (out, lse in base 2)."""
    return _fwd_impl(q, k, v, layout_by_uid(layout_id), scale)


@block_sparse_attn_fwd.register_fake
def _(q, k, v, layout_id, scale):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("sparse_transformer::block_sparse_attn_bwd", mutates_args=())
def block_sparse_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    layout_id: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the Triton kernels: (dq, dk, dv)."""
    return _bwd_impl(q, k, v, out, lse, dout, layout_by_uid(layout_id), scale)


@block_sparse_attn_bwd.register_fake
def _(q, k, v, out, lse, dout, layout_id, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, layout_id, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.layout_id, ctx.scale = layout_id, scale
    ctx.layout = layout_by_uid(layout_id)  # alive until the backward has run


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = block_sparse_attn_bwd(q, k, v, out, lse, dout, ctx.layout_id, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd(
    "sparse_transformer::block_sparse_attn_fwd", _backward, setup_context=_setup_context
)


def triton_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse causal attention of (B, H, n, D) tensors with the Triton kernels."""
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"sparse_attention: the triton backend supports d_head in {SUPPORTED_HEAD_DIMS}, "
            f"got {d}"
        )
    if q.dtype == torch.float64:
        raise ValueError("sparse_attention: the triton backend does not support fp64")
    if layout.block_q < 16 or layout.block_k < 16:
        raise ValueError("sparse_attention: the triton backend needs blocks of at least 16")
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse2 = block_sparse_attn_fwd(q, k, v, layout.uid, scale)
    if return_lse:
        return out, lse2 * math.log(2.0)
    return out


__all__ = [
    "NO_PART",
    "SUPPORTED_HEAD_DIMS",
    "GroupRow",
    "autotuned_configs",
    "block_sparse_attn_bwd",
    "block_sparse_attn_fwd",
    "supports",
    "triton_sparse_attention",
]
