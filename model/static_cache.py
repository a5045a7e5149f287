"""Fixed-shape key/value caches, so that one decoding step can be compiled and replayed.

The same stores as ``kv_cache`` (ring, summary, full: see its docstring for what
each pattern keeps and why), rebuilt for ``torch.compile`` and CUDA graphs:

- every buffer is allocated once, for one batch size, dtype and device;
- the position being decoded is a device tensor (``pos``, shape (1,)): slots,
  the positions they hold and the masks are tensor arithmetic on it, so no step
  changes a shape, reads a Python-side position or synchronises with the host;
- each step reads a fixed number of slots per store: a ring or summary store
  all of its slots; a full store all n (dense) or, for strided heads, the band
  i - l .. i and the column of i's residue (l + 1 + ceil(n / l) slots, gathered);
  the pattern's own predicates (``Pattern.a1`` / ``a2`` / ``mask_mod``) mask what
  the query may not read, as in ``kv_cache``;
- a layer's stores share one buffer, a key and its value side by side in each row,
  so a step is one write, one gather, one softmax and one weighted sum per layer
  whatever its stores (compiled: a handful of kernels, where each store and each
  of keys and values had its own);
- a store holds only the heads that read it: a strided multihead layer keeps its
  A1 heads in a ring of l + 1 and only its A2 heads in n slots (``kv_cache`` keeps
  every head of such a layer in n slots); a fixed multihead layer keeps its A1
  heads' chunk and its A2 heads' summary cells apart;
- positions are not stored: slot s of a ring of W holds i - ((i - s) mod W), of a
  summary store (s // c) l + lo_h + s mod c, of a full store s. Every position up
  to i was written in this sequence (the prefill writes 0 .. T0 - 1, each step its
  own), so a slot is valid when that position is >= 0 and <= i, and a cache is
  reused for the next batch of prompts without clearing.

q and k are multiplied in fp32 (fp64 for fp64 models) as in ``kv_cache``; one
softmax runs over the slots of all of a head's stores, and a key held by a
head's ring and its summary store counts once. :func:`cache_bytes` reports each
layer's bytes beside a dense cache's (n slots per head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from sparse_transformer.model.config import SparseTransformerConfig
from sparse_transformer.ops import Pattern
from sparse_transformer.ops.decode import decode_attention

StoreKind = Literal["ring", "summary", "full"]


@dataclass(frozen=True)
class StoreSpec:
    """One store of a layer: its kind, the heads it holds and its slots per head."""

    kind: StoreKind
    heads: tuple[int, ...]
    capacity: int


def plan_layer(pattern: Pattern, n_ctx: int, n_heads: int) -> list[StoreSpec]:
    """The stores of one layer: each head in the stores that its pattern component reads."""
    comps = [pattern.head_component(h) for h in range(n_heads)]
    every = tuple(range(n_heads))
    a1 = tuple(h for h in every if comps[h] in ("a1", "union"))
    a2 = tuple(h for h in every if comps[h] in ("a2", "union"))
    l = pattern.stride
    if pattern.kind == "dense":
        return [StoreSpec("full", every, n_ctx)]
    if pattern.kind == "local":
        return [StoreSpec("ring", every, min(l, n_ctx))]
    specs = []
    if pattern.kind == "strided":  # a column (A2) head reads every residue: n slots
        if band_only := tuple(h for h in every if comps[h] == "a1"):
            specs.append(StoreSpec("ring", band_only, min(l + 1, n_ctx)))
        if a2:
            specs.append(StoreSpec("full", a2, n_ctx))
        return specs
    if a1:  # fixed
        specs.append(StoreSpec("ring", a1, min(l, n_ctx)))
    if a2:
        specs.append(StoreSpec("summary", a2, math.ceil(n_ctx / l) * pattern.summary))
    return specs


# -- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCacheBytes:
    """One layer's static cache against a dense one (n slots per head)."""

    layer: int
    pattern: str
    slots: tuple[int, ...]
    """Slots per head (over all of the head's stores)."""
    sparse_bytes: int
    dense_bytes: int


def cache_bytes(
    cfg: SparseTransformerConfig, batch: int = 1, dtype: torch.dtype = torch.float16
) -> list[LayerCacheBytes]:
    """Bytes of keys and values each layer's :class:`StaticKVCache` allocates for ``batch``
    sequences in ``dtype``, beside a dense cache's n slots per head (nothing is allocated)."""
    size = torch.empty((), dtype=dtype).element_size()
    per_slot = (cfg.d_head_qk + cfg.d_head) * size * batch  # one key and one value
    out = []
    for layer in range(cfg.n_layers):
        pattern = cfg.pattern_for(layer)
        specs = plan_layer(pattern, cfg.n_ctx, cfg.n_heads)
        slots = tuple(sum(s.capacity for s in specs if h in s.heads) for h in range(cfg.n_heads))
        out.append(
            LayerCacheBytes(
                layer=layer,
                pattern=pattern.describe(),
                slots=slots,
                sparse_bytes=sum(slots) * per_slot,
                dense_bytes=cfg.n_heads * cfg.n_ctx * per_slot,
            )
        )
    return out


