"""``SparseTransformer.compile_blocks``: every block compiles as one graph (fullgraph)
under each recomputation policy, and the compiled model computes what the eager one does.

Tiny configurations on the CPU (Inductor's C++ backend); the GPU path is the same
graph with the Triton attention op, checked by ``benchmarks/gpu_check.py`` and, on the
CPU, by ``tests/triton_interpret_check.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_transformer.model import SparseTransformer
from sparse_transformer.model.config import RECOMPUTE_POLICIES
from sparse_transformer.ops.layout import _compile_cached
from tests.test_model import randomize, small_config


def _loss_and_grads(model: SparseTransformer, idx: torch.Tensor, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("kind", "mode", "policy"),
    [
        # two patterns (even and odd layers), half-size q/k (padded heads)
        *[("strided", "interleaved", policy) for policy in RECOMPUTE_POLICIES],
        # cifar10's shape: one transposed (permuted) head per block, whole-block recompute
        ("strided", "multihead", "block"),
    ],
)
def test_compiled_blocks_match_eager(kind: str, mode: str, policy: str) -> None:
    """A model compiled cold (its first forward is compiled, as in the trainer) gives the
    eager twin's loss, gradients and evaluation logits."""
    cfg = small_config(kind, mode, recompute=policy)
    eager = randomize(SparseTransformer(cfg), std=0.1)
    model = copy.deepcopy(eager)
    idx = torch.randint(
        0, cfg.vocab_size, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(1)
    )
    _compile_cached.cache_clear()  # no layout (nor its cached orders) from earlier tests
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks()  # fullgraph: a graph break inside a block raises
    assert model.compiled
    loss, grads = _loss_and_grads(model, idx)  # compiled first: the layouts are cold
    assert counters["stats"]["unique_graphs"] >= (2 if mode == "interleaved" else 1)
    eager_loss, eager_grads = _loss_and_grads(eager, idx)
    with torch.no_grad():
        eager_logits, _ = eager(idx)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, eager_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation goes through the compiled blocks too
        logits, _ = model(idx)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)


def test_compiled_model_evaluates_at_many_lengths() -> None:
    """Every length (and each of its two patterns) is one more entry in the one compile
    cache all blocks share: more than PyTorch's default limit of 8 must still work."""
    cfg = small_config("strided", "interleaved")
    model = randomize(SparseTransformer(cfg), std=0.1).eval()
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    model.compile_blocks()
    idx = torch.randint(0, cfg.vocab_size, (1, cfg.n_ctx))
    with torch.no_grad():
        for n in (8, 16, 24, 32, 40, 48):  # 12 graphs
            torch.testing.assert_close(model(idx[:, :n])[0], twin(idx[:, :n])[0])


def test_compiled_dropout_backward_is_the_gradient_of_its_forward() -> None:
    """With dropout and whole-block recomputation, the backward must recompute the very
    masks the forward drew: a step along the gradient changes the loss (same seed, same
    masks) by the step times the gradient's norm. A mask redrawn in the recomputation
    would break the equality."""
    cfg = small_config("fixed", "merged", dropout=0.3, recompute="block")
    model = randomize(SparseTransformer(cfg).double(), std=0.1)
    model.compile_blocks()
    idx = torch.randint(
        0, cfg.vocab_size, (2, cfg.n_ctx), generator=torch.Generator().manual_seed(2)
    )
    loss0, grads = _loss_and_grads(model, idx, seed=5)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    eps = 1e-5
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p += eps * g / norm
        torch.manual_seed(5)
        _, loss1 = model(idx, idx.roll(-1, dims=1))
        torch.manual_seed(7)
        _, other_masks = model(idx, idx.roll(-1, dims=1))
    assert abs(other_masks.item() - loss1.item()) > 1e-4  # dropout is really on
    slope = (loss1 - loss0).item() / eps
    assert slope == pytest.approx(norm.item(), rel=1e-3)


def test_compile_choice_is_validated() -> None:
    assert small_config(compile=True).compile is True
    assert small_config().compile == "auto"
    assert small_config(compile="cudagraphs").compile == "cudagraphs"
    with pytest.raises(ValueError, match=r"SparseTransformerConfig\.compile: must be true"):
        small_config(compile="yes")
    with pytest.raises(ValueError, match=r"SparseTransformerConfig\.compile: must be true"):
        small_config(compile=1)


def test_sdpa_backend_in_the_model() -> None:
    """``attention_backend: sdpa`` is the dense baseline one config line away: same
    numbers as the block-sparse dense layout; refused for a sparse pattern."""
    cfg = small_config("dense", "merged")
    model = randomize(SparseTransformer(cfg).double())
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.n_ctx))
    want, _ = model(idx)
    model.set_attention_backend("sdpa")
    got, _ = model(idx)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"attention_backend: sdpa runs dense causal attention"):
        small_config("fixed", "merged", attention_backend="sdpa")
