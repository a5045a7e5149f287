"""Block-sparse causal attention in Triton: the ``triton`` backend.

Forward: one program per (batch x head, query block) walks the query block's
list of key blocks (``layout.q2k_*``) with an online softmax in fp32 (base 2),
applying the element mask only on blocks the layout flags partial; blocks
outside the layout are never touched. It stores the output and the row
log-sum-exp.

Backward (deterministic, no atomics): a small kernel computes rowsum(dO * O)
straight from the low-precision tensors; one program per (batch x head, key
block) walks the transposed lists (``layout.k2q_*``) and accumulates dK and dV in
registers, transposed (``TRANS``: D x BLOCK_K, so Hopper's tensor cores get the 64
rows they need) when the head is wider than the key block (``transposed_dkdv``); one
program per
(batch x head, query block) walks the query-major lists for dQ. Probabilities are
recomputed from the saved log-sum-exp.

One launch of each kernel covers every head. A head's group (``layout.head_group``)
is one row of a small int32 table, :class:`GroupRow`: its order and its one or two
pattern components, whose kinds the kernels read at run time (the predicates are
computed on vectors, and only on partial blocks, so this costs little). The
kernels read the table's columns, and compare the kinds, through ``tl.constexpr``
globals made from those names and from the layout's ``PART_*`` kinds, so host and
kernels share one definition. Each group's blocks run longest list first (the
summary blocks of fixed patterns are read by every later query block), so no long
program is left running alone at the end of the grid. A layout's table and block
orders are built once, in this module's ``LayoutCache``, and freed with the layout.

Heads that run in the transposed (R, l) order (strided A2) are handled inside
the kernels: a program's rows are positions of the head's order, mapped to
original rows by ``p -> (p % R) * l + p // R`` (the identity for the natural order,
whose row has l = 0, R = 1); every load and store goes through that map, so no
permuted copy of q, k, v is ever made. Rows at or beyond n load as zeros and are
never stored.

The pipeline depth is autotuned per shape; without the autotuner
(``torch.use_deterministic_algorithms``, the interpreter, tests) the kernels run at
Triton's defaults. A launch goes through Triton's launch path once per launch signature;
later ones call the compiled kernel's own launcher (``_cached_launch``), which costs a
third or less of the host time.

Registered as the custom ops ``sparse_transformer::block_sparse_attn_fwd`` /
``_bwd`` with fake implementations, so ``torch.compile`` and activation
checkpointing see a known op.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from sparse_transformer.ops.attention import _triton_interpreter
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
    kind0: int
    """The first component's kind (``PART_*``)."""
    size0: int
    """The first component's width (band), length (chunk) or period (column, summary)."""
    lo0: int
    """The first component's summary window is [lo0, hi0) (0, 0 for other kinds)."""
    hi0: int
    kind1: int
    """The second component's, as the first's (``NO_PART``, 1, 0, 0 when there is none)."""
    size1: int
    lo1: int
    hi1: int


def _new_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan")) if POISON_OUTPUTS else torch.empty_like(x)


def _new_row_stats(q: torch.Tensor) -> torch.Tensor:
    """(B, H, n) fp32, contiguous: one number per row of q (the log-sum-exp)."""
    shape, dev = q.shape[:3], q.device
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=dev)
    return torch.empty(shape, dtype=torch.float32, device=dev)


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
_COL_KIND0 = tl.constexpr(GroupRow._fields.index("kind0"))
_COL_SIZE0 = tl.constexpr(GroupRow._fields.index("size0"))
_COL_LO0 = tl.constexpr(GroupRow._fields.index("lo0"))
_COL_HI0 = tl.constexpr(GroupRow._fields.index("hi0"))
_COL_KIND1 = tl.constexpr(GroupRow._fields.index("kind1"))
_COL_SIZE1 = tl.constexpr(GroupRow._fields.index("size1"))
_COL_LO1 = tl.constexpr(GroupRow._fields.index("lo1"))
_COL_HI1 = tl.constexpr(GroupRow._fields.index("hi1"))


