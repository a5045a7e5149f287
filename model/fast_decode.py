"""The fast decoding path of ``generate(..., fast=...)``: a static cache and a captured step.

A :class:`StaticDecoder` holds, for one model, batch size and sampling setting, a
:class:`~sparse_transformer.model.static_cache.StaticKVCache`, the token buffer
(B, n_ctx) and the sampling noise (B, vocab). The prompt is prefilled eagerly
(one sparse forward pass, as the eager path); then each step reads the token at
``pos``, runs every block at that position, samples the next token into the
buffer and advances ``pos``, all on the device: the only host work per step is
drawing the noise (``noise.exponential_(1, generator=...)``, what
``torch.multinomial`` draws; see ``generate.sample_with_noise``) and launching
the step. So the same seed gives the eager path's tokens.

Modes (:data:`FAST_MODES`):

- ``static``: the step's kernels run one by one, eagerly (the CPU default).
- ``compile``: the whole step through ``torch.compile(fullgraph=True, dynamic=False)``;
  on CUDA with ``mode="reduce-overhead"``, so Inductor replays it as CUDA graphs.
  One compile per decoder, none per step; it grows with depth (90 s for enwik8's 30
  layers on an H200, over 4 minutes for cifar10's 128).
- ``graph``: the eager step captured in one ``torch.cuda.CUDAGraph`` and replayed
  (CUDA only): no compile time, but no fused kernels either.
- ``compile-blocks``: every block through ``torch.compile`` (default mode; blocks
  with one pattern share a graph, so compile time does not grow with depth; the
  step's reads, ``StaticKVCache.prepare_step``, are one more graph), and on
  CUDA the whole step captured in one CUDA graph (the CUDA default: as fast as
  ``compile`` on the H200, set up in seconds).
"""

from __future__ import annotations

import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from sparse_transformer.model.generate import sample_with_noise
from sparse_transformer.model.static_cache import StaticKVCache
from sparse_transformer.model.transformer import SparseTransformer

FastMode = Literal["static", "compile", "graph", "compile-blocks"]
FAST_MODES: tuple[str, ...] = typing.get_args(FastMode)

_KEEP = 4  # decoders kept per model (each holds its cache)
_DECODERS: weakref.WeakKeyDictionary[SparseTransformer, dict[tuple, StaticDecoder]]
_DECODERS = weakref.WeakKeyDictionary()


def default_mode(device: torch.device) -> str:
    """``compile-blocks`` (compiled blocks in one CUDA graph) on CUDA, ``static`` elsewhere."""
    return "compile-blocks" if device.type == "cuda" else "static"


def static_decode(
    model: SparseTransformer,
    idx: torch.Tensor,
    cache: StaticKVCache,
    blocks: Sequence[nn.Module] | None = None,
    prepare: Callable[[StaticKVCache], None] | None = None,
) -> torch.Tensor:
    """Logits (B, T, vocab) of the tokens idx (B, T) at positions pos .. pos + T - 1,
    keeping their keys and values in ``cache`` (``cache.pos`` is left as it is).

    T > 1 is the prompt (pos must be 0): one sparse forward pass, eager. T = 1 is one
    step over the cache, which ``torch.compile`` can trace as one graph. ``blocks``: the
    model's blocks or compiled twins of them; ``prepare``: a compiled twin of
    ``StaticKVCache.prepare_step``, which a step runs first.
    """
    if idx.shape[1] == 1:  # a step: the rows every layer reads at pos, once per pattern
        (prepare or StaticKVCache.prepare_step)(cache)
    pos = cache.pos + torch.arange(idx.shape[1], device=idx.device)  # (T,)
    h = model.embed_at(idx, pos)  # (B, T, d)
    for block, layer in zip(model.blocks if blocks is None else blocks, cache.layers):
        h = block(h, layer)
    return model.head(model.ln_f(h))  # (B, T, vocab)


def _step(
    model: SparseTransformer,
    cache: StaticKVCache,
    tokens: torch.Tensor,
    noise: torch.Tensor,
    blocks: Sequence[nn.Module],
    prepare: Callable[[StaticKVCache], None] | None,
    temperature: float,
    top_p: float,
) -> None:
    """One decoding step at pos: the token there in, the next token sampled into ``tokens``,
    pos + 1. Tensors only: nothing on the host depends on the position."""
    pos = cache.pos
    token_in = tokens.index_select(1, pos)
    logits = static_decode(model, token_in, cache, blocks, prepare)[:, -1]  # (B, V)
    token = sample_with_noise(logits, noise, temperature=temperature, top_p=top_p)  # (B, 1)
    tokens.index_copy_(1, pos + 1, token)
    pos.add_(1)


