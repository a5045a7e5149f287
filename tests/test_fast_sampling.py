"""The fast sampling path (issue 16): the static cache decodes what the full forward pass
computes, ``generate(..., fast=...)`` samples the eager path's tokens for the same seed
(eager kernels, and the step compiled as one graph that is not compiled again per step),
and the cache's bytes per layer are what a hand count gives. Tiny configs, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters

from sparse_transformer.benchmarks import sampling
from sparse_transformer.cli import main
from sparse_transformer.data import prepare
from sparse_transformer.distributed import evaluation
from sparse_transformer.model import generate, load_model_config
from sparse_transformer.model.fast_decode import StaticDecoder, decoder_for, static_decode
from sparse_transformer.model.static_cache import StaticKVCache, StaticLayerCache, cache_bytes
from sparse_transformer.ops import Pattern
from tests.test_model import IDS, PATTERN_MODES, build, small_config, tokens
from tests.test_model_generate import PATTERN_OPTIONS
from tests.test_sample_files import save_checkpoint, tiny_model


def _static_logits(model, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    """The prompt idx[:, :prefill] in one pass, then one position per step."""
    cache = StaticKVCache(model.config, idx.shape[0], torch.float64, "cpu")
    head = static_decode(model, idx[:, :prefill], cache)
    steps = []
    for t in range(prefill, idx.shape[1]):
        cache.pos.fill_(t)
        steps.append(static_decode(model, idx[:, t : t + 1], cache))
    return torch.cat([head, *steps], dim=1)


@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_static_cache_decodes_what_the_full_forward_computes(kind, mode):
    cfg = small_config(kind, mode)
    model = build(cfg, dtype=torch.float64, seed=9).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        full, _ = model(idx)
        for prefill in (1, 13):  # a one-token prompt is a step at position 0
            torch.testing.assert_close(_static_logits(model, idx, prefill), full)


@pytest.mark.parametrize("overrides", PATTERN_OPTIONS.values(), ids=PATTERN_OPTIONS.keys())
def test_static_cache_pattern_options(overrides):
    cfg = small_config(**overrides)
    model = build(cfg, dtype=torch.float64, seed=10).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        full, _ = model(idx)
        torch.testing.assert_close(_static_logits(model, idx, 7), full)


def test_static_cache_reads_q_and_k_in_fp32():
    """fp16 q . k of 64 channels of 300 overflows fp16 (5.8e6 > 65504)."""
    g = torch.Generator().manual_seed(0)
    k = (300 + torch.rand(1, 1, 8, 64, generator=g)).half()
    v = torch.randn(1, 1, 8, 64, generator=g).half()
    pos = torch.zeros(1, dtype=torch.long)
    layer = StaticLayerCache(Pattern("dense"), 8, (1, 1, 64, 64), pos, k)
    for t in range(8):
        pos.fill_(t)
        step = slice(t, t + 1)
        out = layer.attention(k[:, :, step], k[:, :, step], v[:, :, step], None, 0.125)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    s = (k.float()[0, 0, 7:] @ k.float()[0, 0].T) * 0.125
    expect = torch.softmax(s, -1) @ v.float()[0, 0]
    torch.testing.assert_close(out.float()[0, 0], expect, rtol=2e-3, atol=2e-3)


# -- the same tokens as the eager path -----------------------------------------------------------


@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_fast_generate_gives_the_eager_tokens(kind, mode):
    cfg = small_config(kind, mode)
    model = build(cfg, dtype=torch.float32, seed=3, std=0.2)
    prompt = tokens(cfg, batch=3, n=5)
    options = dict(temperature=0.9, top_p=0.9, generator=7)
    eager = generate(model, prompt, 40, **options)
    fast = generate(model, prompt, 40, **options, fast="static")
    assert torch.equal(fast, eager)
    assert not torch.equal(fast, generate(model, prompt, 40, **{**options, "generator": 8}))
    greedy = generate(model, prompt[:, :1], 47, temperature=0.0)  # to the end of n_ctx
    assert torch.equal(generate(model, prompt[:, :1], 47, temperature=0.0, fast=True), greedy)
    assert model.training  # restored, as the eager path does


def test_a_reused_decoder_forgets_the_previous_sequences():
    """The cache is not cleared between calls: slots holding positions past the prompt of
    the next call must be masked, not read."""
    cfg = small_config("fixed", "multihead")
    model = build(cfg, dtype=torch.float32, seed=5, std=0.2).eval()
    options = dict(temperature=1.0, top_p=1.0, generator=3, fast="static")
    generate(model, tokens(cfg, batch=2, seed=1, n=10), 38, **options)  # fills every slot
    decoder = decoder_for(model, 2, mode="static", temperature=1.0, top_p=1.0)
    second = tokens(cfg, batch=2, seed=2, n=3)
    fast = generate(model, second, 20, **options)
    assert decoder_for(model, 2, mode="static", temperature=1.0, top_p=1.0) is decoder
    assert torch.equal(fast, generate(model, second, 20, **{**options, "fast": False}))


def test_the_decoders_kept_are_the_most_recently_used():
    model = build(small_config(), dtype=torch.float32)
    options = dict(mode="static", temperature=1.0, top_p=1.0)
    first, second = decoder_for(model, 1, **options), decoder_for(model, 2, **options)
    for batch in (3, 4):  # four kept: none evicted yet
        decoder_for(model, batch, **options)
    assert decoder_for(model, 1, **options) is first  # used again: now the newest
    decoder_for(model, 5, **options)  # evicts the least recently used: batch 2's
    assert decoder_for(model, 1, **options) is first
    assert decoder_for(model, 2, **options) is not second


@pytest.mark.parametrize(
    "kind,mode,fast,layers,graphs",
    [
        ("fixed", "merged", "compile", 2, 1),  # enwik8's shape: the whole step, one graph
        ("strided", "multihead", "compile", 2, 1),  # cifar10's: a ring and a full store a layer
        ("fixed", "interleaved", "compile-blocks", 4, 3),  # one a pattern, and the reads
    ],
)
def test_compiled_step_gives_the_eager_tokens_without_recompiling(kind, mode, fast, layers, graphs):
    cfg = small_config(kind, mode, n_layers=layers)
    model = build(cfg, dtype=torch.float32, seed=3, std=0.2)
    prompt = tokens(cfg, batch=2, n=5)
    options = dict(temperature=1.0, top_p=0.9)
    torch._dynamo.reset()
    counters.clear()
    first = generate(model, prompt, 40, **options, generator=11, fast=fast)  # 39 steps
    assert torch.equal(first, generate(model, prompt, 40, **options, generator=11))
    again = generate(model, prompt[:, :2], 30, **options, generator=12, fast=fast)
    assert torch.equal(again, generate(model, prompt[:, :2], 30, **options, generator=12))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled per step or call
    assert not counters["graph_break"]


def test_a_decoder_driven_with_grad_enabled_compiles_no_backward():
    """A decoder called directly (as ``benchmarks/sampling.sync_free`` does), outside
    ``generate``'s no_grad, decodes the same tokens through the graph ``generate``
    compiled: no second graph traced for autograd (where the step's in-place writes to
    its position and cache fail Inductor's backward trace)."""
    cfg = small_config("strided", "multihead", n_layers=2)
    model = build(cfg, dtype=torch.float32, seed=3, std=0.2).eval()  # as generate runs it
    prompt = tokens(cfg, batch=2, n=5)
    options = dict(temperature=1.0, top_p=0.9)
    torch._dynamo.reset()
    counters.clear()
    first = generate(model, prompt, 12, **options, generator=11, fast="compile")
    decoder = decoder_for(model, 2, mode="compile", **options)
    assert torch.is_grad_enabled() and model.head.weight.requires_grad
    g = torch.Generator().manual_seed(11)
    decoder.start(model, prompt, g)
    for _ in range(11):
        decoder.advance(model, g)
    assert torch.equal(decoder.output(), first)
    assert counters["stats"]["unique_graphs"] == 1


def test_decoder_modes_are_checked():
    model = build(small_config(), dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown mode"):
        StaticDecoder(model, 1, mode="fastest")
    with pytest.raises(ValueError, match="CUDA graph"):
        StaticDecoder(model, 1, mode="graph")


# -- bytes per layer -------------------------------------------------------------------------------


def test_cache_bytes_of_the_named_configs_by_hand():
    # enwik8: 8 heads of 64 + 64 channels, fp16: 256 bytes a slot; l = 128, c = 32, n = 12,288
    enwik8 = cache_bytes(load_model_config("enwik8"), batch=1)
    assert len(enwik8) == 30
    assert {r.slots for r in enwik8} == {(128 + 96 * 32,) * 8}
    assert {(r.sparse_bytes, r.dense_bytes) for r in enwik8} == {
        (3_200 * 8 * 256, 12_288 * 8 * 256)
    }
    # cifar10: head 0 the band (l + 1 = 97), head 1 every position; q/k 64 + v 128 channels
    cifar = cache_bytes(load_model_config("cifar10"), batch=16)
    assert {r.slots for r in cifar} == {(97, 3_072)}
    assert {(r.sparse_bytes, r.dense_bytes) for r in cifar} == {
        ((97 + 3_072) * 192 * 2 * 16, 2 * 3_072 * 192 * 2 * 16)
    }
    # music-65k: 4 band heads of l + 1 = 257, 4 column heads of n = 65,536
    music = cache_bytes(load_model_config("music-65k"), batch=1, dtype=torch.float32)
    assert {r.slots for r in music} == {(257,) * 4 + (65_536,) * 4}
    assert music[0].sparse_bytes == (4 * 257 + 4 * 65_536) * 128 * 4
    assert music[0].dense_bytes == 8 * 65_536 * 128 * 4


@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_cache_bytes_is_what_the_static_cache_allocates(kind, mode):
    cfg = small_config(kind, mode)
    report = cache_bytes(cfg, batch=3, dtype=torch.float32)
    cache = StaticKVCache(cfg, 3, torch.float32, "cpu")
    assert [layer.nbytes() for layer in cache.layers] == [r.sparse_bytes for r in report]
    per_slot = (4 + 8) * 4 * 3  # q/k 4 + v 8 channels, fp32, batch 3
    assert all(r.dense_bytes == 4 * 48 * per_slot for r in report)
    expect = {  # slots per head of layer 0 (n = 48, l = 8, c = 2; local: window 11)
        "dense-merged": (48,) * 4,
        "local-merged": (11,) * 4,
        "strided-interleaved": (9,) * 4,  # an A1 layer: the band
        "strided-merged": (48,) * 4,
        "strided-multihead": (9, 9, 48, 48),
        "fixed-interleaved": (8,) * 4,  # an A1 layer: the chunk
        "fixed-merged": (8 + 6 * 2,) * 4,
        "fixed-multihead": (8, 8, 12, 12),
    }
    assert report[0].slots == expect[f"{kind}-{mode}"]
    assert report[0].sparse_bytes == sum(report[0].slots) * per_slot


# -- benchmarks/sampling.py ------------------------------------------------------------------------


def test_sampling_benchmark_cpu_smoke(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    argv = ["--cpu-smoke", "--paths", "eager,static", "--steps", "6", "--eager-steps", "6"]
    assert sampling.main([*argv, "--warmup", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "static"}
    for row in rows.values():
        assert (row["config"], row["batch"], row["prompt"]) == ("tiny", 2, 16)
        assert row["step_ms"] > 0
        assert row["tokens_per_s"] * row["step_ms"] / 1e3 == pytest.approx(2, rel=0.01)
    assert rows["static"]["same_tokens"] and rows["static"]["compared"] == 8  # 2 + 6 steps
    assert rows["static"]["sync_free"] is None  # checked on CUDA only
    # tiny: 4 fixed merged layers, 4 heads of 32 + 32 channels, fp32, batch 2
    (cache,) = result["cache"]
    assert (cache["layers"], cache["slots"]) == (4, [32 + 32 * 8] * 4)
    assert cache["sparse_bytes"] == 288 * 4 * 64 * 4 * 2
    assert cache["dense_bytes"] == 1024 * 4 * 64 * 4 * 2
    table = capsys.readouterr().out
    assert "| tiny | 2 | 16 | static |" in table and "| 28% |" in table


def test_sampling_benchmark_compares_tokens_from_the_prompt_on():
    reference = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]])
    other = reference.clone()
    assert sampling.compare(other, reference, 2) == {
        "same_tokens": True, "first_difference": None, "compared": 3
    }  # fmt: skip
    other[1, 3] = 0
    assert sampling.compare(other[:, :4], reference, 2)["first_difference"] == 1


# -- sampling through the command and the evaluation helpers ---------------------------------------


def test_complete_fast_draws_the_same_continuations():
    cfg = small_config("fixed", "multihead")
    model = build(cfg, dtype=torch.float32, seed=2, std=0.2).eval()
    prompts = tokens(cfg, batch=2, n=6)
    drawn = []
    for fast in (False, "static"):
        g = torch.Generator().manual_seed(4)
        drawn.append(evaluation.complete(model, prompts, 30, samples=3, generator=g, fast=fast))
    assert drawn[0].shape == (2, 3, 36)
    assert torch.equal(drawn[0], drawn[1])


def test_sample_command_with_fast_writes_the_same_text(tmp_path, capsys):
    (tmp_path / "corpus.txt").write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    url = f"file://{tmp_path}/text"
    prepare("text", url, path=str(tmp_path / "corpus.txt"), seq_len=64)
    model = tiny_model(64, (8, 8), 8)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # not uniform: a real choice per byte
    ckpt = save_checkpoint(tmp_path / "run", model, url, 3)
    args = ["sample", "--checkpoint", str(ckpt), "--length", "40", "--out", str(tmp_path / "o")]
    printed = []
    for fast in ([], ["--fast"], ["--fast", "static"]):
        assert main([*args, *fast]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0].startswith("The ") and printed[1] == printed[0] and printed[2] == printed[0]
    assert main([*args, "--fast", "fastest"]) == 2
    assert "unknown mode 'fastest'" in capsys.readouterr().err


def test_a_dropped_decoder_frees_its_cache_without_the_garbage_collector():
    """No reference cycle holds a cache's buffers (GBs on a GPU) until a collection runs."""
    import gc
    import weakref

    model = build(small_config("fixed", "merged"), dtype=torch.float32)
    gc.disable()
    try:
        decoder = StaticDecoder(model, 2, mode="compile-blocks")
        cache = weakref.ref(decoder.cache)
        kv = weakref.ref(decoder.cache.layers[0].kv)
        del decoder
        assert cache() is None and kv() is None
    finally:
        gc.enable()