@triton.jit
def _program(H, head_group, group_table, order, NBLK):
    """This program's batch ``b``, head ``h``, the head's group ``g``, its block ``blk``,
    the group's table row and its order (``perm_l``, ``rows``). Axis 0 runs over
    batch x heads; axis 1 over the group's blocks, longest list first (``order``)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = tl.load(head_group + h)
    blk = tl.load(order + g * NBLK + tl.program_id(1))
    group_row = group_table + g * _GROUP_COLUMNS
    perm_l = tl.load(group_row + _COL_PERM_STRIDE)
    rows = tl.load(group_row + _COL_ROWS)
    return b, h, g, blk, group_row, perm_l, rows


@triton.jit
def _orig_rows(p, perm_l, rows, n, PERMUTED: tl.constexpr):
    """Original rows of head-order positions ``p`` and which are real (below n). The
    natural order (``perm_l`` 0) is the identity; PERMUTED is whether any group of the
    layout is transposed, so layouts without one never pay for the division."""
    orig = p
    if PERMUTED:  # noqa: SIM102 (compile-time test, then run-time test)
        if perm_l != 0:
            orig = tl.where(p < rows * perm_l, (p % rows) * perm_l + p // rows, p)
    return orig, (orig < n) & (p >= 0)


@triton.jit
def _block_rows(blk, BLOCK: tl.constexpr, perm_l, rows, n, PERMUTED: tl.constexpr):
    """Block ``blk``'s head-order positions ``p``, their original rows and which of
    those are real rows."""
    p = blk * BLOCK + tl.arange(0, BLOCK)
    orig, valid = _orig_rows(p, perm_l, rows, n, PERMUTED)
    return p, orig, valid


@triton.jit
def _key_block(index, full, e, BLOCK_K: tl.constexpr):
    """Positions (head order) of the key block ``index[e]`` and whether it is full."""
    p = tl.load(index + e) * BLOCK_K + tl.arange(0, BLOCK_K)
    return p, tl.load(full + e).to(tl.int32)


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
def _add_tile(base, orig, valid, stride, offs_d, x):
    """Add ``x`` (fp32) into rows ``orig`` of the (n, D) fp32 matrix at ``base``."""
    ptrs = base + orig[:, None] * stride + offs_d[None, :]
    tl.atomic_add(ptrs, x, mask=valid[:, None], sem="relaxed")


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, orig, valid):
    """The forward's log-sum-exp of rows ``orig`` (+inf where a row read nothing, so
    its probabilities come out 0) and delta = rowsum(dO * O)."""
    lse = tl.load(LSE + row_base + orig, mask=valid, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + row_base + orig, mask=valid, other=0.0)
    return lse, delta


@triton.jit
def _part_mask(i, j, kind, size, lo, hi):
    """Is (i, j) allowed by one component of kind ``kind``? ``i`` and ``j`` broadcast to
    the tile; ``size`` is the component's width, length or period (``GroupRow``)."""
    causal = j <= i
    if kind == _BAND:  # 0 <= i - j < width
        m = causal & (i - j < size)
    elif kind == _CHUNK:  # the same chunk of length
        m = causal & ((i // size) == (j // size))
    elif kind == _COLUMN:  # the same residue mod period
        m = causal & ((i % size) == (j % size))
    else:  # summary: the cells lo <= j % period < hi
        r = j % size
        m = causal & (r >= lo) & (r < hi)
    return m


@triton.jit
def _allowed(i, j, group_row):
    """The group's pattern at (i, j), key positions ``j`` < 0 (no key) excluded."""
    m = _part_mask(
        i,
        j,
        tl.load(group_row + _COL_KIND0),
        tl.load(group_row + _COL_SIZE0),
        tl.load(group_row + _COL_LO0),
        tl.load(group_row + _COL_HI0),
    )
    kind1 = tl.load(group_row + _COL_KIND1)
    if kind1 != _NO_PART:
        m = m | _part_mask(
            i,
            j,
            kind1,
            tl.load(group_row + _COL_SIZE1),
            tl.load(group_row + _COL_LO1),
            tl.load(group_row + _COL_HI1),
        )
    return m & (j >= 0)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    head_group, group_table, order,
    indptr, index, full,
    sm_scale_log2, n, H, NQB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PERMUTED: tl.constexpr,
):  # fmt: skip
    b, h, g, qb, group_row, perm_l, rows = _program(H, head_group, group_table, order, NQB)
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
        p_k, is_full = _key_block(index, full, e, BLOCK_K)
        o_k, v_k = _orig_rows(p_k, perm_l, rows, n, PERMUTED)
        k = _load_tile(k_base, o_k, v_k, skn, offs_d)
        v = _load_tile(v_base, o_k, v_k, svn, offs_d)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        if is_full == 0:
            s = tl.where(_allowed(p_q[:, None], p_k[None, :], group_row), s, float("-inf"))
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
def _bwd_delta_kernel(
    O, DO, DELTA, n, H,
    sob, soh, son, sdob, sdoh, sdon,
    D: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32, read straight from the low-precision tensors."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    r = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = r < n
    offs_d = tl.arange(0, D)
    o = _load_tile(O + b * sob + h * soh, r, valid, son, offs_d).to(tl.float32)
    do = _load_tile(DO + b * sdob + h * sdoh, r, valid, sdon, offs_d).to(tl.float32)
    tl.store(DELTA + bh * n + r, tl.sum(o * do, 1), mask=valid)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    head_group, group_table, order,
    indptr, index, full,
    sm_scale, sm_scale_log2, n, H, NQB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PERMUTED: tl.constexpr,
):  # fmt: skip
    b, h, g, qb, group_row, perm_l, rows = _program(H, head_group, group_table, order, NQB)
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
        p_k, is_full = _key_block(index, full, e, BLOCK_K)
        o_k, v_k = _orig_rows(p_k, perm_l, rows, n, PERMUTED)
        k = _load_tile(k_base, o_k, v_k, skn, offs_d)
        v = _load_tile(v_base, o_k, v_k, svn, offs_d)
        s = tl.dot(q, tl.trans(k)) * sm_scale_log2
        p = tl.math.exp2(s - lse[:, None])
        if is_full == 0:
            p = tl.where(_allowed(p_q[:, None], p_k[None, :], group_row), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq = dq * sm_scale
    _store_tile(DQ + b * sdqb + h * sdqh, o_q, v_q, sdqn, offs_d, dq)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA,
    head_group, group_table, order,
    indptr, index, full,
    sm_scale, sm_scale_log2, n, H, NKB,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, sdqb, sdqh, sdqn,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PERMUTED: tl.constexpr,
    TRANS: tl.constexpr, FUSED: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block. With TRANS the accumulators are dK^T and dV^T (D rows
    instead of BLOCK_K): the matmuls then have D rows, which Hopper's tensor cores need
    (64 at least) when key blocks are narrower than the head. With FUSED it also adds
    each query block's share of dQ into the fp32 ``DQ`` (atomics: the order of the
    additions, and so the last bits, vary from run to run); without, ``DQ`` is unused."""
    b, h, g, kb, group_row, perm_l, rows = _program(H, head_group, group_table, order, NKB)
    p_k, o_k, v_k = _block_rows(kb, BLOCK_K, perm_l, rows, n, PERMUTED)
    offs_d = tl.arange(0, D)
    k = _load_tile(K + b * skb + h * skh, o_k, v_k, skn, offs_d)
    v = _load_tile(V + b * svb + h * svh, o_k, v_k, svn, offs_d)
    if TRANS:
        dk = tl.zeros([D, BLOCK_K], tl.float32)
        dv = tl.zeros([D, BLOCK_K], tl.float32)
    else:
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
        if TRANS:  # P and dS as (BLOCK_Q, BLOCK_K)
            p = tl.math.exp2(tl.dot(q, tl.trans(k)) * sm_scale_log2 - lse[:, None])
            if is_full == 0:
                p = tl.where(_allowed(p_q[:, None], p_k[None, :], group_row), p, 0.0)
            dv += tl.dot(tl.trans(do), p.to(do.dtype))
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(q), ds.to(q.dtype))
            if FUSED:
                dq = tl.dot(ds.to(k.dtype), k) * sm_scale
                _add_tile(DQ + b * sdqb + h * sdqh, o_q, v_q, sdqn, offs_d, dq)
        else:  # P^T and dS^T as (BLOCK_K, BLOCK_Q)
            pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * sm_scale_log2 - lse[None, :])
            if is_full == 0:
                pt = tl.where(_allowed(p_q[None, :], p_k[:, None], group_row), pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do)
            dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
            if FUSED:
                dq = tl.dot(tl.trans(dst).to(k.dtype), k) * sm_scale
                _add_tile(DQ + b * sdqb + h * sdqh, o_q, v_q, sdqn, offs_d, dq)

    if TRANS:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    _store_tile(DK + b * sdkb + h * sdkh, o_k, v_k, sdkn, offs_d, dk * sm_scale)
    _store_tile(DV + b * sdvb + h * sdvh, o_k, v_k, sdvn, offs_d, dv)


# ----------------------------------------------------------------------------------------
# launch plumbing
# ----------------------------------------------------------------------------------------
class _LaunchPlan(NamedTuple):
    """What the kernels read of a layout besides its CSR lists. One launch of each kernel
    covers every head: the group's row says how to mask and order its blocks."""

    table: torch.Tensor  # (G, len(GroupRow._fields)) int32: one GroupRow per group
    q_order: torch.Tensor  # (G, NQB) int32: query blocks, longest key list first
    k_order: torch.Tensor  # (G, NKB) int32: key blocks, longest query list first


_PLANS: LayoutCache[_LaunchPlan] = LayoutCache("triton backend: launch plans")


def _part_size(part: Part) -> int:
    """The one length ``_part_mask`` reads for ``part``."""
    if part.kind == PART_BAND:
        return part.width
    if part.kind == PART_CHUNK:
        return part.length
    assert part.kind in (PART_COLUMN, PART_SUMMARY)
    return part.period


def _group_row(spec: HeadSpec, n: int) -> GroupRow:
    """A head group's row of the kernels' table."""
    if len(spec.parts) > 2:
        raise ValueError("triton backend: at most two components per head")
    cols = []
    for part in spec.parts:
        cols += [part.kind, min(_part_size(part), _INT32_BIG), part.lo, part.hi]
    if len(spec.parts) < 2:
        cols += [NO_PART, 1, 0, 0]
    rows = -(-n // spec.perm_stride) if spec.perm_stride else 1
    return GroupRow(spec.perm_stride, rows, *cols)


def _longest_first(indptr: torch.Tensor) -> torch.Tensor:
    """(G, NBLK) int32: each group's blocks by decreasing list length (ties in block
    order). Long programs start first, so none of them is left running alone at the end
    of the grid (the summary blocks of fixed patterns are read by every later query)."""
    counts = (indptr[:, 1:] - indptr[:, :-1]).long()
    return torch.sort(-counts, dim=1, stable=True).indices.to(torch.int32)


def _build_plan(layout: BlockLayout) -> _LaunchPlan:
    rows = [_group_row(spec, layout.n) for spec in layout.specs]
    return _LaunchPlan(
        table=torch.tensor(rows, dtype=torch.int32, device=layout.device),
        q_order=_longest_first(layout.q2k_indptr),
        k_order=_longest_first(layout.k2q_indptr),
    )


def _launch_plan(layout: BlockLayout) -> _LaunchPlan:
    """The layout's group table and block orders, built once per layout, freed with it."""
    return _PLANS.get(layout, _build_plan)


_TUNE_KEY = ["D", "BLOCK_Q", "BLOCK_K", "PERMUTED", "n"]
_TUNE_CONFIGS = [triton.Config({}, num_warps=4, num_stages=s) for s in (2, 3)]
"""Four warps won every shape on the H200 (eight ran up to twice as slow), as did one key
block per tile (two packed into one tile never won), so only the pipeline depth is
tuned (``benchmarks/results/attention_h200.json``, ``autotuned``)."""


_INTERPRETED = _triton_interpreter()  # chosen before anything compiles: read once


def _tuned(kernel, extra_key: tuple[str, ...] = (), reset_to_zero: tuple[str, ...] = ()):
    """Autotuned launcher on a GPU; the plain kernel (Triton's default warps and
    stages) under TRITON_INTERPRET=1 or with SPARSE_TRANSFORMER_AUTOTUNE=0, which
    the correctness tests set to keep compile time down."""
    if _INTERPRETED or os.environ.get("SPARSE_TRANSFORMER_AUTOTUNE", "1") == "0":
        return kernel
    return triton.autotune(
        configs=_TUNE_CONFIGS,
        key=_TUNE_KEY + list(extra_key),
        reset_to_zero=list(reset_to_zero) or None,
    )(kernel)


# dK/dV's timing runs add into DQ with FUSED: it is zeroed before each (and after the last)
_TUNED = {
    _fwd_kernel: _tuned(_fwd_kernel),
    _bwd_dq_kernel: _tuned(_bwd_dq_kernel),
    _bwd_dkdv_kernel: _tuned(_bwd_dkdv_kernel, extra_key=("FUSED",), reset_to_zero=("DQ",)),
}


def _launch(kernel, grid, *args, **constexprs) -> None:
    """Launch ``kernel``: autotuned, or at its fixed default configuration when not
    tuning or under ``torch.use_deterministic_algorithms``: the autotuner picks a
    configuration by timing in each process, and configurations may round differently,
    so a restarted process could compute other bits (PyTorch's Inductor likewise stops
    autotuning in deterministic mode). Either way through ``_cached_launch``."""
    tuned = kernel in _TUNED and not torch.are_deterministic_algorithms_enabled()
    _cached_launch(kernel, _TUNED[kernel] if tuned else kernel, grid, args, constexprs)


_LAUNCHES: dict[tuple, tuple] = {}
"""Compiled kernels by launch signature (``_signature``), with the constexpr values
their launcher takes after the arguments; the oldest is dropped past ``_LAUNCHES_MAX``."""
_LAUNCHES_MAX = 4096
DIRECT_LAUNCH = os.environ.get("SPARSE_TRANSFORMER_DIRECT_LAUNCH", "1") != "0"
"""Launch a compiled kernel through its own C launcher once Triton has compiled it for a
launch signature. On the H200's host a dK/dV launch cost 142 us through Triton's
autotuner, 81 through its JIT and 29 cached, dQ 66, 41 and 25
(``benchmarks/results/attention_host_h200.json``). ``SPARSE_TRANSFORMER_DIRECT_LAUNCH=0``
turns it off; it is off under the interpreter and on backends other than CUDA (ROCm
also specialises on each tensor's storage size)."""
_SCALARS = (int, float, bool, type(None))


def _signature(kernel, launcher, device: int, args: tuple, constexprs: dict) -> tuple | None:
    """At least everything Triton specialises a launch on: the current device, each
    tensor's dtype, device and address modulo 256 (Triton: divisible by 16 or not), every
    other argument's type and value (Triton: ints equal to 1, divisible by 16, 32- or
    64-bit), the constexprs, whether the autotuner picks the configuration, and Triton's
    options that enter its own cache key. None (do not cache) for an argument that is
    neither a tensor nor a scalar, or where a hook could change a compile per launch."""
    options = _triton_options(kernel)
    if options is None:
        return None
    key = [id(kernel), launcher is not kernel, device, options]  # id: a JITFunction's
    for a in args:  # own hash is slow, and the cached kernel keeps it alive
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.get_device(), a.data_ptr() % 256))
        elif isinstance(a, _SCALARS):
            key.append((a.__class__, a))
        else:
            return None
    key.extend(constexprs.items())
    return tuple(key)


