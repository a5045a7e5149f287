"""The paper's factorized attention patterns as element-level predicates.

Every pattern is written once, as a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` in
the FlexAttention convention: the arguments are integer tensors that broadcast
against each other, and the function uses only elementwise torch arithmetic, so
the same callable feeds ``torch.nn.attention.flex_attention.create_block_mask``,
the dense ``reference`` backend, and the layout tests.

Patterns (section 4 of Child et al. 2019; i = query, j = key, always j <= i):

- ``strided`` A1: the previous l positions, ``0 <= i - j <= l``;
  A2: every l-th position, ``(i - j) % l == 0``.
- ``fixed`` A1: the same chunk of l, ``i // l == j // l``;
  A2: the "summary" cells, ``j % l`` in ``[l - c, l)``. With
  ``distinct_summary`` head h uses its own length-c sub-block
  ``[l - (k + 1) c, l - k c)`` with ``k = h % (l // c)``.
- ``local``: a sliding window of ``window`` positions, ``0 <= i - j < window``.
- ``dense``: plain causal attention.

How heads use the two components is the ``component`` field, which encodes the
paper's head-combination modes (section 5.1):

- interleaved: every head of residual block r uses A^(r mod 2)
  (``component="a1"`` or ``"a2"``, see :func:`pattern_for_layer`);
- merged: every head attends to A1 | A2 (``component="union"``);
- multi-head: heads ``h < split_heads`` use A1, the rest A2 (``component="split"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PatternKind = Literal["dense", "local", "strided", "fixed"]
Component = Literal["a1", "a2", "union", "split"]
HeadMode = Literal["interleaved", "merged", "multihead"]

PATTERN_KINDS: tuple[str, ...] = ("dense", "local", "strided", "fixed")
COMPONENTS: tuple[str, ...] = ("a1", "a2", "union", "split")
HEAD_MODES: tuple[str, ...] = ("interleaved", "merged", "multihead")


@dataclass(frozen=True)
class Pattern:
    """A causal attention pattern for every head of one attention layer.

    Hashable, so layouts compiled from it can be cached.
    """

    kind: PatternKind = "dense"
    stride: int = 0
    """l for strided/fixed; the window for local; unused for dense."""
    summary: int = 0
    """c, the width of the fixed pattern's summary cells."""
    component: Component = "union"
    split_heads: int = 0
    """For ``component="split"``: heads below this index use A1, the rest A2."""
    distinct_summary: bool = True
    """Fixed A2: give each head its own length-c sub-block of every chunk."""
    permute: bool = True
    """Strided A2-only heads run in the transposed (n/l) x l order, where A2 is
    a causal attention over contiguous positions (section 5.5)."""

    def __post_init__(self) -> None:
        if self.kind not in PATTERN_KINDS:
            raise ValueError(
                f"pattern kind: unknown {self.kind!r}; expected one of {PATTERN_KINDS}"
            )
        if self.component not in COMPONENTS:
            raise ValueError(
                f"pattern component: unknown {self.component!r}; expected one of {COMPONENTS}"
            )
        if self.kind in ("strided", "fixed", "local") and self.stride < 1:
            raise ValueError(f"pattern stride: {self.kind} needs stride >= 1, got {self.stride}")
        if self.kind == "fixed" and not 1 <= self.summary <= self.stride:
            raise ValueError(
                f"pattern summary: fixed needs 1 <= c <= l, got c={self.summary} l={self.stride}"
            )
        if self.component == "split" and self.split_heads < 0:
            raise ValueError(f"pattern split_heads: must be >= 0, got {self.split_heads}")

    # -- element-level predicates -------------------------------------------------
    def a1(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The first component (for dense/local: the whole pattern)."""
        causal = k <= q
        if self.kind == "dense":
            return causal
        if self.kind == "local":
            return causal & (q - k < self.stride)
        if self.kind == "strided":
            return causal & (q - k <= self.stride)
        return causal & (q // self.stride == k // self.stride)

    def a2(self, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The second component (for dense/local: the same as A1)."""
        causal = k <= q
        if self.kind in ("dense", "local"):
            return self.a1(h, q, k)
        if self.kind == "strided":
            return causal & ((q - k) % self.stride == 0)
        lo, hi = self.summary_window(h)
        r = k % self.stride
        return causal & (r >= lo) & (r < hi)

    def summary_window(self, h: torch.Tensor | int) -> tuple[torch.Tensor | int, ...]:
        """[lo, hi) of the summary cells (``j % l``) that head h reads (fixed A2)."""
        l, c = self.stride, self.summary
        if self.distinct_summary:
            off = c * (h % (l // c))
        else:
            off = 0 * h
        return l - c - off, l - off

    def mask_mod(
        self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        """FlexAttention-style predicate: may query ``q_idx`` of head h read ``kv_idx``?"""
        if self.kind in ("dense", "local"):
            return self.a1(h, q_idx, kv_idx)
        if self.component == "a1":
            return self.a1(h, q_idx, kv_idx)
        if self.component == "a2":
            return self.a2(h, q_idx, kv_idx)
        if self.component == "union":
            return self.a1(h, q_idx, kv_idx) | self.a2(h, q_idx, kv_idx)
        use_a1 = h < self.split_heads
        return (use_a1 & self.a1(h, q_idx, kv_idx)) | (~use_a1 & self.a2(h, q_idx, kv_idx))

    __call__ = mask_mod

    # -- per-head structure used by the layout compiler ----------------------------
    def head_component(self, h: int) -> str:
        """Which component ("a1", "a2" or "union") head ``h`` uses."""
        if self.kind in ("dense", "local"):
            return "a1"
        if self.component == "split":
            return "a1" if h < self.split_heads else "a2"
        return self.component

    def head_permuted(self, h: int) -> bool:
        """Does head ``h`` run in the transposed order (strided A2 alone)?"""
        return self.kind == "strided" and self.permute and self.head_component(h) == "a2"

    def permuted_heads(self, h: torch.Tensor) -> torch.Tensor | bool:
        """Tensor form of :meth:`head_permuted` (for mask_mods that get h as a tensor)."""
        if not (self.kind == "strided" and self.permute):
            return False
        if self.component == "a2":
            return True
        if self.component == "split":
            return h >= self.split_heads
        return False

    def describe(self) -> str:
        """A short human-readable name, for tables and logs."""
        if self.kind == "dense":
            return "dense"
        if self.kind == "local":
            return f"local(w={self.stride})"
        extra = f",c={self.summary}" if self.kind == "fixed" else ""
        comp = self.component if self.component != "split" else f"split@{self.split_heads}"
        return f"{self.kind}(l={self.stride}{extra},{comp})"


def pattern_for_layer(
    kind: PatternKind,
    *,
    mode: HeadMode,
    layer: int,
    n_heads: int,
    stride: int = 0,
    summary: int = 0,
    distinct_summary: bool = True,
    permute: bool = True,
) -> Pattern:
    """The pattern of residual block ``layer`` under a head-combination mode.

    interleaved: block r uses A^(r mod 2) on every head; merged: every head
    attends to A1 | A2; multi-head: the first half of the heads use A1, the
    second half A2.
    """
    if mode not in HEAD_MODES:
        raise ValueError(f"head mode: unknown {mode!r}; expected one of {HEAD_MODES}")
    common = dict(
        kind=kind,
        stride=stride,
        summary=summary,
        distinct_summary=distinct_summary,
        permute=permute,
    )
    if kind in ("dense", "local"):
        return Pattern(**common, component="a1")
    if mode == "interleaved":
        return Pattern(**common, component="a1" if layer % 2 == 0 else "a2")
    if mode == "merged":
        return Pattern(**common, component="union")
    if n_heads < 2:
        raise ValueError("head mode: multihead needs n_heads >= 2 (one head per component)")
    return Pattern(**common, component="split", split_heads=n_heads // 2)


def dense_mask(pattern: Pattern, n: int, n_heads: int, device: torch.device | str = "cpu"):
    """The (n_heads, n, n) boolean mask of ``pattern``: O(n^2), for tests and reference."""
    idx = torch.arange(n, device=device)
    h = torch.arange(n_heads, device=device)[:, None, None]
    zero = torch.zeros((), dtype=torch.long, device=device)
    mask = pattern.mask_mod(zero, h, idx[None, :, None], idx[None, None, :])
    return mask.expand(n_heads, n, n)
