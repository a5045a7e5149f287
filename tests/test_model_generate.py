"""Incremental decoding and sampling: the cached step equals the full forward pass, the
cache holds only what the pattern can still read, and sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from sparse_transformer.model import (
    LayerKVCache,
    SparseTransformer,
    generate,
    load_model_config,
    sample_logits,
)
from sparse_transformer.ops import Pattern, pattern_for_layer
from tests.test_model import IDS, PATTERN_MODES, build, small_config, tokens


def _incremental(model: SparseTransformer, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = model.new_cache()
    head = model.decode(idx[:, :prefill], cache)
    steps = [model.decode(idx[:, t : t + 1], cache) for t in range(prefill, idx.shape[1])]
    assert cache.length == idx.shape[1]
    return torch.cat([head, *steps], dim=1)


@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_incremental_decoding_matches_full_forward(kind, mode):
    cfg = small_config(kind, mode)
    model = build(cfg, dtype=torch.float32, seed=9).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        full, _ = model(idx)
        for prefill in (1, 13):
            inc = _incremental(model, idx, prefill)
            torch.testing.assert_close(inc, full, rtol=1e-5, atol=1e-5)


# pattern options beside PATTERN_MODES, for the caches (this one and the static one)
PATTERN_OPTIONS = {
    "shared-summary": dict(pattern="fixed", distinct_summary=False),
    "unpermuted": dict(pattern="strided", permute=False, head_mode="merged"),
    "c-equals-l": dict(pattern="fixed", summary=8, head_mode="multihead"),  # every cell a summary
    "stride-not-dividing-n": dict(
        pattern="strided", stride=5, embed_shape=(48,), head_mode="multihead"
    ),
    "stride-not-dividing-n-a1": dict(
        pattern="strided", stride=5, embed_shape=(48,), head_mode="interleaved"
    ),
}


@pytest.mark.parametrize("overrides", PATTERN_OPTIONS.values(), ids=PATTERN_OPTIONS.keys())
def test_incremental_decoding_pattern_options(overrides):
    cfg = small_config(**overrides)
    model = build(cfg, dtype=torch.float32, seed=10).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        full, _ = model(idx)
        torch.testing.assert_close(_incremental(model, idx, 7), full, rtol=1e-5, atol=1e-5)


def _long_config(kind, mode, **overrides):
    values = dict(
        n_layers=2,
        d_model=16,
        n_heads=2,
        ff_mult=2,
        qk_mult=1.0,
        n_ctx=4096,
        stride=64,
        summary=4,
        block_q=64,
        block_k=64,
        embed_shape=(64, 64),
    )
    values.update(overrides)
    return small_config(kind, mode, **values)


@pytest.mark.parametrize(
    "kind,mode,capacity",
    [
        ("fixed", "merged", [64 + 64 * 4] * 2),  # chunk + n / l * c summary cells
        ("fixed", "interleaved", [64, 64 * 4]),  # A1 layer: the chunk; A2: summaries
        ("fixed", "multihead", [64 + 64 * 4] * 2),
        ("strided", "interleaved", [65, 4096]),  # A1: the last l + 1; A2: every column
        ("local", "merged", [64, 64]),
        ("strided", "multihead", [4096, 4096]),
    ],
)
def test_cache_keeps_only_what_the_pattern_can_still_read(kind, mode, capacity):
    cfg = _long_config(kind, mode)
    model = build(cfg, dtype=torch.float32, seed=12).eval()
    cache = model.new_cache()
    assert cache.capacity == capacity
    idx = tokens(cfg, batch=1, n=400)
    with torch.no_grad():
        model.decode(idx[:, :100], cache)
        bytes_after_prefill = cache.nbytes()
        steps = [model.decode(idx[:, t : t + 1], cache) for t in range(100, 400)]
        assert cache.nbytes() == bytes_after_prefill  # nothing grows while decoding
        per_slot = (8 + 8) * 4 + 8  # key + value (fp32, 8 per head) + position (int64)
        scratch = sum(len(layer.stores) for layer in cache.layers)  # one never-read slot each
        assert bytes_after_prefill == (sum(capacity) + scratch) * cfg.n_heads * per_slot
        full, _ = model(idx)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 100:], rtol=1e-5, atol=1e-5)


def test_fixed_cache_is_far_below_n_for_the_enwik8_shape():
    cfg = load_model_config("enwik8")
    pattern = cfg.pattern_for(0)
    layer = LayerKVCache(pattern, cfg.n_ctx, cfg.n_heads)
    assert layer.capacity == 128 + 96 * 32  # 3,200 slots per head instead of 12,288
    strided = load_model_config("music-1m")
    a1_only = pattern_for_layer("strided", mode="interleaved", layer=0, n_heads=2, stride=1024)
    assert LayerKVCache(a1_only, strided.n_ctx, 2).capacity == 1025


def test_cached_attention_reads_q_and_k_in_fp32():
    """fp16 q . k of 64 channels of 300 overflows fp16 (5.8e6 > 65504); the cache computes
    it in fp32, as section 6 advises for sampling."""
    pattern = Pattern("dense")
    layer = LayerKVCache(pattern, 8, 1)
    g = torch.Generator().manual_seed(0)
    k = (300 + torch.rand(1, 1, 8, 64, generator=g)).half()
    v = torch.randn(1, 1, 8, 64, generator=g).half()
    layer.append(k[:, :, :7], v[:, :, :7])
    q = k[:, :, 7:]
    layer.append(k[:, :, 7:], v[:, :, 7:])
    out = layer.attend(q, 7, 64**-0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    s = (q.float()[0, 0] @ k.float()[0, 0].T) * 64**-0.5
    expect = torch.softmax(s, -1) @ v.float()[0, 0]
    torch.testing.assert_close(out.float()[0, 0], expect, rtol=2e-3, atol=2e-3)


def test_decode_refuses_more_than_n_ctx():
    cfg = small_config("fixed")
    model = build(cfg, dtype=torch.float32).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model.decode(tokens(cfg, batch=1), cache)
        with pytest.raises(ValueError, match="n_ctx"):
            model.decode(torch.zeros(1, 1, dtype=torch.long), cache)


# -- sampling -----------------------------------------------------------------------------


def test_sampling_with_a_fixed_seed_is_reproducible():
    cfg = small_config("strided", "multihead")
    model = build(cfg, dtype=torch.float32, seed=4, std=0.2)
    prompt = tokens(cfg, batch=3, n=5)
    a = generate(model, prompt, 30, temperature=0.9, top_p=0.95, generator=1234)
    b = generate(model, prompt, 30, temperature=0.9, top_p=0.95, generator=1234)
    c = generate(model, prompt, 30, temperature=0.9, top_p=0.95, generator=4321)
    assert a.shape == (3, 35)
    assert torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert model.training  # generate restores the mode it found


def test_greedy_generation_follows_the_full_forward_argmax():
    cfg = small_config("fixed", "interleaved")
    model = build(cfg, dtype=torch.float32, seed=6, std=0.2).eval()
    prompt = tokens(cfg, batch=2, n=3)
    out = generate(model, prompt, 20, temperature=0.0)
    with torch.no_grad():
        logits, _ = model(out[:, :-1])
    assert torch.equal(out[:, 3:], logits[:, 2:].argmax(-1))
    for row in range(2):  # batching changes nothing per sequence
        assert torch.equal(
            generate(model, prompt[row : row + 1], 20, temperature=0.0), out[row : row + 1]
        )


def test_generate_rejects_sequences_beyond_the_context():
    cfg = small_config("fixed")
    model = build(cfg, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_ctx"):
        generate(model, tokens(cfg, batch=1, n=40), 9)
    with pytest.raises(ValueError, match="T0 >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)


def _frequencies(logits, n=40000, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits.expand(n, -1), generator=g, **kw)[:, 0]
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / n


def test_temperature_scales_the_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    freq = _frequencies(logits, temperature=2.0)
    expect = torch.softmax(logits[0].double() / 2.0, -1)
    torch.testing.assert_close(freq, expect, rtol=0, atol=0.01)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    freq = _frequencies(logits, top_p=0.7)  # 0.5 + 0.3 >= 0.7: tokens 1 and 3
    expect = torch.tensor([0.0, 0.625, 0.0, 0.375], dtype=torch.float64)
    torch.testing.assert_close(freq, expect, rtol=0, atol=0.01)
    freq = _frequencies(logits, top_p=0.3)  # the single most likely token
    assert torch.equal(freq, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert _frequencies(logits, top_p=1.0)[0] > 0.03  # no truncation


def test_tiny_named_config_samples_end_to_end():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = SparseTransformer(cfg)
    prompt = torch.randint(0, 256, (2, 16))
    out = generate(model, prompt, 24, generator=0)
    assert out.shape == (2, 40) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < cfg.vocab_size