def _triton_options(kernel) -> tuple | None:
    """The knobs Triton's ``JITFunction.run`` puts into a kernel's cache key (names of
    Triton 3.6 and 3.9; absent ones read as None); None while a pre-run hook or a
    pipeline inspection hook is set, which Triton runs on every launch."""
    runtime, compilation = triton.knobs.runtime, triton.knobs.compilation
    if getattr(kernel, "pre_run_hooks", None) or getattr(
        runtime, "add_stages_inspection_hook", None
    ):
        return None
    return (
        getattr(runtime, "debug", None),
        getattr(compilation, "instrumentation_mode", None),
        getattr(compilation, "fpsan_homomorphic_casts", None),
    )


@functools.cache
def _cuda_backend() -> bool:
    return triton.runtime.driver.active.get_current_target().backend == "cuda"


def _cached_launch(kernel, launcher, grid, args: tuple, constexprs: dict) -> None:
    """Launch through ``launcher`` (the JIT kernel or its autotuner) the first time for a
    launch signature, and keep the compiled kernel it returns; later launches with that
    signature call the compiled kernel's launcher directly, as Triton's own path ends
    (its launch hooks, which profilers set, included)."""
    key = None
    if DIRECT_LAUNCH and not _INTERPRETED:
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        key = _signature(kernel, launcher, device, args, constexprs)
        hit = _LAUNCHES.get(key) if key is not None else None
        if hit is not None:
            compiled, tail = hit
            stream, hooks = driver.get_current_stream(device), triton.knobs.runtime
            metadata = compiled.launch_metadata(grid, stream, *args, *tail)
            compiled.run(
                grid[0], grid[1], 1, stream, compiled.function, compiled.packed_metadata,
                metadata, hooks.launch_enter_hook, hooks.launch_exit_hook, *args, *tail,
            )  # fmt: skip
            return
    compiled = launcher[grid](*args, **constexprs)
    if key is None or not isinstance(compiled, CompiledKernel) or not _cuda_backend():
        return
    names = kernel.arg_names[len(args) :]
    if set(names) == set(constexprs):  # else a default-valued parameter: not cached
        if len(_LAUNCHES) >= _LAUNCHES_MAX:
            del _LAUNCHES[next(iter(_LAUNCHES))]
        _LAUNCHES[key] = (compiled, tuple(constexprs[name] for name in names))


