"""The configuration: validation messages that name the field, the named YAML files and
their parameter counts against the paper (built on the meta device: no memory)."""

from __future__ import annotations

import math
import typing

import pytest
import torch
import yaml

from sparse_transformer.model import (
    SparseTransformer,
    SparseTransformerConfig,
    list_model_configs,
    load_model_config,
)
from sparse_transformer.model.config import (
    RECOMPUTE_POLICIES,
    AttentionBackend,
    configs_dir,
)
from sparse_transformer.ops import BACKENDS

# Child et al. 2019, tables 1 and 4
PAPER_PARAMS = {
    "cifar10": 59e6,
    "enwik8": 95e6,
    "imagenet64": 152e6,
    "music-65k": 152e6,
    "music-262k": 25e6,
    "music-1m": 3e6,
}


def _meta_params(cfg: SparseTransformerConfig) -> int:
    with torch.device("meta"):
        model = SparseTransformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    return model.num_params()


def _formula_params(cfg: SparseTransformerConfig) -> int:
    """The count written out from section 5.2: per block two norms, q/k/v, W_p, W1, W2."""
    d, dqk, dff, V = cfg.d_model, cfg.d_qk, cfg.d_ff, cfg.vocab_size
    block = 2 * 2 * d + (d * (2 * dqk + d) + 2 * dqk + d) + (d * d + d) + 2 * d * dff + dff + d
    embeddings = V * d + sum(cfg.embed_shape) * d
    return cfg.n_layers * block + embeddings + 2 * d + d * V  # + final norm, output matrix


def test_every_paper_configuration_is_packaged():
    names = list_model_configs()
    assert set(PAPER_PARAMS) | {"tiny"} <= set(names)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_count_within_3_percent_of_the_paper(name):
    cfg = load_model_config(name)
    count = _meta_params(cfg)
    assert count == _formula_params(cfg)
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.03, f"{name}: {count:,}"


