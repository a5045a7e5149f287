"""Compile an attention pattern into a block-sparse layout.

A :class:`BlockLayout` tells a kernel, for every head and every query block of
``block_q`` rows, which key blocks of ``block_k`` columns it must visit (CSR
lists), whether each visited block is *full* (every pair allowed: no element
mask needed) or *partial* (the element mask decides: causal diagonal, summary
cells, column hits), and the transposed lists (for every key block, the query
blocks that read it) that a backward pass walks to accumulate dK and dV.

The compiler never enumerates all (query block, key block) pairs, let alone all
n x n elements: each pattern component yields, per query block, the few
intervals of key blocks it can reach (a band, a chunk, one interval per period
for the periodic components); the candidate pairs are then classified exactly
with closed-form tests on the block bounds. Everything is vectorised torch on
the device of the inputs, so n = 1,048,576 with 64-wide blocks builds in a
fraction of a second on a GPU.

Heads that run strided A2 alone are laid out in the transposed order of the
spec: view positions as an (R, l) matrix (R = ceil(n / l) rows) and read it
column by column, so position p of the head's order is original position
``(p % R) * l + p // R``. There A2 is a causal attention inside contiguous
segments of R positions, which touches ~R / block_k key blocks per query block
instead of nearly all of them. Positions at or beyond n are padding: causality
in the original order masks them for every real query.

What is derived from a layout lives exactly as long as the layout: the head orders
(:meth:`BlockLayout.head_orders`), which code inside ``torch.compile`` reads, and
``ops.flex``'s block masks are fields of the layout; every other backend table (the
Triton kernels' launch plan, the torch backend's padded lists) is an entry of that
backend's own :class:`LayoutCache`, keyed weakly by the layout. A layout that
``compile_layout``'s cache has evicted and no layer holds any more is freed with all of
them (no registry to prune: ``layout_by_uid`` holds layouts weakly too).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Generic, TypeVar

import torch

from sparse_transformer.ops.patterns import Pattern

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# Component kinds of a head, in the head's own order (the Triton kernels compile these
# same numbers in as constants):
#   band(W):      0 <= i - j <= W - 1        (causal: W = inf; strided A1: W = l + 1)
#   chunk(L):     j <= i and i // L == j // L (fixed A1; permuted strided A2 with L = R)
#   column(l):    j <= i and (i - j) % l == 0 (strided A2 without the permutation)
#   summary(l, lo, hi): j <= i and lo <= j % l < hi   (fixed A2)
PART_BAND, PART_CHUNK, PART_COLUMN, PART_SUMMARY = 0, 1, 2, 3


@dataclass(frozen=True)
class Part:
    """One component of a head's pattern in that head's order (the kinds above).

    Each kind sets its own fields and leaves the others 0; build one with
    :meth:`band`, :meth:`chunk`, :meth:`column` or :meth:`summary`.
    """

    kind: int
    width: int = 0
    """band: W, a query reads the keys i - W < j <= i."""
    length: int = 0
    """chunk: L, the length of the chunks."""
    period: int = 0
    """column and summary: l, the period of the pattern."""
    lo: int = 0
    """summary: the first cell (``j % l``) of the window a head reads."""
    hi: int = 0
    """summary: one past the window's last cell."""

    @classmethod
    def band(cls, width: int) -> Part:
        return cls(PART_BAND, width=width)

    @classmethod
    def chunk(cls, length: int) -> Part:
        return cls(PART_CHUNK, length=length)

    @classmethod
    def column(cls, period: int) -> Part:
        return cls(PART_COLUMN, period=period)

    @classmethod
    def summary(cls, period: int, lo: int, hi: int) -> Part:
        return cls(PART_SUMMARY, period=period, lo=lo, hi=hi)


@dataclass(frozen=True)
class HeadSpec:
    """What distinguishes one head's layout from another's."""

    parts: tuple[Part, ...]
    perm_stride: int = 0
    """l when the head runs in the transposed (R, l) order; 0 for the natural order."""