def transposed_dkdv(d: int, block_k: int) -> bool:
    """Accumulate dK and dV transposed (D x BLOCK_K)? Where the head is wider than the
    key block: Hopper's tensor cores (wgmma) need 64 rows, so a 32-row dK tile falls
    back to mma.sync (Triton 3.6/3.9 for sm_90); transposed won every such shape."""
    return d > block_k


def autotuned_configs() -> dict[str, list[str]]:
    """The launch configuration the autotuner chose for each kernel and key, this process."""
    out = {}
    for kernel, tuned in _TUNED.items():
        cache = getattr(tuned, "cache", {})
        out[kernel.fn.__name__] = sorted(f"{key}: {cfg}" for key, cfg in cache.items())
    return out


MAX_BLOCKS = 65535
"""CUDA's limit on a grid's second axis, which runs over a head's blocks (n = 4,194,240
with 64-row blocks)."""


def supports(q: torch.Tensor, layout: BlockLayout) -> bool:
    """Can the kernels run these inputs?"""
    return (
        q.is_cuda
        and max(layout.n_qblocks, layout.n_kblocks) <= MAX_BLOCKS
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and layout.block_q >= 16
        and layout.block_k >= 16
        and all(len(s.parts) <= 2 for s in layout.specs)
    )


def _strides(*xs: torch.Tensor) -> list[int]:
    return [s for x in xs for s in x.stride()[:3]]