def test_named_configurations_follow_the_paper():
    c = load_model_config("cifar10")
    assert (c.n_layers, c.d_model, c.n_heads, c.ff_mult, c.qk_mult) == (128, 256, 2, 2.0, 0.5)
    assert (c.pattern, c.stride, c.n_ctx, c.embed_shape, c.dropout) == (
        "strided",
        96,
        3072,
        (32, 32, 3),
        0.25,
    )
    e = load_model_config("enwik8")
    assert (e.n_layers, e.d_model, e.n_heads, e.pattern, e.stride, e.summary) == (
        30,
        512,
        8,
        "fixed",
        128,
        32,
    )
    assert (e.head_mode, e.n_ctx, e.dropout, e.block_k) == ("merged", 12288, 0.4, 32)
    i = load_model_config("imagenet64")
    assert (i.n_layers, i.d_model, i.n_heads, i.pattern, i.stride, i.n_ctx, i.dropout) == (
        48,
        512,
        16,
        "strided",
        128,
        12288,
        0.01,
    )
    for name, n in (("music-65k", 65536), ("music-262k", 262144), ("music-1m", 1048576)):
        m = load_model_config(name)
        assert (m.pattern, m.n_ctx) == ("strided", n)
        assert m.embed_shape == (n // m.stride, m.stride)
    t = load_model_config("tiny")
    assert t.pattern == "fixed" and 512 <= t.n_ctx <= 2048 and t.n_layers <= 6


def test_tiny_runs_forward_and_backward_on_cpu():
    cfg = load_model_config("tiny").replace(attention_backend="torch")
    torch.manual_seed(0)
    model = SparseTransformer(cfg)
    idx = torch.randint(0, 256, (1, cfg.n_ctx + 1))
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(math.log(256), abs=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_cifar10_stride_makes_a2_the_column_above_in_the_same_channel():
    cfg = load_model_config("cifar10")
    rows, cols, channels = cfg.embed_shape
    i = (20 * cols + 7) * channels + 2  # row 20, column 7, channel 2
    j = i - cfg.stride
    assert ((j // channels) // cols, (j // channels) % cols, j % channels) == (19, 7, 2)


# -- loading ------------------------------------------------------------------------------


def test_load_by_name_and_by_path_agree(tmp_path):
    by_name = load_model_config("enwik8")
    by_path = load_model_config(configs_dir() / "enwik8.yaml")
    assert by_name == by_path
    assert load_model_config(str(configs_dir() / "enwik8.yaml")) == by_name


def test_other_top_level_sections_are_ignored(tmp_path):
    doc = {
        "model": load_model_config("tiny").to_dict(),
        "data": {"dataset": "enwik8"},
        "train": {"lr": 3e-4},
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert load_model_config(path) == load_model_config("tiny")


def test_unknown_key_in_the_model_section_is_rejected_by_name(tmp_path):
    doc = {"model": {**load_model_config("tiny").to_dict(), "n_layer": 3}}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"n_layer: unknown field"):
        load_model_config(path)


def test_unknown_name_and_missing_section_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown name 'enwik9'.*enwik8"):
        load_model_config("enwik9")
    path = tmp_path / "nomodel.yaml"
    path.write_text("train: {lr: 1}\n")
    with pytest.raises(ValueError, match="model:"):
        load_model_config(path)
    with pytest.raises(FileNotFoundError):
        load_model_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["cifar10", "tiny"])
def test_dict_and_yaml_round_trip(name):
    cfg = load_model_config(name)
    plain = cfg.to_dict()
    assert SparseTransformerConfig.from_dict(plain) == cfg
    assert SparseTransformerConfig.from_dict(yaml.safe_load(yaml.safe_dump(plain))) == cfg
    per_block = cfg.replace(recompute=["none", "attention"] * (cfg.n_layers // 2))
    again = SparseTransformerConfig.from_dict(yaml.safe_load(yaml.safe_dump(per_block.to_dict())))
    assert again == per_block and again.recompute_for(1) == "attention"


# -- validation ----------------------------------------------------------------------------


BAD = [
    (dict(d_model=100, n_heads=3), "d_model", "not divisible by n_heads"),
    (dict(n_ctx=1000, stride=32), "embed_shape", "n_ctx = 1000 divisible by stride"),
    (dict(embed_shape=(32, 30)), "embed_shape", "960 positions but n_ctx = 1024"),
    (dict(pattern="sparse"), "pattern", "unknown pattern 'sparse'"),
    (dict(head_mode="mixed"), "head_mode", "unknown mode"),
    (dict(qk_mult=0.3), "qk_mult", "not an integer"),
    (dict(qk_mult=0.125, n_heads=32), "qk_mult", "not divisible by n_heads"),
    (dict(ff_mult=0), "ff_mult", "must be positive"),
    (dict(summary=64), "summary", "exceeds the chunk length"),
    (dict(stride=0), "stride", "integer >= 1"),
    (dict(dropout=1.0), "dropout", r"\[0, 1\)"),
    (dict(recompute="all"), "recompute", "unknown policy 'all'"),
    (dict(recompute=["none", "block"]), "recompute", "needs n_layers = 4 entries"),
    (dict(attention_backend="cuda"), "attention_backend", "unknown backend"),
    (dict(n_layers=0), "n_layers", "integer >= 1"),
    (dict(n_heads=1, head_mode="multihead"), "head_mode", "n_heads >= 2"),
    (dict(vocab_size=1), "vocab_size", "at least 2"),
    (dict(block_k=0), "block_k", "integer >= 1"),
    # each field's type, from its annotation (configs.schema)
    (dict(n_layers="4"), "n_layers", "expected int, got '4'"),
    (dict(n_heads=True), "n_heads", "expected int, got True"),
    (dict(ff_mult=float("nan")), "ff_mult", "expected a finite number"),
    (dict(distinct_summary=1), "distinct_summary", "expected bool, got 1"),
    (dict(compile="maybe"), "compile", "must be true, false, auto or cudagraphs"),
    (dict(recompute=["none", "all", "none", "none"]), r"recompute\[1\]", "unknown policy"),
    (dict(embed_shape=(32, 0)), r"embed_shape\[1\]", "integer >= 1"),
    (dict(embed_shape="32x32"), "embed_shape", "expected a list"),
]


@pytest.mark.parametrize(
    "overrides,field,message", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)]
)
def test_bad_configurations_fail_at_construction_naming_the_field(overrides, field, message):
    with pytest.raises(ValueError, match=rf"SparseTransformerConfig\.{field}: .*{message}"):
        SparseTransformerConfig(**overrides)


def test_values_are_normalised_and_unused_sizes_unchecked():
    cfg = SparseTransformerConfig(ff_mult=2, embed_shape=[32, 32], recompute=["block"] * 4)
    assert cfg.ff_mult == 2.0 and isinstance(cfg.ff_mult, float)
    assert cfg.embed_shape == (32, 32) and cfg.recompute == ("block",) * 4
    assert SparseTransformerConfig(embed_shape=None).embed_shape == (32, 32)
    dense = SparseTransformerConfig(pattern="dense", stride=0, summary=0, n_ctx=64)
    assert dense.embed_shape == (64,)  # the stride and summary of a dense model are unused


def test_backend_names_are_the_ops_ones():
    assert typing.get_args(AttentionBackend) == BACKENDS
    assert RECOMPUTE_POLICIES == ("none", "attention", "block")


def test_derived_widths_and_defaults():
    cfg = SparseTransformerConfig(
        d_model=256,
        n_heads=2,
        ff_mult=2,
        qk_mult=0.5,
        n_ctx=3072,
        pattern="strided",
        stride=96,
        head_mode="multihead",
    )
    assert (cfg.d_head, cfg.d_qk, cfg.d_head_qk, cfg.d_ff) == (128, 128, 64, 512)
    assert cfg.embed_shape == (32, 96)
    assert SparseTransformerConfig(pattern="dense", n_ctx=64).embed_shape == (64,)
    p0, p1 = cfg.pattern_for(0), cfg.pattern_for(1)
    assert p0 == p1 and p0.component == "split" and p0.split_heads == 1
