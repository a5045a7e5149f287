"""The Sparse Transformer (Child et al. 2019, sections 5.2-6), read top to bottom.

    H_0 = embed(X)                                  token + one embedding per coordinate
    a(H) = dropout(attention(norm(H)))              factorized (sparse) self-attention
    b(H) = dropout(ff(norm(H + a(H))))              ff(x) = W2 f(W1 x + b1) + b2
    H_k = H_{k-1} + a(H_{k-1}) + b(H_{k-1})         pre-activation residual block
    y = softmax(norm(H_N) W_out)

with f(x) = x * sigmoid(1.702 x). Dropout sits only at the end of the two
residual branches. Initialisation (section 6, :meth:`SparseTransformer.init_weights`):
token embedding N(0, 0.125 / sqrt(d)), position embeddings N(0, 0.125 / sqrt(d
n_emb)), other weights N(0, 0.125 / sqrt(fan_in)) with W2 and the attention
output projection further scaled by 1 / sqrt(2N), biases 0, layer norms 1/0,
output logits matrix 0 (so the loss at step 0 is exactly log2(vocab) bits).

Attention goes through ``ops.sparse_attention`` with one layout per pattern.
Half-size models project q and k to d * qk_mult channels while v keeps d: the
q and k heads (width d_qk / H) are zero-padded to v's head width d / H before
the kernel (exact: zero channels add nothing to q . k), with the scale set
explicitly to d_head_qk ** -0.5. The model knows nothing of parallelism: no Ray,
no DeepSpeed.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sparse_transformer.model.config import SparseTransformerConfig
from sparse_transformer.model.kv_cache import KVCache, LayerKVCache
from sparse_transformer.model.static_cache import StaticLayerCache
from sparse_transformer.ops import BlockLayout, compile_layout, sparse_attention

LN2 = math.log(2.0)
LayerCache = LayerKVCache | StaticLayerCache  # a layer's decoding cache: eager or static


def nats_to_bits(loss: torch.Tensor | float) -> torch.Tensor | float:
    """Convert a loss in nats to bits (per dim / byte): divide by ln 2."""
    return loss / LN2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """f(x) = x * sigmoid(1.702 x): the paper's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


