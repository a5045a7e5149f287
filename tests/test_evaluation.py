"""``distributed.evaluation``: the one evaluation and the one sampling function the trainer
and the ``eval`` / ``sample`` commands share, against a direct computation."""

from __future__ import annotations

import math

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


def test_sample_text_is_generate_from_the_prompt_with_a_seed() -> None:
    model = randomize(SparseTransformer(small_config()), std=0.1).eval()
    text = evaluation.sample_text(model, "ab", 10, seed=3, device=torch.device("cpu"), top_p=0.9)
    idx = torch.tensor([list(b"ab")])
    want = generate(model, idx, 10, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert text == bytes(want[0].tolist()).decode("utf-8", errors="replace")
    long = evaluation.sample_text(model, "", 1000, seed=3, device=torch.device("cpu"))
    assert 0 < len(long) <= 48  # 48 bytes at most (n_ctx), each at most one character