# -- the stores ---------------------------------------------------------------------------------


class _Store:
    """Where one store's heads ``spec.heads`` keep their slots in the layer's buffer: head
    ``heads[j]``'s slot s is row ``base + j * capacity + s`` of the layer's keys and values
    (B, R, d_qk + d). A store holds no tensor of its own; it says which rows a position goes
    to and which rows a query reads, with the masks of its pattern component."""

    def __init__(
        self, spec: StoreSpec, pattern: Pattern, n_ctx: int, base: int, device: torch.device
    ) -> None:
        self.pattern, self.n_ctx, self.capacity = pattern, n_ctx, spec.capacity
        self.heads, self.base = spec.heads, base
        self.index = torch.tensor(spec.heads, dtype=torch.long, device=device)  # (Hs,)
        self.h = self.index[:, None]  # (Hs, 1): head numbers for the predicates
        self.first_row = (
            base + spec.capacity * torch.arange(len(spec.heads), device=device)[:, None]
        )
        self.slot_ids = torch.arange(spec.capacity, device=device)  # (C,)
        self.setup()

    always_kept = True
    """Does every head of the store keep every position (not so for summary cells)?"""

    @property
    def rows(self) -> int:
        """Rows of the layer's buffers the store takes (heads x capacity)."""
        return len(self.heads) * self.capacity

    @property
    def width(self) -> int:
        """Slots a query of each head reads from this store."""
        return self.capacity

    # -- what subclasses define ----------------------------------------------------------------
    def setup(self) -> None:
        """Constants of the store's arithmetic, made once."""

    def slot(self, p: torch.Tensor, last: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, kept): where each head keeps the positions p (T,), both (Hs or 1, T).
        ``last`` is the newest position written with them."""
        raise NotImplementedError

    def held(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(positions, valid, gather): the positions the read slots hold (Hs or 1, S), which
        of them hold one, and the slots to gather (None: all of them, in order)."""
        raise NotImplementedError

    def allowed(self, i: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(Hs, S): may the query at i of each head read the key at position p?"""
        raise NotImplementedError

    # -- shared mechanics -------------------------------------------------------------------------
    def write_rows(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, kept), both (Hs,): where each head writes position i (1,), and whether it
        keeps it (a head that does not writes its slot 0 back unchanged)."""
        slot, kept = self.slot(i, i)  # (Hs or 1, 1)
        slot = torch.where(kept, slot, 0)
        return (self.first_row + slot)[:, 0], kept.expand(len(self.heads), 1)[:, 0]

    def read(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, readable), both (Hs, S): the rows the query at i (1,) of each head reads,
        and which of them it may read (held, and allowed by the pattern)."""
        p, valid, gather = self.held(i)
        slots = self.slot_ids if gather is None else gather
        rows = self.first_row + slots  # (Hs, S)
        return rows, (valid & self.allowed(i, p)).expand_as(rows)


class _RingStore(_Store):
    """The last ``capacity`` = W positions (strided band, fixed chunk, local window)."""

    def slot(self, p: torch.Tensor, last: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        return (p % self.capacity)[None, :], (p > last - self.capacity)[None, :]

    def held(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        p = i - (i - self.slot_ids) % self.capacity  # (C,): i - W + 1 .. i
        return p[None, :], (p >= 0)[None, :], None

    def allowed(self, i: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.pattern.a1(self.h, i, p)


class _SummaryStore(_Store):
    """Fixed A2: each head's own summary cells ``j % l`` in [lo_h, lo_h + c), c per chunk."""

    always_kept = False

    def setup(self) -> None:
        lo, _ = self.pattern.summary_window(self.h)
        self.lo = torch.as_tensor(lo, device=self.h.device).expand_as(self.h)  # (Hs, 1)
        union = [self.pattern.head_component(h) == "union" for h in self.heads]
        self.uses_a1 = torch.tensor(union, device=self.h.device)[:, None]  # (Hs, 1): A1 too

    def slot(self, p: torch.Tensor, last: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        l, c = self.pattern.stride, self.pattern.summary
        r = p[None, :] % l  # (1, T)
        kept = (r >= self.lo) & (r < self.lo + c)  # (Hs, T)
        return (p[None, :] // l) * c + r - self.lo, kept

    def held(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        l, c = self.pattern.stride, self.pattern.summary
        p = (self.slot_ids // c) * l + self.lo + self.slot_ids % c  # (Hs, C)
        return p, p <= i, None

    def allowed(self, i: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        seen_by_a1 = self.uses_a1 & self.pattern.a1(self.h, i, p)
        return self.pattern.a2(self.h, i, p) & ~seen_by_a1


class _FullStore(_Store):
    """Every position (dense; strided heads with a column), read at the candidates only."""

    def setup(self) -> None:
        if self.pattern.kind == "strided":
            l = self.pattern.stride
            self.band = torch.arange(-l, 1, device=self.h.device)  # i - l .. i
            self.column = l * torch.arange(math.ceil(self.n_ctx / l), device=self.h.device)

    @property
    def width(self) -> int:
        if self.pattern.kind != "strided":
            return self.capacity
        return len(self.band) + len(self.column)

    def slot(self, p: torch.Tensor, last: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        return p[None, :], torch.ones_like(p, dtype=torch.bool)[None, :]

    def held(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.pattern.kind != "strided":
            return self.slot_ids[None, :], (self.slot_ids <= i)[None, :], None
        band = i + self.band  # (l + 1,)
        column = i % self.pattern.stride + self.column  # (ceil(n / l),): below the band only
        p = torch.cat([band, column])
        valid = torch.cat([band >= 0, column < i - self.pattern.stride])
        return p[None, :], valid[None, :], p.clamp(0, self.n_ctx - 1)

    def allowed(self, i: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.pattern.mask_mod(0, self.h, i, p)


_STORES = {"ring": _RingStore, "summary": _SummaryStore, "full": _FullStore}


# -- layers and the model's cache -----------------------------------------------------------------


class StaticLayerCache:
    """The fixed-shape stores of one attention layer; ``pos`` is the position decoded next.

    The stores share one buffer ``kv`` (B, R, d_qk + d), a key and its value side by side
    in each row, whose rows are the slots of every (store, head). A step writes each head's
    new key and value with one ``index_copy_``, and every head reads ``width`` rows (its
    stores' candidates side by side, padded with masked rows where heads read different
    counts): one gather, one softmax and one weighted sum for the whole layer, whatever its
    stores.
    """

    def __init__(
        self,
        pattern: Pattern,
        n_ctx: int,
        shape: tuple[int, int, int, int],
        pos: torch.Tensor,
        like: torch.Tensor,
    ) -> None:
        batch, self.n_heads, d_qk, d_v = shape
        self.pattern, self.pos = pattern, pos
        self.stores: list[_Store] = []
        rows = 0
        for spec in plan_layer(pattern, n_ctx, self.n_heads):
            self.stores.append(_STORES[spec.kind](spec, pattern, n_ctx, rows, like.device))
            rows += self.stores[-1].rows
        self.d_qk = d_qk
        self.kv = like.new_zeros(batch, rows, d_qk + d_v)  # [key | value] per row
        heads = [h for store in self.stores for h in store.heads]  # a head per written row
        self.write_heads = torch.tensor(heads, dtype=torch.long, device=like.device)
        self.always_kept = all(store.always_kept for store in self.stores)
        self._plan_reads(like.device)
        self.prepared: tuple[torch.Tensor, torch.Tensor] | None = None
        """(rows, readable) of the current step, filled by ``StaticKVCache.prepare_step``
        for every layer of one pattern at once (which must run before each step); None (a
        layer on its own): each step works them out."""

    def _plan_reads(self, device: torch.device) -> None:
        """Each store's columns in a head's row of reads: after the columns of the earlier
        stores that hold the same heads, so a head's stores never overlap."""
        used = [0] * self.n_heads
        self.columns: list[int] = []
        self.in_store: list[torch.Tensor] = []  # (H, 1): does head h read the store?
        self.local: list[torch.Tensor] = []  # (H,): head h's row among the store's heads
        for store in self.stores:
            start = max(used[h] for h in store.heads)
            for h in store.heads:
                used[h] = start + store.width
            self.columns.append(start)
            member = [h in store.heads for h in range(self.n_heads)]
            local = [store.heads.index(h) if m else 0 for h, m in enumerate(member)]
            self.in_store.append(torch.tensor(member, device=device)[:, None])
            self.local.append(torch.tensor(local, dtype=torch.long, device=device))
        self.width = max(used)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        sparse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        scale: float,
    ) -> torch.Tensor:
        """The layer's output (B, H, T, d). T > 1: the prompt at positions 0 .. T - 1 (by
        ``sparse``, eager); T = 1: one step at ``pos`` over the stores (compilable)."""
        if q.shape[2] > 1:
            self.write_prompt(k, v)
            return sparse(q, k, v)
        self.write_step(self.pos, k, v)
        return self.attend(q, self.pos, scale)

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep what later positions read of the prompt's keys/values (B, H, T, d) at 0 .. T-1
        (eager: once per sequence)."""
        t = k.shape[2]
        for store in self.stores:
            slot, kept = store.slot(torch.arange(t, device=k.device), t - 1)
            hs, ts = kept.expand(len(store.heads), t).nonzero(as_tuple=True)
            rows = (store.first_row + slot)[hs, ts]  # (N,)
            heads = store.index[hs]
            self.kv[:, rows] = torch.cat([k[:, heads, ts], v[:, heads, ts]], -1)

    def write_step(self, i: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys/values (B, H, 1, d) of position i (1,): every head in each of its
        stores, in one ``index_copy_`` (shapes never depend on i)."""
        parts = [store.write_rows(i) for store in self.stores]
        rows = torch.cat([r for r, _ in parts])  # (N,): distinct rows
        new = torch.cat([k[:, :, 0], v[:, :, 0]], -1).index_select(1, self.write_heads)
        if not self.always_kept:  # (B, N, d_qk + d)
            kept = torch.cat([kept for _, kept in parts])[None, :, None]  # (1, N, 1)
            new = torch.where(kept, new, self.kv.index_select(1, rows))
        self.kv.index_copy_(1, rows, new)

    def reads(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, readable), both (H, width): every head's reads over all of its stores."""
        if len(self.stores) == 1 and len(self.stores[0].heads) == self.n_heads:
            return self.stores[0].read(i)  # one store of every head (local, interleaved, ...)
        rows = readable = None
        for store, start, member, local in zip(
            self.stores, self.columns, self.in_store, self.local, strict=True
        ):
            r, ok = store.read(i)  # (Hs, S)
            pad = (start, self.width - start - store.width)
            r = torch.nn.functional.pad(r.index_select(0, local), pad) * member
            ok = torch.nn.functional.pad(ok.index_select(0, local), pad) & member
            rows = r if rows is None else rows + r  # a (head, column) is one store's at most
            readable = ok if readable is None else readable | ok
        assert rows is not None and readable is not None
        return rows, readable

    def attend(self, q: torch.Tensor, i: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the query (B, H, 1, d_qk) at i (1,) over the stores -> (B, H, 1, d).

        Rows with no readable key give zeros, as in ``ops.sparse_attention``.
        """
        rows, readable = self.reads(i) if self.prepared is None else self.prepared  # (H, S)
        out = decode_attention(q[:, :, 0], self.kv, rows, readable, scale, self.d_qk)
        return out[:, :, None]  # (B, H, 1, d)

    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return self.kv.numel() * self.kv.element_size()


class StaticKVCache:
    """Every layer's :class:`StaticLayerCache` for ``batch`` sequences of a model, sharing
    the position tensor ``pos`` (1,) that the decoding step reads and advances."""

    def __init__(
        self,
        cfg: SparseTransformerConfig,
        batch: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.n_ctx = cfg.n_ctx
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        like = torch.empty(0, dtype=dtype, device=device)
        shape = (batch, cfg.n_heads, cfg.d_head_qk, cfg.d_head)
        self.layers = [
            StaticLayerCache(cfg.pattern_for(layer), cfg.n_ctx, shape, self.pos, like)
            for layer in range(cfg.n_layers)
        ]
        self.plans: dict[Pattern, StaticLayerCache] = {}  # a layer of each pattern
        for layer in self.layers:
            first = self.plans.setdefault(layer.pattern, layer)
            if first is layer:
                rows = torch.zeros(cfg.n_heads, layer.width, dtype=torch.long, device=device)
                layer.prepared = (rows, torch.zeros_like(rows, dtype=torch.bool))
            layer.prepared = first.prepared  # layers of one pattern read the same rows

    def prepare_step(self) -> None:
        """Work out the rows each head reads at ``pos``, and which it may read, once per
        pattern for all of its layers (in place: their addresses never change).

        Every decoding step (T = 1) must come after it: the layers read these rows, not
        their own (``fast_decode.static_decode`` calls it)."""
        for layer in self.plans.values():
            rows, readable = layer.reads(self.pos)
            assert layer.prepared is not None
            layer.prepared[0].copy_(rows)
            layer.prepared[1].copy_(readable)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer a step reads or writes (for ``torch._dynamo.mark_static_address``)."""
        prepared = [t for layer in self.plans.values() for t in layer.prepared or ()]
        return [self.pos, *prepared] + [layer.kv for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of keys and values over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
