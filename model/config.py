"""The model configuration: one validated dataclass and the named YAML configurations.

:class:`SparseTransformerConfig` holds every architectural choice of the paper
(Child et al. 2019, sections 4-6): depth, width, heads, the half-size
multipliers, the attention pattern (kind, stride l, summary width c, how heads
combine the two components), the block sizes handed to the layout compiler, the
embedding structure, dropout and the activation-recomputation policy. It is
validated on construction: each field against its annotation by the project's one
config validator (``configs.schema``: types, ``Literal`` choices, bounds), then the
rules between fields (widths divisible by the heads, the context by the stride, ...)
as the small checks below. Every error message starts with the offending field's
name (``SparseTransformerConfig.d_model: ...``) and is a ``configs.schema.ConfigError``
(a ``ValueError``).

Named configurations live in ``configs/NAME.yaml`` (shipped as package data).
Each file has a top-level ``model:`` mapping with these fields; other top-level
sections (``data:``, ``train:``, ...) belong to other packages and are ignored
here. :func:`load_model_config` accepts a bare name (``"enwik8"``) or a path.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from sparse_transformer import configs
from sparse_transformer.configs.schema import Noun, Range, build, check_fields, coerce, fail
from sparse_transformer.ops import Pattern, pattern_for_layer
from sparse_transformer.ops.patterns import HeadMode, PatternKind

_NAME = "SparseTransformerConfig"

Count = Annotated[int, Range(ge=1)]
"""A size or a count: an integer >= 1."""

RecomputePolicy = Literal["none", "attention", "block"]
"""Activation recomputation per residual block: nothing, the attention branch
a(H) only, or the whole block (non-reentrant ``torch.utils.checkpoint``)."""

RECOMPUTE_POLICIES: tuple[str, ...] = typing.get_args(RecomputePolicy)

AttentionBackend = Literal["auto", "reference", "torch", "flex", "triton", "sdpa"]
"""The backends of ``ops.sparse_attention`` (``ops.BACKENDS``, the same names)."""

_Policy = Annotated[RecomputePolicy, Noun("policy")]


def _fail(name: str, message: str) -> NoReturn:
    fail(f"{_NAME}.{name}", message)


@dataclass(frozen=True)
class SparseTransformerConfig:
    """Every architectural choice of one Sparse Transformer (validated on construction)."""

    n_layers: Count = 4
    """N, the number of residual blocks."""
    d_model: Count = 128
    """d, the width of the residual stream."""
    n_heads: Count = 4
    ff_mult: float = 4.0
    """Width of W1 relative to d: 4, or 2 for the paper's half-size models."""
    qk_mult: float = 1.0
    """Width of the q and k projections relative to d: 1, or 0.5 for half-size models."""
    vocab_size: Count = 256
    n_ctx: Count = 1024
    """n, the context length (the longest sequence the model accepts)."""
    pattern: Annotated[PatternKind, Noun("pattern")] = "fixed"
    """Attention pattern kind: dense, local, strided or fixed (``ops.PATTERN_KINDS``)."""
    stride: int = 32
    """l: the stride (strided), the chunk length (fixed) or the window (local); >= 1
    unless the pattern is dense."""
    summary: int = 8
    """c: the width of the fixed pattern's summary cells (>= 1 for fixed)."""
    head_mode: Annotated[HeadMode, Noun("mode")] = "merged"
    """How heads use the two components: interleaved, merged or multihead."""
    distinct_summary: bool = True
    """Fixed A2: each head reads its own length-c sub-block of every chunk."""
    permute: bool = True
    """Strided A2-only heads run in the transposed order (section 5.5)."""
    block_q: Count = 64
    block_k: Count = 64
    """Query/key block sizes of the block-sparse layout (``ops.compile_layout``)."""
    embed_shape: tuple[Count, ...] = ()
    """The data's structure, one learned position embedding per coordinate: (32, 32, 3)
    for CIFAR-10 rows/columns/channels, (n / l, l) for text and audio. Its product
    must be n_ctx. Empty (or None): (n / l, l) for strided/fixed, (n,) otherwise."""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Dropout at the end of each residual branch (and nowhere else)."""
    recompute: _Policy | tuple[_Policy, ...] = "none"
    """Recomputation policy: one of RECOMPUTE_POLICIES for every block, or one per block."""
    attention_backend: Annotated[AttentionBackend, Noun("backend")] = "auto"
    """Backend of ``ops.sparse_attention``: auto, reference, torch, flex, triton, or sdpa
    (PyTorch's fused dense kernels; dense patterns only)."""
    compile: bool | Literal["auto", "cudagraphs"] = "auto"
    """``torch.compile`` the residual blocks (``SparseTransformer.compile_blocks``) in
    training: true, false, auto (on CUDA GPUs), or cudagraphs (compiled, and replayed as
    CUDA graphs: ``mode="reduce-overhead"``, for thin, deep, launch-bound models). Read by
    the trainer; the model builds eager either way."""

    def __post_init__(self) -> None:
        if self.embed_shape is None:  # YAML's null: derived, like ()
            object.__setattr__(self, "embed_shape", ())
        check_fields(self, _NAME)  # types, choices and bounds, normalised in place
        self._check_widths()
        self._check_pattern()
        self._derive_embed_shape()
        if not isinstance(self.recompute, str) and len(self.recompute) != self.n_layers:
            _fail(
                "recompute",
                f"a per-block list needs n_layers = {self.n_layers} entries, "
                f"got {len(self.recompute)}",
            )
        if self.attention_backend == "sdpa" and self.pattern != "dense":
            _fail(
                "attention_backend",
                f"sdpa runs dense causal attention only; pattern is {self.pattern!r}",
            )
        self._check_ops_patterns()

    # -- rules between fields ------------------------------------------------------------
    def _check_widths(self) -> None:
        """The vocabulary, and every width a whole number divisible by the heads."""
        if self.vocab_size < 2:
            _fail("vocab_size", f"must be at least 2, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            _fail("d_model", f"{self.d_model} is not divisible by n_heads = {self.n_heads}")
        for name in ("ff_mult", "qk_mult"):
            value = getattr(self, name)
            if value <= 0:
                _fail(name, f"must be positive, got {value!r}")
            width = self.d_model * value
            if abs(width - round(width)) > 1e-9:
                _fail(name, f"d_model * {name} = {width} is not an integer")
        if self.d_qk % self.n_heads:
            _fail(
                "qk_mult",
                f"the q/k width d_model * qk_mult = {self.d_qk} is not divisible by "
                f"n_heads = {self.n_heads}",
            )

    def _check_pattern(self) -> None:
        """The stride and summary the pattern uses, and heads enough for multihead."""
        if self.pattern != "dense":
            coerce(f"{_NAME}.stride", Count, self.stride)
        if self.pattern == "fixed":
            coerce(f"{_NAME}.summary", Count, self.summary)
            if self.summary > self.stride:
                _fail("summary", f"c = {self.summary} exceeds the chunk length l = {self.stride}")
        if (
            self.head_mode == "multihead"
            and self.pattern in ("strided", "fixed")
            and self.n_heads < 2
        ):
            _fail("head_mode", "multihead needs n_heads >= 2 (one head per component)")

    def _derive_embed_shape(self) -> None:
        """The default structure where none is given; its product must be the context."""
        shape = self.embed_shape
        if not shape:
            if self.pattern in ("strided", "fixed"):
                if self.n_ctx % self.stride:
                    _fail(
                        "embed_shape",
                        f"not given, and the default (n_ctx / stride, stride) needs n_ctx = "
                        f"{self.n_ctx} divisible by stride = {self.stride}",
                    )
                shape = (self.n_ctx // self.stride, self.stride)
            else:
                shape = (self.n_ctx,)
        if math.prod(shape) != self.n_ctx:
            _fail(
                "embed_shape",
                f"{shape} has {math.prod(shape)} positions but n_ctx = {self.n_ctx}; "
                "the structure's product must equal the context",
            )
        object.__setattr__(self, "embed_shape", shape)

    def _check_ops_patterns(self) -> None:
        """Let ops validate the patterns too (e.g. multihead with too few heads)."""
        for layer in range(min(self.n_layers, 2)):
            try:
                self.pattern_for(layer)
            except ValueError as err:
                _fail("pattern", str(err))

    # -- derived sizes ------------------------------------------------------------------
    @property
    def d_head(self) -> int:
        """Per-head width of v (and of the attention output)."""
        return self.d_model // self.n_heads

    @property
    def d_qk(self) -> int:
        """Width of the q and k projections: d_model * qk_mult."""
        return round(self.d_model * self.qk_mult)

    @property
    def d_head_qk(self) -> int:
        """Per-head width of q and k."""
        return self.d_qk // self.n_heads

    @property
    def d_ff(self) -> int:
        """Width of W1's output: d_model * ff_mult."""
        return round(self.d_model * self.ff_mult)

    def pattern_for(self, layer: int) -> Pattern:
        """The attention pattern of residual block ``layer`` (0-based)."""
        return pattern_for_layer(
            self.pattern,
            mode=self.head_mode,
            layer=layer,
            n_heads=self.n_heads,
            stride=self.stride if self.pattern != "dense" else 0,
            summary=self.summary if self.pattern == "fixed" else 0,
            distinct_summary=self.distinct_summary,
            permute=self.permute,
        )

    def recompute_for(self, layer: int) -> str:
        """The recomputation policy of residual block ``layer``."""
        if isinstance(self.recompute, str):
            return self.recompute
        return self.recompute[layer]

    # -- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SparseTransformerConfig:
        """Build from a plain mapping (e.g. a YAML ``model:`` section); unknown keys fail."""
        return build(cls, values, _NAME)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe values (tuples become lists) that ``from_dict`` reads back."""
        out = asdict(self)
        out["embed_shape"] = list(self.embed_shape)
        if not isinstance(self.recompute, str):
            out["recompute"] = list(self.recompute)
        return out

    def replace(self, **changes: Any) -> SparseTransformerConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# -- named configurations -------------------------------------------------------------


def configs_dir() -> Path:
    """The packaged ``configs/`` folder."""
    return configs.configs_dir()


def list_model_configs() -> list[str]:
    """Names of the packaged configurations (``configs/*.yaml``), sorted."""
    return configs.names()


def load_model_config(name_or_path: str | Path) -> SparseTransformerConfig:
    """The ``model:`` section of a named configuration or of a YAML file.

    A bare name (no ``/`` and no ``.yaml`` suffix) is looked up in the packaged
    ``configs/`` folder; anything else is read as a path (``configs.resolve``).
    """
    import yaml

    try:
        path, _ = configs.resolve(name_or_path)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"model config: {err}") from None
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("model"), Mapping):
        raise ValueError(f"model config: {path} has no top-level 'model:' mapping")
    try:
        return SparseTransformerConfig.from_dict(doc["model"])
    except ValueError as err:
        raise ValueError(f"{err} (in {path})") from err
