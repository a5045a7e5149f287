"""model: the Sparse Transformer network (Child et al. 2019), free of parallelism.

Public API:

- :class:`SparseTransformerConfig`, :func:`load_model_config`, :func:`list_model_configs`:
  the validated configuration and the named ones in ``configs/*.yaml``;
- :class:`SparseTransformer`: the network (``forward``, ``init_weights``,
  ``loss_bits``, ``decode`` with a :class:`KVCache`);
- :func:`generate`: batched sampling with temperature and top-p; ``fast=True`` decodes
  with a :class:`StaticKVCache` and a compiled step (``fast_decode``), same tokens;
- :func:`cache_bytes`: the static cache's bytes per layer beside a dense cache's;
- :func:`nats_to_bits`: the paper's unit.

Imports ``sparse_transformer.ops`` only: no Ray, no DeepSpeed.
"""

from sparse_transformer.model.config import (
    RECOMPUTE_POLICIES,
    SparseTransformerConfig,
    list_model_configs,
    load_model_config,
)
from sparse_transformer.model.fast_decode import FAST_MODES, StaticDecoder
from sparse_transformer.model.generate import generate, sample_logits
from sparse_transformer.model.kv_cache import KVCache, LayerKVCache
from sparse_transformer.model.static_cache import StaticKVCache, cache_bytes
from sparse_transformer.model.transformer import SparseTransformer, nats_to_bits

__all__ = [
    "FAST_MODES",
    "RECOMPUTE_POLICIES",
    "KVCache",
    "LayerKVCache",
    "SparseTransformer",
    "SparseTransformerConfig",
    "StaticDecoder",
    "StaticKVCache",
    "cache_bytes",
    "generate",
    "list_model_configs",
    "load_model_config",
    "nats_to_bits",
    "sample_logits",
]