class SparseSelfAttention(nn.Module):
    """Multi-head causal self-attention under one layer's factorized pattern."""

    def __init__(self, cfg: SparseTransformerConfig, layer: int) -> None:
        super().__init__()
        self.pattern = cfg.pattern_for(layer)
        self.backend, self.block_q, self.block_k = cfg.attention_backend, cfg.block_q, cfg.block_k
        self.n_heads, self.d_head, self.d_head_qk = cfg.n_heads, cfg.d_head, cfg.d_head_qk
        self.qkv = nn.Linear(cfg.d_model, 2 * cfg.d_qk + cfg.d_model)  # [q | k | v]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)  # W_p
        self.scale = self.d_head_qk**-0.5
        self._bound: tuple[int, torch.device, BlockLayout] | None = None

    def bind(self, n: int, device: torch.device) -> BlockLayout:
        """The layout for sequences of ``n`` on ``device``, compiled once and kept.

        The model binds every layer before its blocks run, so a compiled block only
        reads the bound layout and never traces the layout compiler.
        """
        if self._bound is None or self._bound[:2] != (n, device):
            layout = compile_layout(
                self.pattern, n, self.n_heads, self.block_q, self.block_k, device=device
            )
            if layout.any_permuted:  # the torch backend's cached orders: filled here, so a
                layout.head_inverse_orders()  # compiled (checkpointed) region never writes
            self._bound = (n, device, layout)
        return self._bound[2]

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H, dq, dv = self.n_heads, self.d_head_qk, self.d_head
        q, k, v = self.qkv(x).split([H * dq, H * dq, C], dim=-1)  # (B, T, H*dq) x2, (B, T, C)
        q = q.view(B, T, H, dq).transpose(1, 2)  # (B, H, T, dq)
        k = k.view(B, T, H, dq).transpose(1, 2)  # (B, H, T, dq)
        v = v.view(B, T, H, dv).transpose(1, 2)  # (B, H, T, dv)
        if cache is None:
            y = self._sparse(q, k, v)  # (B, H, T, dv)
        else:  # the cache keeps k, v and runs the prefill (sparse) or one decoding step
            y = cache.attention(q, k, v, self._sparse, self.scale)  # (B, H, T, dv)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, H*dv): heads side by side
        return self.proj(y)

    def _sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block-sparse attention of (B, H, T, d) tensors through ``ops``."""
        T, dq, dv = q.shape[2], q.shape[-1], v.shape[-1]
        width = max(dq, dv)
        if dq < width:  # half-size q/k: zero channels leave q . k unchanged
            q = F.pad(q, (0, width - dq))  # (B, H, T, width)
            k = F.pad(k, (0, width - dq))  # (B, H, T, width)
        if dv < width:
            v = F.pad(v, (0, width - dv))  # (B, H, T, width)
        layout = self.bind(T, q.device)
        y = sparse_attention(q, k, v, layout, backend=self.backend, scale=self.scale)
        return y[..., :dv]  # (B, H, T, dv)


class FeedForward(nn.Module):
    """ff(x) = W2 f(W1 x + b1) + b2."""

    def __init__(self, cfg: SparseTransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(quick_gelu(self.w1(x)))


class Block(nn.Module):
    """H + a(H) + b(H): the pre-activation residual block of section 5.2."""

    def __init__(self, cfg: SparseTransformerConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = SparseSelfAttention(cfg, layer)
        self.drop_a = nn.Dropout(cfg.dropout)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg)
        self.drop_b = nn.Dropout(cfg.dropout)
        self.recompute = cfg.recompute_for(layer)

    def branch_a(self, h: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """a(H) = dropout(attention(norm(H)))."""
        return self.drop_a(self.attn(self.ln_1(h), cache))

    def branch_b(self, h_plus_a: torch.Tensor) -> torch.Tensor:
        """b(H) = dropout(ff(norm(H + a(H))))."""
        return self.drop_b(self.ff(self.ln_2(h_plus_a)))

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        h_plus_a = h + self.branch_a(h)
        return h_plus_a + self.branch_b(h_plus_a)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is not None or self.recompute == "none" or not torch.is_grad_enabled():
            h_plus_a = h + self.branch_a(h, cache)
            return h_plus_a + self.branch_b(h_plus_a)
        if self.recompute == "block":  # keep only the block's input
            return checkpoint(self._block, h, use_reentrant=False)
        # "attention": keep a(H) but recompute norm, q/k/v and the attention inside it
        h_plus_a = h + checkpoint(self.branch_a, h, use_reentrant=False)
        return h_plus_a + self.branch_b(h_plus_a)


class SparseTransformer(nn.Module):
    """The autoregressive Sparse Transformer over a vocabulary of ``vocab_size`` tokens.

    ``forward(idx, targets)`` returns ``(logits, loss)``: logits (B, T, vocab) at
    position t predict token t + 1 (so ``targets`` is ``idx`` shifted by one), and
    the mean cross-entropy in nats (None without targets). Report it in bits per
    dim/byte with :meth:`loss_bits` or :func:`nats_to_bits`.
    """

    def __init__(self, cfg: SparseTransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)  # W_e
        self.pos_emb = nn.ModuleList(nn.Embedding(size, d) for size in cfg.embed_shape)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)  # W_out
        # row-major strides of the structure: position i -> coordinate (i // s) % size
        shape = cfg.embed_shape
        self._coord_strides = [math.prod(shape[k + 1 :]) for k in range(len(shape))]
        self._compiled_blocks: list[nn.Module] = []  # see compile_blocks
        if not self.tok_emb.weight.is_meta:
            self.init_weights()

    # -- initialisation (section 6) ------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | int | None = None) -> None:
        """Initialise every parameter as section 6 prescribes.

        ``generator``: a ``torch.Generator`` on the parameters' device, an int seed,
        or None (the global RNG). Works after ``to_empty`` on a model built on the
        meta device.
        """
        if self.tok_emb.weight.is_meta:
            raise RuntimeError("init_weights: materialise the model first (model.to_empty(...))")
        if isinstance(generator, int):
            seed = generator
            generator = torch.Generator(device=self.tok_emb.weight.device).manual_seed(seed)
        cfg, d = self.config, self.config.d_model
        residual_scale = 1.0 / math.sqrt(2 * cfg.n_layers)

        def normal(w: torch.Tensor, std: float) -> None:
            nn.init.normal_(w, 0.0, std, generator=generator)

        def linear(m: nn.Linear, scale: float = 1.0) -> None:
            normal(m.weight, 0.125 / math.sqrt(m.in_features) * scale)  # fan-in = d_in
            if m.bias is not None:
                nn.init.zeros_(m.bias)

        def norm(m: nn.LayerNorm) -> None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

        normal(self.tok_emb.weight, 0.125 / math.sqrt(d))
        for emb in self.pos_emb:
            normal(emb.weight, 0.125 / math.sqrt(d * len(self.pos_emb)))
        for block in self.blocks:
            norm(block.ln_1)
            linear(block.attn.qkv)
            linear(block.attn.proj, residual_scale)  # W_p / sqrt(2N)
            norm(block.ln_2)
            linear(block.ff.w1)
            linear(block.ff.w2, residual_scale)  # W2 / sqrt(2N)
        norm(self.ln_f)
        nn.init.zeros_(self.head.weight)  # output logits start at 0

    # -- the network -----------------------------------------------------------------------
    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """H_0: token embedding plus one learned embedding per structural coordinate."""
        T = idx.shape[1]
        if start + T > self.config.n_ctx:
            raise ValueError(
                f"model: positions {start}..{start + T - 1} exceed n_ctx = {self.config.n_ctx}"
            )
        return self.embed_at(idx, torch.arange(start, start + T, device=idx.device))

    def embed_at(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """H_0 of tokens (B, T) at the positions ``pos`` (T,), a tensor: no host-side
        position, so a compiled decoding step does not depend on it."""
        h = self.tok_emb(idx)  # (B, T, d)
        for emb, stride in zip(self.pos_emb, self._coord_strides):
            h = h + emb((pos // stride) % emb.num_embeddings)  # (T, d) broadcast over B
        return h

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, vocab), mean cross-entropy in nats or None).

        ``idx``: (B, T) token ids, T <= n_ctx. ``targets``: (B, T) next tokens;
        entries equal to -1 are ignored.
        """
        h = self.embed(idx)  # (B, T, d)
        for block in self.blocks:  # outside any compiled region
            block.attn.bind(idx.shape[1], idx.device)
        for block in self._compiled_blocks or self.blocks:
            h = block(h)
        logits = self.head(self.ln_f(h))  # (B, T, vocab)
        loss = None if targets is None else self.loss_nats(logits, targets)
        return logits, loss

    @staticmethod
    def loss_nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in nats over all non-ignored (-1) targets, computed in fp32+."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1
        )

    @classmethod
    def loss_bits(cls, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in bits per dim/byte: the paper's unit (nats / ln 2)."""
        return nats_to_bits(cls.loss_nats(logits, targets))

    # -- incremental decoding ---------------------------------------------------------------
    def new_cache(self) -> KVCache:
        """An empty key/value cache for :meth:`decode` (storage is allocated lazily)."""
        cfg = self.config
        patterns = [block.attn.pattern for block in self.blocks]
        return KVCache(patterns, cfg.n_ctx, cfg.n_heads)

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, vocab) of the T positions that follow the ``cache.length`` cached ones.

        An empty cache is filled from the whole prompt in one sparse forward
        (prefill); later calls decode one position at a time (T > 1 is stepped).
        """
        if cache.length > 0 and idx.shape[1] > 1:
            steps = [self.decode(idx[:, t : t + 1], cache) for t in range(idx.shape[1])]
            return torch.cat(steps, dim=1)  # (B, T, vocab)
        h = self.embed(idx, start=cache.length)  # (B, T, d)
        for block, layer_cache in zip(self.blocks, cache.layers):
            h = block(h, layer_cache)
        return self.head(self.ln_f(h))  # (B, T, vocab)

    # -- compilation -----------------------------------------------------------------------------
    def compile_blocks(self, **options: object) -> None:
        """Run every residual block through ``torch.compile(block, fullgraph=True)``.

        Training and evaluation forwards use the compiled blocks (recomputation
        included: the checkpointed region is traced too); decoding with a key/value
        cache stays eager. Blocks that share a pattern share one compiled graph, so
        the compile time does not grow with depth. ``options`` go to
        ``torch.compile`` (``mode``, ``backend``, ...). Compilation happens on the
        first forward.
        """
        # every block shares Block.forward's compile cache: one entry per (layout, recompute
        # policy, grad mode, length); PyTorch's default limit of 8 would fail fullgraph
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        self._compiled_blocks = [
            torch.compile(block, fullgraph=True, dynamic=False, **options) for block in self.blocks
        ]

    @property
    def compiled(self) -> bool:
        """Are the blocks compiled (:meth:`compile_blocks`)?"""
        return bool(self._compiled_blocks)

    # -- bookkeeping ---------------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def set_recompute(self, policy: str | list[str] | tuple[str, ...]) -> None:
        """Change the recomputation policy of every block (or one policy per block)."""
        self.config = self.config.replace(recompute=policy)  # validates
        for layer, block in enumerate(self.blocks):
            block.recompute = self.config.recompute_for(layer)

    def set_attention_backend(self, backend: str) -> None:
        """Switch every layer to another ``ops.sparse_attention`` backend."""
        self.config = self.config.replace(attention_backend=backend)  # validates
        for block in self.blocks:
            block.attn.backend = backend
