"""``distributed.evaluation``: the one evaluation and the one sampling function the trainer
and the ``eval`` / ``sample`` commands share, against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_transformer.distributed import evaluation
from sparse_transformer.model import SparseTransformer, generate
from tests.test_model import randomize, small_config


def test_loss_sums_weight_each_batch_by_its_tokens() -> None:
    model = randomize(SparseTransformer(small_config()).double(), std=0.1).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (b, 48), generator=g) for b in (3, 1)]  # a short last one
    sums = evaluation.loss_sums(model, batches, torch.device("cpu"))
    logits = [model(b)[0] for b in batches]
    nats = sum(
        torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, 256), b[:, 1:].reshape(-1),
                                          reduction="sum")
        for x, b in zip(logits, batches)
    )  # fmt: skip
    assert sums.dtype == torch.float64 and sums[1].item() == 4 * 47
    torch.testing.assert_close(sums[0], nats.double())
    bits = evaluation.bits_per_token(sums)
    assert math.isclose(bits, nats.item() / (4 * 47) / math.log(2), rel_tol=1e-12)
    assert math.isnan(evaluation.bits_per_token([0.0, 0.0]))


@pytest.mark.parametrize("min_context", [1, 24, 40, 47])
def test_context_windows_score_every_target_once_after_min_context(min_context: int) -> None:
    """Table 3's protocol on a stream of positions: each target in [first, last) comes
    once, from a window holding at least ``min_context`` and at most n - 1 tokens before it."""
    n, stream = 48, torch.arange(300)
    first, last = n - 1, len(stream) - n + 1
    scored: list[int] = []
    for windows, targets in evaluation.context_windows(stream, n, min_context, first, last, 3):
        assert windows.shape == targets.shape and windows.shape[1:] == (n,)
        for window, target in zip(windows, targets):
            for j in torch.nonzero(target >= 0).flatten().tolist():
                assert target[j] == window[j + 1]  # position j predicts the next token
                assert min_context <= j + 1 <= n - 1  # ... from its j + 1 tokens of context
                scored.append(int(target[j]))
    assert scored == list(range(first, last))


def test_context_windows_refuse_what_does_not_fit() -> None:
    stream = torch.arange(100)
    with pytest.raises(ValueError, match="min_context"):
        next(evaluation.context_windows(stream, 48, 48, 47, 53, 1))
    with pytest.raises(ValueError, match="do not fit"):
        next(evaluation.context_windows(stream, 48, 24, 47, 54, 1))
    with pytest.raises(ValueError, match="do not fit"):
        next(evaluation.context_windows(stream, 48, 24, 20, 53, 1))


def test_scored_loss_sums_count_only_scored_targets() -> None:
    model = randomize(SparseTransformer(small_config()).double(), std=0.1).eval()
    stream = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    pairs = list(evaluation.context_windows(stream, 48, 40, 47, 153, 4))
    sums = evaluation.scored_loss_sums(model, pairs, torch.device("cpu"))
    nats = sum(
        torch.nn.functional.cross_entropy(model(w)[0].reshape(-1, 256), t.reshape(-1),
                                          ignore_index=-1, reduction="sum")
        for w, t in pairs
    )  # fmt: skip
    assert sums[1].item() == 153 - 47
    torch.testing.assert_close(sums[0], nats.double())


def test_sample_text_is_generate_from_the_prompt_with_a_seed() -> None:
    model = randomize(SparseTransformer(small_config()), std=0.1).eval()
    text = evaluation.sample_text(model, "ab", 10, seed=3, device=torch.device("cpu"), top_p=0.9)
    idx = torch.tensor([list(b"ab")])
    want = generate(model, idx, 10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert text == bytes(want[0].tolist()).decode("utf-8", errors="replace")
    long = evaluation.sample_text(model, "", 1000, seed=3, device=torch.device("cpu"))
    assert 0 < len(long) <= 48  # 48 bytes at most (n_ctx), each at most one character