def _head_specs(pattern: Pattern, n: int, n_heads: int) -> list[HeadSpec]:
    big = 1 << 62
    specs = []
    for h in range(n_heads):
        comp = pattern.head_component(h)
        l = pattern.stride
        if pattern.kind == "dense":
            specs.append(HeadSpec((Part.band(big),)))
        elif pattern.kind == "local":
            specs.append(HeadSpec((Part.band(l),)))
        elif pattern.kind == "strided":
            if pattern.head_permuted(h):
                rows = -(-n // l)
                specs.append(HeadSpec((Part.chunk(rows),), perm_stride=l))
                continue
            parts = []
            if comp in ("a1", "union"):
                parts.append(Part.band(l + 1))
            if comp in ("a2", "union"):
                parts.append(Part.column(l))
            specs.append(HeadSpec(tuple(parts)))
        else:  # fixed
            parts = []
            if comp in ("a1", "union"):
                parts.append(Part.chunk(l))
            if comp in ("a2", "union"):
                lo, hi = pattern.summary_window(h)
                parts.append(Part.summary(l, int(lo), int(hi)))
            specs.append(HeadSpec(tuple(parts)))
    return specs


def _ragged_arange(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts c_0..c_{m-1}: (row id, index within row) of sum(c) items."""
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    within = torch.arange(rows.numel(), device=counts.device) - starts[rows]
    return rows, within


def _candidate_intervals(
    part: Part, qb: torch.Tensor, block_q: int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query block, first key block, last key block) intervals that may hold pairs."""
    qs = qb * block_q
    qe1 = qs + block_q - 1  # last row of the block
    if part.kind == PART_BAND:
        lo = torch.clamp(qs - (min(part.width, 1 << 40) - 1), min=0) // block_k
        return qb, lo, qe1 // block_k
    if part.kind == PART_CHUNK:
        return qb, (qs // part.length) * part.length // block_k, qe1 // block_k
    # periodic components: one interval per period m = 0 .. qe1 // l
    l = part.period
    rows, m = _ragged_arange(qe1 // l + 1)
    qs_r, qe1_r = qs[rows], qe1[rows]
    if part.kind == PART_COLUMN:
        first = torch.clamp(qs_r - m * l, min=0) // block_k
        last = (qe1_r - m * l) // block_k
    else:  # summary
        first = (m * l + part.lo) // block_k
        last = torch.minimum(m * l + part.hi - 1, qe1_r) // block_k
    return qb[rows], first, last


def _classify(
    part: Part, qs: torch.Tensor, qe1: torch.Tensor, ks: torch.Tensor, ke1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(present, full) of blocks [qs, qe1] x [ks, ke1] (inclusive bounds), exactly."""
    dmin, dmax = qs - ke1, qe1 - ks  # range of i - j over the block
    if part.kind == PART_BAND:
        w1 = min(part.width, 1 << 40) - 1
        return (dmax >= 0) & (dmin <= w1), (dmin >= 0) & (dmax <= w1)
    if part.kind == PART_CHUNK:
        L = part.length
        cq0, cq1, ck0, ck1 = qs // L, qe1 // L, ks // L, ke1 // L
        present = (ks <= qe1) & (torch.maximum(cq0, ck0) <= torch.minimum(cq1, ck1))
        full = (cq0 == cq1) & (ck0 == ck1) & (cq0 == ck0) & (ke1 <= qs)
        return present, full
    l = part.period
    if part.kind == PART_COLUMN:
        a = torch.clamp(dmin, min=0)
        present = (dmax >= 0) & ((a + l - 1) // l * l <= dmax)
        full = (dmin >= 0) & ((dmin == dmax) | (l == 1)) & (dmin % l == 0)
        return present, full
    # summary: is there a key j in [ks, min(ke1, qe1)] with lo <= j % l < hi?
    b = torch.minimum(ke1, qe1)
    r = ks % l
    first = torch.where(
        r < part.lo, ks + part.lo - r, torch.where(r < part.hi, ks, ks + l - r + part.lo)
    )
    present = (ks <= b) & (first <= b)
    full = (ke1 <= qs) & (r >= part.lo) & (r + (ke1 - ks) < part.hi)
    return present, full


def head_order_mod(
    pattern: Pattern, n: int, any_permuted: bool, h: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """:meth:`BlockLayout.order` of a layout of ``pattern`` and ``n`` (``any_permuted``:
    whether any head is permuted) as elementwise arithmetic on (head, position)
    tensors, for mask_mods that must not index tables (FlexAttention's compiled mask
    builder) nor hold the layout (a BlockMask kept beside it holds its mask_mod)."""
    if not any_permuted:
        return p
    l = pattern.stride
    rows = -(-n // l)
    mapped = torch.where(p < rows * l, (p % rows) * l + p // rows, p)
    return torch.where(torch.as_tensor(pattern.permuted_heads(h)), mapped, p)


_UIDS = itertools.count(1)
_BY_UID: weakref.WeakValueDictionary[int, BlockLayout] = weakref.WeakValueDictionary()


def layout_by_uid(uid: int) -> BlockLayout:
    """The live layout whose ``uid`` this is. A uid names a layout in this process only
    and only while something holds the layout (a layer that bound it, the compile cache,
    an autograd context between forward and backward)."""
    try:
        return _BY_UID[uid]
    except KeyError:
        raise KeyError(f"layout uid {uid}: no live layout has it in this process") from None


@dataclass(eq=False)
class BlockLayout:
    """Block-sparse layout of a :class:`Pattern` for sequence length ``n``.

    Heads with identical layouts share one *group*; ``head_group[h]`` names it.
    CSR arrays are stacked over groups: ``q2k_indptr[g, qb]`` .. ``q2k_indptr[g,
    qb + 1]`` index into ``q2k_index`` / ``q2k_full`` (global offsets). Block
    indices are in the group's own order (see ``perm_stride``).
    """

    pattern: Pattern
    n: int
    n_heads: int
    block_q: int
    block_k: int
    n_padded: int
    specs: tuple[HeadSpec, ...]
    head_group: torch.Tensor  # (H,) int32
    q2k_indptr: torch.Tensor  # (G, NQB + 1) int32
    q2k_index: torch.Tensor  # (nnz,) int32
    q2k_full: torch.Tensor  # (nnz,) bool
    k2q_indptr: torch.Tensor  # (G, NKB + 1) int32
    k2q_index: torch.Tensor  # (nnz,) int32
    k2q_full: torch.Tensor  # (nnz,) bool
    uid: int = field(default_factory=lambda: next(_UIDS), init=False)
    """A process-wide integer naming this layout (:func:`layout_by_uid`): custom ops
    and compiled graphs carry it instead of the object, which is not a tensor."""
    _orders: torch.Tensor | None = field(default=None, init=False, repr=False)
    """:meth:`head_orders`, once computed."""
    _inverse_orders: torch.Tensor | None = field(default=None, init=False, repr=False)
    """:meth:`head_inverse_orders`, once computed."""
    flex_masks: dict[tuple[int | tuple[int, int], bool], BlockMask] = field(
        default_factory=dict, init=False, repr=False
    )
    """``ops.flex``'s BlockMasks of this layout by (block size, compiled), filled by
    :func:`~sparse_transformer.ops.flex.flex_block_mask`. A field rather than an entry
    of a :class:`LayoutCache` because the flex backend reads it inside compiled blocks,
    as it does the orders."""

    def __post_init__(self) -> None:
        _BY_UID[self.uid] = self

    def __setstate__(self, state: dict) -> None:
        """A copy (unpickled, deep-copied) is a new layout of this process: a fresh uid,
        so it never resolves to whatever layout had the old number here."""
        self.__dict__.update(state)
        self.uid = next(_UIDS)
        _BY_UID[self.uid] = self

    @property
    def device(self) -> torch.device:
        return self.q2k_index.device

    @property
    def n_groups(self) -> int:
        return len(self.specs)

    @property
    def n_qblocks(self) -> int:
        return self.n_padded // self.block_q

    @property
    def n_kblocks(self) -> int:
        return self.n_padded // self.block_k

    @property
    def perm_strides(self) -> tuple[int, ...]:
        return tuple(s.perm_stride for s in self.specs)

    @property
    def any_permuted(self) -> bool:
        return any(self.perm_strides)

    def order(self, group: int) -> torch.Tensor:
        """(N,) int64: original position of every position of the group's order."""
        p = torch.arange(self.n_padded, device=self.device)
        l = self.specs[group].perm_stride
        if not l:
            return p
        rows = -(-self.n // l)
        inside = p < rows * l
        return torch.where(inside, (p % rows) * l + p // rows, p)

    def head_orders(self) -> torch.Tensor:
        """(H, N) int64: the order of every head (kept on the layout once computed)."""
        if self._orders is None:
            groups = torch.stack([self.order(g) for g in range(self.n_groups)])
            self._orders = groups[self.head_group.long()]
        return self._orders

    def head_inverse_orders(self) -> torch.Tensor:
        """(H, N) int64: for every original position, its place in the head's order
        (kept on the layout: the backends undo the permutation on every call)."""
        if self._inverse_orders is None:
            self._inverse_orders = torch.argsort(self.head_orders(), dim=1)
        return self._inverse_orders

    def ell(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded lists: (G, NQB, K) int64 key blocks (-1 = none) and their full flags.

        Computed on every call; the torch backend keeps its copy in its LayoutCache.
        """
        counts = (self.q2k_indptr[:, 1:] - self.q2k_indptr[:, :-1]).long()
        kmax = max(int(counts.max().item()) if counts.numel() else 0, 1)
        rows, within = _ragged_arange(counts.reshape(-1))
        idx = torch.full((counts.numel(), kmax), -1, dtype=torch.long, device=self.device)
        full = torch.zeros((counts.numel(), kmax), dtype=torch.bool, device=self.device)
        idx[rows, within] = self.q2k_index.long()
        full[rows, within] = self.q2k_full
        shape = (self.n_groups, self.n_qblocks, kmax)
        return idx.view(shape), full.view(shape)

    # -- statistics ----------------------------------------------------------------
    def causal_blocks(self) -> int:
        """Blocks a dense causal kernel with the same block sizes would visit."""
        qe1 = torch.arange(1, self.n_qblocks + 1) * self.block_q - 1
        return int((qe1 // self.block_k + 1).clamp(max=self.n_kblocks).sum())

    def stats(self) -> dict[str, float]:
        """Block counts averaged over heads, and density relative to dense causal."""
        counts = (self.q2k_indptr[:, -1] - self.q2k_indptr[:, 0]).double()
        fulls = torch.stack(
            [
                self.q2k_full[int(self.q2k_indptr[g, 0]) : int(self.q2k_indptr[g, -1])].sum()
                for g in range(self.n_groups)
            ]
        ).double()
        per_head = counts[self.head_group.long().cpu()]
        full_head = fulls.cpu()[self.head_group.long().cpu()]
        causal = self.causal_blocks()
        blocks = float(per_head.mean())
        return {
            "blocks": blocks,
            "full_blocks": float(full_head.mean()),
            "partial_blocks": blocks - float(full_head.mean()),
            "causal_blocks": float(causal),
            "density": blocks / causal,
            "pairs": blocks * self.block_q * self.block_k,
        }

    def density(self) -> float:
        """Visited blocks / dense causal blocks, averaged over heads."""
        return self.stats()["density"]

    def density_unpermuted(self) -> float:
        """The density the same pattern would have without the transposed order."""
        if not self.any_permuted:
            return self.density()
        from dataclasses import replace

        other = compile_layout(
            replace(self.pattern, permute=False),
            self.n,
            self.n_heads,
            self.block_q,
            self.block_k,
            self.device,
        )
        return other.density()

    def expand(self, head: int) -> torch.Tensor:
        """(n, n) bool: the element mask this layout computes for ``head``, in the
        original order. O(n^2): for tests."""
        g = int(self.head_group[head])
        state = torch.zeros(self.n_qblocks, self.n_kblocks, dtype=torch.int8, device=self.device)
        lo, hi = int(self.q2k_indptr[g, 0]), int(self.q2k_indptr[g, -1])
        counts = (self.q2k_indptr[g, 1:] - self.q2k_indptr[g, :-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.n_qblocks, device=self.device), counts)
        state[rows, self.q2k_index[lo:hi].long()] = torch.where(self.q2k_full[lo:hi], 2, 1).to(
            torch.int8
        )
        elem = state.repeat_interleave(self.block_q, 0).repeat_interleave(self.block_k, 1)
        order = self.order(g)
        hq, hk = order[:, None], order[None, :]
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        partial = self.pattern.mask_mod(zero, torch.tensor(head, device=self.device), hq, hk)
        in_head_order = (elem == 2) | ((elem == 1) & partial)
        out = torch.zeros(self.n_padded, self.n_padded, dtype=torch.bool, device=self.device)
        out[hq, hk] = in_head_order
        return out[: self.n, : self.n]


V = TypeVar("V")


class LayoutCache(Generic[V]):
    """What one backend derives from layouts (kernel tables, padded lists): one value
    per layout, built once and kept exactly as long as the layout lives.

    Keyed weakly by the layout, so a layout that nothing else holds any more (evicted
    from ``compile_layout``'s cache, released by every layer that bound it) takes its
    entry, and the device memory the entry holds, with it. A value must not refer to
    its layout, which would then keep itself alive.

    Read it only where ``torch.compile`` does not trace (inside custom ops, in eager
    code): dynamo does not tell a weak-keyed lookup's keys apart and may replay one
    layout's value for another, so :meth:`get` refuses to run in a trace. What traced
    code reads is a field of the layout (:meth:`BlockLayout.head_orders`,
    ``BlockLayout.flex_masks``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        """What the values are, for messages and repr."""
        self._entries: weakref.WeakKeyDictionary[BlockLayout, V] = weakref.WeakKeyDictionary()

    def get(self, layout: BlockLayout, build: Callable[[BlockLayout], V]) -> V:
        """The value for ``layout``: ``build(layout)`` the first time, then the same."""
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{self.what}: a LayoutCache is read inside a torch.compile trace; read it "
                "inside a custom op, or keep the value on the layout"
            )
        value = self._entries.get(layout)
        if value is None:
            value = build(layout)
            self._entries[layout] = value
        return value

    def __contains__(self, layout: object) -> bool:
        return layout in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LayoutCache({self.what!r}, {len(self)} live layouts)"


def _build(
    pattern: Pattern, n: int, n_heads: int, block_q: int, block_k: int, device: torch.device
) -> BlockLayout:
    specs_per_head = _head_specs(pattern, n, n_heads)
    specs: list[HeadSpec] = []
    head_group = []
    for s in specs_per_head:
        if s not in specs:
            specs.append(s)
        head_group.append(specs.index(s))

    mult = math.lcm(block_q, block_k)
    n_padded = -(-n // mult) * mult
    for s in specs:
        if s.perm_stride:
            rows = -(-n // s.perm_stride)
            n_padded = max(n_padded, -(-(rows * s.perm_stride) // mult) * mult)
    nqb, nkb = n_padded // block_q, n_padded // block_k

    qb_all = torch.arange(nqb, device=device, dtype=torch.long)
    q_lists = []
    for spec in specs:
        keys = []
        for part in spec.parts:
            qb, first, last = _candidate_intervals(part, qb_all, block_q, block_k)
            last = torch.clamp(last, max=nkb - 1)
            length = torch.clamp(last - first + 1, min=0)
            rows, within = _ragged_arange(length)
            keys.append(qb[rows] * nkb + first[rows] + within)
        key = torch.unique(torch.cat(keys))  # sorted: by query block, then key block
        qb, kb = key // nkb, key % nkb
        qs, ks = qb * block_q, kb * block_k
        qe1, ke1 = qs + block_q - 1, ks + block_k - 1
        # positions from `limit` on are padding only (the tail of the head order)
        limit = -(-n // spec.perm_stride) * spec.perm_stride if spec.perm_stride else n
        present = torch.zeros_like(key, dtype=torch.bool)
        full = torch.zeros_like(present)
        for part in spec.parts:
            p, f = _classify(part, qs, qe1, ks, ke1)
            present |= p
            full |= f
        present &= (qs < limit) & (ks < limit)
        q_lists.append((qb[present], kb[present], full[present]))

    def csr(major: int, lists, major_of, minor_of):
        indptr, index, flags = [], [], []
        offset = 0
        for qb, kb, fl in lists:
            maj, mnr = major_of(qb, kb), minor_of(qb, kb)
            order = torch.argsort(maj * (max(nqb, nkb) + 1) + mnr)
            maj, mnr, fl = maj[order], mnr[order], fl[order]
            counts = torch.bincount(maj, minlength=major)
            ptr = torch.zeros(major + 1, dtype=torch.long, device=device)
            ptr[1:] = torch.cumsum(counts, 0)
            indptr.append(ptr + offset)
            index.append(mnr)
            flags.append(fl)
            offset += int(mnr.numel())
        return (
            torch.stack(indptr).to(torch.int32),
            torch.cat(index).to(torch.int32),
            torch.cat(flags),
        )

    q2k = csr(nqb, q_lists, lambda q, k: q, lambda q, k: k)
    k2q = csr(nkb, q_lists, lambda q, k: k, lambda q, k: q)
    if q2k[1].numel() >= 2**31:
        raise ValueError(f"layout: {q2k[1].numel()} blocks do not fit int32 indices")
    return BlockLayout(
        pattern=pattern,
        n=n,
        n_heads=n_heads,
        block_q=block_q,
        block_k=block_k,
        n_padded=n_padded,
        specs=tuple(specs),
        head_group=torch.tensor(head_group, dtype=torch.int32, device=device),
        q2k_indptr=q2k[0],
        q2k_index=q2k[1],
        q2k_full=q2k[2],
        k2q_indptr=k2q[0],
        k2q_index=k2q[1],
        k2q_full=k2q[2],
    )


@lru_cache(maxsize=64)
def _compile_cached(
    pattern: Pattern, n: int, n_heads: int, block_q: int, block_k: int, device: torch.device
) -> BlockLayout:
    return _build(pattern, n, n_heads, block_q, block_k, device)


def compile_layout(
    pattern: Pattern,
    n: int,
    n_heads: int,
    block_q: int = 64,
    block_k: int = 64,
    device: torch.device | str | None = None,
) -> BlockLayout:
    """The block layout of ``pattern`` for ``n`` positions and ``n_heads`` heads.

    Cached per (pattern, n, heads, block sizes, device).
    """
    for name, value in (("n", n), ("n_heads", n_heads), ("block_q", block_q), ("block_k", block_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"layout {name}: must be a positive integer, got {value!r}")
    if pattern.component == "split" and not 0 <= pattern.split_heads <= n_heads:
        raise ValueError(
            f"layout: pattern splits heads at {pattern.split_heads} but has {n_heads} heads"
        )
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _compile_cached(pattern, n, n_heads, block_q, block_k, dev)