def _constexprs(d: int, layout: BlockLayout) -> dict[str, int | bool]:
    return {
        "D": d,
        "BLOCK_Q": layout.block_q,
        "BLOCK_K": layout.block_k,
        "PERMUTED": layout.any_permuted,
    }


def _fwd_impl(q, k, v, layout: BlockLayout, scale: float):
    b, h, n, d = q.shape
    plan = _launch_plan(layout)
    out = _new_like(q)
    lse = _new_row_stats(q)
    _launch(
        _fwd_kernel, (b * h, layout.n_qblocks),
        q, k, v, out, lse,
        layout.head_group, plan.table, plan.q_order,
        layout.q2k_indptr, layout.q2k_index, layout.q2k_full,
        scale * LOG2E, n, h, layout.n_qblocks, *_strides(q, k, v, out),
        **_constexprs(d, layout),
    )  # fmt: skip
    return out, lse


_DELTA_ROWS = 64


BACKWARD = "two-pass"
"""``two-pass``: dQ in its own kernel (a second recompute of P; deterministic).
``fused``: dQ added by the dK/dV kernel with atomics (one recompute; the last bits vary
from run to run). ``torch.use_deterministic_algorithms`` always gets ``two-pass``."""


class _Call(NamedTuple):
    """One kernel launch: what ``_bwd_impl`` runs and ``benchmarks/attention_host`` times."""

    kernel: triton.JITFunction
    grid: tuple[int, int]
    args: tuple
    constexprs: dict[str, int | bool]

    def run(self, via: str = "cache") -> None:
        """Launch it: ``cache`` (``_launch``, as the op does), ``autotuner`` (Triton's
        autotuned path every time) or ``jit`` (Triton's JIT kernel at its default
        configuration every time)."""
        if via == "cache":
            _launch(self.kernel, self.grid, *self.args, **self.constexprs)
        elif via == "autotuner":
            _TUNED.get(self.kernel, self.kernel)[self.grid](*self.args, **self.constexprs)
        else:
            self.kernel[self.grid](*self.args, **self.constexprs)


