"""Key/value caches for incremental decoding that keep only what a pattern can still read.

One :class:`LayerKVCache` per residual block. It is made of *stores*, each a
fixed number of slots per head (keys ``(B, H, C, d_qk)``, values ``(B, H, C,
d)`` and the position held by every slot, ``(H, C)``, -1 when empty):

- ``ring(W)``: slot ``j % W``, so the last W positions. Serves strided A1
  (W = l + 1: the positions i - l .. i), fixed A1 (W = l: the current chunk;
  entries of older chunks stay until overwritten but the A1 predicate masks
  them) and local attention (W = window).
- ``summary``: fixed A2. Head h keeps only its own summary cells ``j % l`` in
  ``[lo_h, hi_h)`` (distinct per head with ``distinct_summary``), slot
  ``(j // l) * c + j % l - lo_h``: ceil(n / l) * c slots.
- ``full``: slot ``j``, n slots. Serves dense attention and every strided layer
  with a column (A2) head: the column that position i reads has only i / l
  entries, but the columns of the l residues together are every earlier
  position, and each of them is read again by a later query (j + m l), so
  nothing can be dropped. A step then *reads* only the O(l + n / l) candidate
  slots (the band and the column of the current residue), not all n.

A fixed layer therefore holds at most l + ceil(n / l) * c slots per head
(enwik8: 3,200 instead of 12,288), a strided A1 layer l + 1, a local layer
its window, and a strided column or dense layer n: memory is linear in n at
worst, never quadratic.

Each step's attention reads the candidate slots of every store and masks them
with the pattern's own predicates (``Pattern.a1`` / ``a2`` / ``mask_mod``), so
the cache follows the same definition as the kernels. For a head that uses A1
and A2 together (merged), a key held by both its A1 ring and its summary store
is counted once: the summary store masks out keys that A1 already allows.
q and k are multiplied in fp32 (section 6: their product can overflow fp16).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sparse_transformer.ops import Pattern
from sparse_transformer.ops.decode import masked_softmax


class _Store:
    """Slots of keys/values per head, allocated on the first write."""

    capacity: int

    def __init__(self, pattern: Pattern, n_heads: int) -> None:
        self.pattern = pattern
        self.n_heads = n_heads
        comps = [pattern.head_component(h) for h in range(n_heads)]
        self.uses_a1 = torch.tensor([c in ("a1", "union") for c in comps])  # (H,)
        self.uses_a2 = torch.tensor([c in ("a2", "union") for c in comps])  # (H,)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None

    # -- what subclasses define ---------------------------------------------------------
    def slots(self, positions: torch.Tensor, last: int) -> torch.Tensor:
        """(H, T) slot of each position per head, -1 where the head does not keep it.
        ``positions`` are consecutive and end at ``last``."""
        raise NotImplementedError

    def read_slots(self, i: int) -> torch.Tensor | None:
        """Slots worth reading for query position i (None: all of them)."""
        return None

    def allowed(self, h: torch.Tensor, i: int, pos: torch.Tensor) -> torch.Tensor:
        """(H, S) may the query at i of each head read the key held in each slot?"""
        raise NotImplementedError

    # -- shared mechanics ---------------------------------------------------------------
    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values (B, H, T, d) of positions start .. start + T - 1.

        Positions a head does not keep go to one scratch slot past the capacity
        (never read), so writing needs no host synchronisation.
        """
        b, h, t, dk = k.shape
        if self.k is None:
            self.k = k.new_zeros(b, h, self.capacity + 1, dk)  # + 1: the scratch slot
            self.v = v.new_zeros(b, h, self.capacity + 1, v.shape[-1])
            self.pos = torch.full((h, self.capacity + 1), -1, dtype=torch.long, device=k.device)
            self.uses_a1 = self.uses_a1.to(k.device)
            self.uses_a2 = self.uses_a2.to(k.device)
            self.heads = torch.arange(h, device=k.device)[:, None]  # (H, 1)
        positions = torch.arange(start, start + t, device=k.device)  # (T,)
        slots = self.slots(positions, start + t - 1)  # (H, T)
        slots = torch.where(slots >= 0, slots, self.capacity)  # dropped -> scratch
        self.k[:, self.heads, slots] = k  # (B, H, T, dk) scattered by (head, slot)
        self.v[:, self.heads, slots] = v
        self.pos[self.heads, slots] = positions.expand(h, t)
        self.pos[:, self.capacity] = -1

    def read(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys (B, H, S, d_qk), values (B, H, S, d) and the (H, S) mask for query i."""
        assert self.k is not None and self.v is not None and self.pos is not None
        idx = self.read_slots(i)
        if idx is None:
            c = self.capacity  # all slots but the scratch one
            k, v, pos = self.k[:, :, :c], self.v[:, :, :c], self.pos[:, :c]
        else:
            k, v, pos = self.k[:, :, idx], self.v[:, :, idx], self.pos[:, idx]
        return k, v, (pos >= 0) & self.allowed(self.heads, i, pos)


class _RingStore(_Store):
    """The last ``capacity`` positions: the A1 component (band, chunk or window)."""

    def __init__(self, pattern: Pattern, n_heads: int, capacity: int) -> None:
        super().__init__(pattern, n_heads)
        self.capacity = capacity

    def slots(self, positions: torch.Tensor, last: int) -> torch.Tensor:
        keep = positions > last - self.capacity  # only the last W can survive
        slot = torch.where(keep, positions % self.capacity, -1)  # (T,)
        return torch.where(self.uses_a1[:, None], slot[None, :], -1)  # (H, T)

    def allowed(self, h: torch.Tensor, i: int, pos: torch.Tensor) -> torch.Tensor:
        return self.uses_a1[:, None] & self.pattern.a1(h, i, pos)


class _SummaryStore(_Store):
    """Fixed A2: every head's own summary cells, c per chunk."""

    def __init__(self, pattern: Pattern, n_heads: int, n_ctx: int) -> None:
        super().__init__(pattern, n_heads)
        self.l, self.c = pattern.stride, pattern.summary
        self.capacity = math.ceil(n_ctx / self.l) * self.c
        lo, _ = pattern.summary_window(torch.arange(n_heads))
        self.lo = torch.as_tensor(lo).expand(n_heads)  # (H,)

    def slots(self, positions: torch.Tensor, last: int) -> torch.Tensor:
        self.lo = self.lo.to(positions.device)
        lo = self.lo[:, None]  # (H, 1)
        r = positions[None, :] % self.l  # (1, T)
        inside = (r >= lo) & (r < lo + self.c) & self.uses_a2[:, None]  # (H, T)
        return torch.where(inside, (positions[None, :] // self.l) * self.c + r - lo, -1)

    def read_slots(self, i: int) -> torch.Tensor:
        filled = min(self.capacity, (i // self.l + 1) * self.c)  # chunks up to i's
        return torch.arange(filled, device=self.pos.device)

    def allowed(self, h: torch.Tensor, i: int, pos: torch.Tensor) -> torch.Tensor:
        a2 = self.pattern.a2(h, i, pos)
        seen_by_a1 = self.uses_a1[:, None] & self.pattern.a1(h, i, pos)
        return self.uses_a2[:, None] & a2 & ~seen_by_a1


class _FullStore(_Store):
    """Every position (dense, strided column heads); reads only the candidates."""

    def __init__(self, pattern: Pattern, n_heads: int, n_ctx: int) -> None:
        super().__init__(pattern, n_heads)
        self.capacity = n_ctx

    def slots(self, positions: torch.Tensor, last: int) -> torch.Tensor:
        return positions[None, :].expand(self.n_heads, -1)

    def read_slots(self, i: int) -> torch.Tensor:
        dev = self.pos.device
        if self.pattern.kind != "strided":
            return torch.arange(i + 1, device=dev)
        l = self.pattern.stride
        band = torch.arange(max(0, i - l), i + 1, device=dev)  # A1: i - l .. i
        if i - l <= i % l:
            return band
        column = torch.arange(i % l, i - l, l, device=dev)  # A2 below the band
        return torch.cat([column, band])

    def allowed(self, h: torch.Tensor, i: int, pos: torch.Tensor) -> torch.Tensor:
        return self.pattern.mask_mod(0, h, i, pos)


class LayerKVCache:
    """The keys and values one attention layer can still read, for one batch of sequences."""

    def __init__(self, pattern: Pattern, n_ctx: int, n_heads: int) -> None:
        self.pattern, self.n_ctx, self.n_heads = pattern, n_ctx, n_heads
        self.length = 0
        comps = {pattern.head_component(h) for h in range(n_heads)}
        l = pattern.stride
        stores: list[_Store]
        if pattern.kind == "dense" or (pattern.kind == "strided" and comps != {"a1"}):
            stores = [_FullStore(pattern, n_heads, n_ctx)]
        elif pattern.kind == "local":
            stores = [_RingStore(pattern, n_heads, min(l, n_ctx))]
        elif pattern.kind == "strided":
            stores = [_RingStore(pattern, n_heads, min(l + 1, n_ctx))]
        else:  # fixed
            stores = []
            if comps & {"a1", "union"}:
                stores.append(_RingStore(pattern, n_heads, min(l, n_ctx)))
            if comps & {"a2", "union"}:
                stores.append(_SummaryStore(pattern, n_heads, n_ctx))
        self.stores = stores

    @property
    def capacity(self) -> int:
        """Slots per head over all stores: the most positions this layer ever holds."""
        return sum(s.capacity for s in self.stores)

    def nbytes(self) -> int:
        """Bytes allocated for keys, values and positions."""
        total = 0
        for s in self.stores:
            for t in (s.k, s.v, s.pos):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys (B, H, T, d_qk) and values (B, H, T, d) of the next T positions."""
        t = k.shape[2]
        if self.length + t > self.n_ctx:
            raise ValueError(
                f"kv cache: {self.length} + {t} positions exceed the context n_ctx = {self.n_ctx}"
            )
        for store in self.stores:
            store.write(self.length, k, v)
        self.length += t

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sparse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """The attention layer's output (B, H, T, d) for q, k, v of the next T positions.

        Empty cache: the prefill, by ``sparse`` (the layer's block-sparse attention), after
        keeping what later positions can read. Later: one position (T = 1) over the cache.
        """
        if self.length == 0:
            self.append(k, v)
            return sparse(q, k, v)
        if q.shape[2] != 1:
            raise ValueError("attention: after the prefill, decode one position at a time")
        i = self.length
        self.append(k, v)
        return self.attend(q, i, scale)  # (B, H, 1, d)

    def attend(self, q: torch.Tensor, i: int, scale: float) -> torch.Tensor:
        """Attention of the query (B, H, 1, d_qk) at position i over the cache -> (B, H, 1, d).

        Scores in fp32 (fp64 for fp64 inputs); rows with no readable key give zeros,
        as in ``ops.sparse_attention``.
        """
        parts = [s.read(i) for s in self.stores]
        k = torch.cat([p[0] for p in parts], dim=2)  # (B, H, S, d_qk)
        v = torch.cat([p[1] for p in parts], dim=2)  # (B, H, S, d)
        allowed = torch.cat([p[2] for p in parts], dim=1)  # (H, S)
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.einsum("bhd,bhsd->bhs", q[:, :, 0].to(compute), k.to(compute)) * scale
        p = masked_softmax(s.masked_fill(~allowed, float("-inf")))  # (B, H, S)
        out = torch.einsum("bhs,bhsd->bhd", p, v.to(compute))  # (B, H, d)
        return out[:, :, None].to(q.dtype)  # (B, H, 1, d)


class KVCache:
    """The caches of every layer of a model; ``length`` positions decoded so far."""

    def __init__(self, patterns: list[Pattern], n_ctx: int, n_heads: int) -> None:
        self.layers = [LayerKVCache(p, n_ctx, n_heads) for p in patterns]
        self.n_ctx = n_ctx

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> list[int]:
        """Slots per head of every layer."""
        return [layer.capacity for layer in self.layers]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
