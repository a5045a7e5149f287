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
    """Keys (B, Hs, C, d_qk) and values (B, Hs, C, d) of the heads ``spec.heads``."""

    def __init__(
        self,
        spec: StoreSpec,
        pattern: Pattern,
        n_ctx: int,
        shape: tuple[int, int, int, int],
        like: torch.Tensor,
    ) -> None:
        batch, n_heads, d_qk, d_v = shape
        dev = like.device
        self.pattern, self.n_ctx, self.capacity = pattern, n_ctx, spec.capacity
        self.n_heads, self.heads = n_heads, spec.heads
        self.every_head = len(spec.heads) == n_heads
        self.index = torch.tensor(spec.heads, dtype=torch.long, device=dev)  # (Hs,)
        self.h = self.index[:, None]  # (Hs, 1): head numbers for the predicates
        self.local = torch.arange(len(spec.heads), device=dev)  # (Hs,)
        self.slot_ids = torch.arange(spec.capacity, device=dev)  # (C,)
        self.k = like.new_zeros(batch, len(spec.heads), spec.capacity, d_qk)
        self.v = like.new_zeros(batch, len(spec.heads), spec.capacity, d_v)
        self.setup()

    always_kept = True
    """Does every head of the store keep every position (not so for summary cells)?"""

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
    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of this store's heads of x (B, H, ...) -> (B, Hs, ...)."""
        return x if self.every_head else x.index_select(1, self.index)

    def to_all_heads(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """x (B, Hs, ...) placed in the rows of its heads of (B, H, ...), ``fill`` elsewhere."""
        if self.every_head:
            return x
        full = x.new_full((x.shape[0], self.n_heads, *x.shape[2:]), fill)
        return full.index_copy(1, self.index, x)

    def write_prompt(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep what later positions read of the prompt's keys/values (B, H, T, d) at 0 .. T-1
        (eager: once per sequence)."""
        t = k.shape[2]
        slot, kept = self.slot(torch.arange(t, device=k.device), t - 1)
        hs, ts = kept.expand(len(self.local), t).nonzero(as_tuple=True)
        slots = slot.expand(len(self.local), t)[hs, ts]
        self.k[:, hs, slots] = self.heads_of(k)[:, hs, ts]
        self.v[:, hs, slots] = self.heads_of(v)[:, hs, ts]

    def write_step(self, i: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the keys/values (B, H, 1, d) of position i (1,): a head that does not keep
        it writes its slot 0 back unchanged, so the shapes never depend on i."""
        slot, kept = self.slot(i, i)  # (Hs or 1, 1)
        if self.always_kept:
            self.k.index_copy_(2, slot[0], self.heads_of(k))
            self.v.index_copy_(2, slot[0], self.heads_of(v))
            return
        slot = torch.where(kept, slot, 0)[:, 0]  # (Hs,)
        kept = kept[None, :, :]  # (1, Hs, 1)
        for buf, new in ((self.k, k), (self.v, v)):
            old = buf[:, self.local, slot]  # (B, Hs, d)
            buf[:, self.local, slot] = torch.where(kept, self.heads_of(new)[:, :, 0], old)

    def scores(
        self, q: torch.Tensor, i: torch.Tensor, scale: float, compute: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked scores (B, Hs, S) of the query (B, H, 1, d_qk) at i, and the values read."""
        p, valid, gather = self.held(i)
        k, v = self.k, self.v
        if gather is not None:
            k, v = k.index_select(2, gather), v.index_select(2, gather)  # (B, Hs, S, d)
        s = _dot(self.heads_of(q)[:, :, 0].to(compute), k.to(compute))  # (B, Hs, S)
        return (s * scale).masked_fill(~(valid & self.allowed(i, p)), float("-inf")), v


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


# When traced by torch.compile the products are written as multiply-and-sum: Inductor makes
# each one reduction that reads the fp16 keys/values and widens them in registers (a matmul
# would first write an fp32 copy of the cache). Eager, einsum (a batched matmul) is faster.
def _dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, d) . k (B, H, S, d) -> (B, H, S)."""
    if torch.compiler.is_compiling():
        return (q[:, :, None, :] * k).sum(-1)
    return torch.einsum("bhd,bhsd->bhs", q, k)


def _mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, S) weights the values v (B, H, S, d) -> (B, H, d)."""
    if torch.compiler.is_compiling():
        return (p[..., None] * v).sum(-2)
    return torch.einsum("bhs,bhsd->bhd", p, v)


# -- layers and the model's cache -----------------------------------------------------------------


class StaticLayerCache:
    """The fixed-shape stores of one attention layer; ``pos`` is the position decoded next."""

    def __init__(
        self,
        pattern: Pattern,
        n_ctx: int,
        shape: tuple[int, int, int, int],
        pos: torch.Tensor,
        like: torch.Tensor,
    ) -> None:
        self.pattern, self.pos = pattern, pos
        specs = plan_layer(pattern, n_ctx, shape[1])
        self.stores = [_STORES[s.kind](s, pattern, n_ctx, shape, like) for s in specs]

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
            for store in self.stores:
                store.write_prompt(k, v)
            return sparse(q, k, v)
        for store in self.stores:
            store.write_step(self.pos, k, v)
        return self.attend(q, self.pos, scale)

    def attend(self, q: torch.Tensor, i: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the query (B, H, 1, d_qk) at i (1,) over the stores -> (B, H, 1, d).

        Rows with no readable key give zeros, as in ``ops.sparse_attention``.
        """
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        parts = [store.scores(q, i, scale, compute) for store in self.stores]
        s = torch.cat(
            [st.to_all_heads(sc, float("-inf")) for st, (sc, _) in zip(self.stores, parts)], -1
        )  # (B, H, S): every store's slots side by side
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))  # exp(-inf) = 0 when masked
        denom = p.sum(-1, keepdim=True)
        p = p / torch.where(denom == 0, 1.0, denom)
        out = None
        start = 0
        for store, (sc, v) in zip(self.stores, parts):
            p_store = store.heads_of(p[..., start : start + sc.shape[-1]])  # (B, Hs, S)
            start += sc.shape[-1]
            o = _mix(p_store, v.to(compute))  # (B, Hs, d)
            o = store.to_all_heads(o, 0.0)
            out = o if out is None else out + o
        assert out is not None
        return out[:, :, None].to(q.dtype)  # (B, H, 1, d)

    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return sum(t.numel() * t.element_size() for s in self.stores for t in (s.k, s.v))


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

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer a step reads or writes (for ``torch._dynamo.mark_static_address``)."""
        return [self.pos] + [t for layer in self.layers for s in layer.stores for t in (s.k, s.v)]

    def nbytes(self) -> int:
        """Bytes of keys and values over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