class StaticDecoder:
    """Static buffers and the (compiled or captured) step for ``batch`` sequences of a model.

    Holds no reference to the model (pass it to each call); it is reused by later
    calls with the same batch, sampling setting and parameters (:func:`decoder_for`).
    """

    def __init__(
        self,
        model: SparseTransformer,
        batch: int,
        *,
        mode: str = "static",
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        if mode not in FAST_MODES:
            raise ValueError(f"fast decoding: unknown mode {mode!r}; expected one of {FAST_MODES}")
        weight = model.tok_emb.weight
        if mode == "graph" and weight.device.type != "cuda":
            raise ValueError("fast decoding: mode 'graph' captures a CUDA graph; use a GPU")
        cfg = model.config
        self.mode, self.temperature, self.top_p = mode, temperature, top_p
        self.cache = StaticKVCache(cfg, batch, weight.dtype, weight.device)
        self.tokens = torch.zeros(batch, cfg.n_ctx, dtype=torch.long, device=weight.device)
        self.noise = torch.ones(batch, cfg.vocab_size, dtype=torch.float32, device=weight.device)
        self.length = 0  # tokens in the buffer (host-side; the step never reads it)
        self._cuda = weight.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._blocks: list[nn.Module] | None = None
        self._prepare: Callable[[StaticKVCache], None] | None = None  # compiled, or None
        self._run: Callable[..., None] = _step
        if mode == "compile":
            _raise_recompile_limit()
            for t in self.buffers():  # mutated in place by the step: fixed addresses
                torch._dynamo.mark_static_address(t, guard=True)
            options = {"mode": "reduce-overhead"} if self._cuda else {}
            self._run = torch.compile(_step, fullgraph=True, dynamic=False, **options)
        elif mode == "compile-blocks":
            _raise_recompile_limit()
            self._blocks = [
                torch.compile(block, fullgraph=True, dynamic=False) for block in model.blocks
            ]
            self._prepare = torch.compile(  # unbound: the cache holds no cycle to itself
                StaticKVCache.prepare_step, fullgraph=True, dynamic=False
            )

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a step reads or writes besides the model's parameters."""
        return [*self.cache.tensors(), self.tokens, self.noise]

    def _draw(self, generator: torch.Generator | None) -> None:
        if self.temperature > 0:  # greedy decoding draws nothing, as sample_logits
            self.noise.exponential_(1, generator=generator)

    @torch.no_grad()  # callers outside generate too: a step traced for autograd fails
    def start(
        self, model: SparseTransformer, prompt: torch.Tensor, generator: torch.Generator | None
    ) -> None:
        """Prefill the cache from ``prompt`` (B, T0) (eager) and sample the first token."""
        t0 = prompt.shape[1]
        self.cache.pos.zero_()
        self.tokens[:, :t0] = prompt
        logits = static_decode(model, prompt, self.cache)[:, -1]  # (B, vocab)
        self._draw(generator)
        temperature, top_p = self.temperature, self.top_p
        token = sample_with_noise(logits, self.noise, temperature=temperature, top_p=top_p)
        self.tokens[:, t0 : t0 + 1] = token
        self.cache.pos.fill_(t0)
        self.length = t0 + 1

    @torch.no_grad()
    def advance(self, model: SparseTransformer, generator: torch.Generator | None) -> None:
        """Decode one more token (after :meth:`start`)."""
        if self.length >= self.tokens.shape[1]:
            raise ValueError(f"fast decoding: the sequence is full (n_ctx = {self.length})")
        self._draw(generator)
        if self._cuda and self.mode in ("graph", "compile-blocks"):
            if self._graph is None:
                self._graph = self._capture(model)
            self._graph.replay()
        else:
            if self._cuda and self.mode == "compile":  # a new iteration of Inductor's graphs
                torch.compiler.cudagraph_mark_step_begin()
            self._call(model)
        self.length += 1

    def _call(self, model: SparseTransformer) -> None:
        blocks = model.blocks if self._blocks is None else self._blocks
        self._run(
            model, self.cache, self.tokens, self.noise, blocks, self._prepare,
            self.temperature, self.top_p,
        )  # fmt: skip

    def _capture(self, model: SparseTransformer) -> torch.cuda.CUDAGraph:
        """The step as one CUDA graph. A warm-up step first (lazy initialisation, the blocks'
        compilation) on a side stream; it computes what the next step will (the same token
        in, the same keys and values written), so rolling pos back undoes it."""
        pos = self.cache.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._call(model)
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.pos.copy_(pos)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            self._call(model)
        return graph

    def output(self) -> torch.Tensor:
        """The prompt and the tokens decoded so far (B, length), a copy."""
        return self.tokens[:, : self.length].clone()


def _raise_recompile_limit() -> None:
    """Each decoder compiles the step once (its buffers are guarded by address): room for
    several decoders (configurations, batch sizes) in one process."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 64))


def decoder_for(
    model: SparseTransformer, batch: int, *, mode: str, temperature: float, top_p: float
) -> StaticDecoder:
    """The model's decoder for this batch size, mode and sampling setting, made once and
    kept (the _KEEP most recently used per model) while its parameters stay where they are."""
    params = tuple(p.data_ptr() for p in model.parameters())
    weight = model.tok_emb.weight
    key = (batch, mode, temperature, top_p, weight.dtype, weight.device, params)
    kept = _DECODERS.setdefault(model, {})
    if key in kept:
        kept[key] = kept.pop(key)  # the most recently used last: evicted last
    else:
        while len(kept) >= _KEEP:
            kept.pop(next(iter(kept)))  # the least recently used
        kept[key] = StaticDecoder(model, batch, mode=mode, temperature=temperature, top_p=top_p)
    return kept[key]


def generate_static(
    model: SparseTransformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    mode: str,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``generate``'s fast path (arguments checked there; the model in eval mode)."""
    if max_new_tokens == 0:
        return prompt.clone()
    options: dict[str, Any] = dict(mode=mode, temperature=temperature, top_p=top_p)
    decoder = decoder_for(model, prompt.shape[0], **options)
    decoder.start(model, prompt, generator)
    for _ in range(max_new_tokens - 1):
        decoder.advance(model, generator)
    return decoder.output()