def _delta_call(out, dout, delta) -> _Call:
    b, h, n, d = out.shape
    grid = (b * h, triton.cdiv(n, _DELTA_ROWS))
    args = (out, dout, delta, n, h, *_strides(out, dout))
    return _Call(_bwd_delta_kernel, grid, args, {"D": d, "BLOCK": _DELTA_ROWS})


def _dq_call(q, k, v, dout, dq, lse, delta, layout: BlockLayout, scale: float) -> _Call:
    b, h, n, d = q.shape
    plan = _launch_plan(layout)
    args = (
        q, k, v, dout, dq, lse, delta,
        layout.head_group, plan.table, plan.q_order,
        layout.q2k_indptr, layout.q2k_index, layout.q2k_full,
        scale, scale * LOG2E, n, h, layout.n_qblocks, *_strides(q, k, v, dout, dq),
    )  # fmt: skip
    return _Call(_bwd_dq_kernel, (b * h, layout.n_qblocks), args, _constexprs(d, layout))


def _dkdv_call(
    q, k, v, dout, dk, dv, acc, lse, delta, layout: BlockLayout, scale: float, fused: bool
) -> _Call:
    """dK/dV's launch; ``acc`` is the fused backward's fp32 dQ (``fused``), else unused."""
    b, h, n, d = q.shape
    plan = _launch_plan(layout)
    args = (
        q, k, v, dout, dk, dv, acc, lse, delta,
        layout.head_group, plan.table, plan.k_order,
        layout.k2q_indptr, layout.k2q_index, layout.k2q_full,
        scale, scale * LOG2E, n, h, layout.n_kblocks, *_strides(q, k, v, dout, dk, dv, acc),
    )  # fmt: skip
    constexprs = {**_constexprs(d, layout), "TRANS": transposed_dkdv(d, layout.block_k)}
    return _Call(_bwd_dkdv_kernel, (b * h, layout.n_kblocks), args, {**constexprs, "FUSED": fused})


