"""sparse_transformer: the Sparse Transformer (Child et al., 2019) trained at scale.

Packages: ``ops`` (patterns, block layouts, attention kernels), ``model`` (the
network), ``data`` (sharded streaming datasets), ``distributed`` (Ray Train +
DeepSpeed), ``benchmarks``.
"""

__version__ = "0.1.0"
