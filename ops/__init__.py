"""ops: attention patterns, block layouts and block-sparse attention kernels.

Knows nothing of models. The public surface:

- :class:`Pattern`, :func:`pattern_for_layer`: the paper's patterns as mask_mods;
- :func:`compile_layout` -> :class:`BlockLayout`: block lists for kernels;
- :func:`sparse_attention`: the attention entry point with its backends;
- :func:`decode_attention`: one query per head over gathered cache rows (decoding).
"""

from sparse_transformer.ops.attention import BACKENDS, sparse_attention, triton_available
from sparse_transformer.ops.decode import decode_attention, decode_attention_ref
from sparse_transformer.ops.layout import BlockLayout, compile_layout
from sparse_transformer.ops.patterns import (
    HEAD_MODES,
    PATTERN_KINDS,
    Pattern,
    dense_mask,
    pattern_for_layer,
)

__all__ = [
    "BACKENDS",
    "HEAD_MODES",
    "PATTERN_KINDS",
    "BlockLayout",
    "Pattern",
    "compile_layout",
    "decode_attention",
    "decode_attention_ref",
    "dense_mask",
    "pattern_for_layer",
    "sparse_attention",
    "triton_available",
]