def _bwd_impl(q, k, v, out, lse, dout, layout: BlockLayout, scale: float):
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = _new_row_stats(q)
    _delta_call(out, dout, delta).run()
    dk, dv = _new_like(k), _new_like(v)
    fused = BACKWARD == "fused" and not torch.are_deterministic_algorithms_enabled()
    if fused:
        dq = torch.zeros_like(q, dtype=torch.float32)  # q's strides, as the fake op's
    else:
        dq = _new_like(q)
        _dq_call(q, k, v, dout, dq, lse, delta, layout, scale).run()
    # without FUSED the kernel never reads DQ, but the autotuner zeroes it: give it dK,
    # which the kernel writes afterwards
    acc = dq if fused else dk
    _dkdv_call(q, k, v, dout, dk, dv, acc, lse, delta, layout, scale, fused).run()
    return (dq.to(q.dtype) if fused else dq), dk, dv


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


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward as the custom ops, called directly outside
    ``torch.compile``: the custom op's Python dispatch (its autograd wrapper and
    output checks) costs more host time than the kernels of a small call."""

    @staticmethod
    def forward(ctx, q, k, v, layout: BlockLayout, scale: float):
        out, lse = _fwd_impl(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale = layout, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_impl(q, k, v, out, lse, dout, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None


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
    if max(layout.n_qblocks, layout.n_kblocks) > MAX_BLOCKS:
        raise ValueError(
            f"sparse_attention: the triton backend runs at most {MAX_BLOCKS} blocks per head; "
            f"this layout has {max(layout.n_qblocks, layout.n_kblocks)} (use larger blocks)"
        )
    scale = d**-0.5 if scale is None else float(scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if torch.compiler.is_compiling():
        out, lse2 = block_sparse_attn_fwd(q, k, v, layout.uid, scale)
    else:
        out, lse2 = _EagerAttention.apply(q, k, v, layout, scale)
    if return_lse:
        return out, lse2 * math.log(2.0)
    return out


__all__ = [
    "BACKWARD",
    "MAX_BLOCKS",
    "NO_PART",
    "SUPPORTED_HEAD_DIMS",
    "GroupRow",
    "autotuned_configs",
    "block_sparse_attn_bwd",
    "block_sparse_attn_fwd",
    "supports",
    "transposed_dkdv",
    "triton_sparse_attention",
]
