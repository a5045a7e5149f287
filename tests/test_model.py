"""The network against an independent reference: architecture, causality, init, dropout,
recomputation and the loss unit. Tiny configurations, fp64/fp32 on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_transformer.model import SparseTransformer, SparseTransformerConfig, nats_to_bits
from sparse_transformer.ops import dense_mask, pattern_for_layer

# (pattern kind, head mode): every mode for the factorized kinds, one for dense/local
PATTERN_MODES = [
    ("dense", "merged"),
    ("local", "merged"),
    *[(k, m) for k in ("strided", "fixed") for m in ("interleaved", "merged", "multihead")],
]
IDS = [f"{k}-{m}" for k, m in PATTERN_MODES]


def small_config(kind: str = "fixed", mode: str = "merged", **overrides) -> SparseTransformerConfig:
    """n = 48 = 6 x 8, l = 8, c = 2, 4 heads (4 distinct summary sub-blocks), 3 blocks."""
    values = dict(
        n_layers=3,
        d_model=32,
        n_heads=4,
        ff_mult=2,
        qk_mult=0.5,
        n_ctx=48,
        pattern=kind,
        stride=8 if kind != "local" else 11,
        summary=2,
        head_mode=mode,
        block_q=16,
        block_k=8,
        embed_shape=(6, 8),
        dropout=0.0,
        attention_backend="torch",
    )
    values.update(overrides)
    return SparseTransformerConfig(**values)


def randomize(model: SparseTransformer, seed: int = 0, std: float = 0.3) -> SparseTransformer:
    """Every parameter (norms, biases, the zero output matrix too) drawn at random, so
    nothing is trivially zero or one in the comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def build(
    cfg: SparseTransformerConfig, dtype=torch.float64, seed: int = 0, std: float = 0.3
) -> SparseTransformer:
    return randomize(SparseTransformer(cfg).to(dtype), seed, std)


def tokens(cfg: SparseTransformerConfig, batch: int = 2, seed: int = 1, n: int | None = None):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, n or cfg.n_ctx), generator=g)


def naive_logits(model: SparseTransformer, idx: torch.Tensor) -> torch.Tensor:
    """Section 5.2 written out densely from the model's parameters (no model code reused)."""
    cfg = model.config
    B, T = idx.shape
    H, d = cfg.n_heads, cfg.d_model
    dq, dv = cfg.d_qk // H, d // H
    pos = torch.arange(T)
    h = model.tok_emb.weight[idx]
    rem = pos.clone()
    coords = []
    for size in reversed(cfg.embed_shape):  # row-major unravel
        coords.append(rem % size)
        rem = rem // size
    for emb, coord in zip(model.pos_emb, reversed(coords)):
        h = h + emb.weight[coord]

    def norm(x, ln):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias

    for r, blk in enumerate(model.blocks):
        pattern = pattern_for_layer(
            cfg.pattern,
            mode=cfg.head_mode,
            layer=r,
            n_heads=H,
            stride=cfg.stride if cfg.pattern != "dense" else 0,
            summary=cfg.summary if cfg.pattern == "fixed" else 0,
        )
        mask = dense_mask(pattern, T, H)  # (H, T, T)
        x = norm(h, blk.ln_1)
        qkv = x @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv[..., : H * dq], qkv[..., H * dq : 2 * H * dq], qkv[..., 2 * H * dq :]
        q = q.reshape(B, T, H, dq).permute(0, 2, 1, 3)
        k = k.reshape(B, T, H, dq).permute(0, 2, 1, 3)
        v = v.reshape(B, T, H, dv).permute(0, 2, 1, 3)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(dq)
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows with no key -> 0
        o = (p @ v).permute(0, 2, 1, 3).reshape(B, T, d)
        a = o @ blk.attn.proj.weight.T + blk.attn.proj.bias
        u = norm(h + a, blk.ln_2) @ blk.ff.w1.weight.T + blk.ff.w1.bias
        b = (u * torch.sigmoid(1.702 * u)) @ blk.ff.w2.weight.T + blk.ff.w2.bias
        h = h + a + b
    return norm(h, model.ln_f) @ model.head.weight.T


# -- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_forward_matches_dense_reference(kind, mode, backend):
    cfg = small_config(kind, mode, attention_backend=backend)
    model = build(cfg)
    idx = tokens(cfg)
    logits, _ = model(idx)
    torch.testing.assert_close(logits, naive_logits(model, idx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("qk_mult,ff_mult", [(1.0, 4.0), (0.5, 2.0), (0.25, 1.0)])
def test_qk_width_and_shorter_inputs(qk_mult, ff_mult):
    """Full- and half-size widths, and inputs shorter than n_ctx (not a block multiple)."""
    cfg = small_config("strided", "multihead", qk_mult=qk_mult, ff_mult=ff_mult)
    model = build(cfg, seed=3)
    assert model.blocks[0].attn.qkv.out_features == 2 * cfg.d_qk + cfg.d_model
    assert model.blocks[0].ff.w1.out_features == cfg.d_ff
    idx = tokens(cfg, n=37)
    logits, _ = model(idx)
    assert logits.shape == (2, 37, 256)
    torch.testing.assert_close(logits, naive_logits(model, idx), rtol=1e-10, atol=1e-10)


def test_gradients_match_between_backends():
    cfg = small_config("fixed", "multihead", n_layers=2)
    grads = {}
    for backend in ("reference", "torch"):
        model = build(cfg.replace(attention_backend=backend), seed=5)
        idx = tokens(cfg)
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
        grads[backend] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["reference"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_embedding_is_token_plus_one_embedding_per_coordinate():
    cfg = small_config("dense", n_ctx=48, embed_shape=(4, 4, 3))  # rows, columns, channels
    model = build(cfg)
    idx = tokens(cfg, batch=1)
    h = model.embed(idx)[0]
    row, col, ch = model.pos_emb
    for i in (0, 5, 13, 47):
        r, c, k = i // 12, (i // 3) % 4, i % 3
        expect = model.tok_emb.weight[idx[0, i]] + row.weight[r] + col.weight[c] + ch.weight[k]
        torch.testing.assert_close(h[i], expect)
    assert model.embed(idx[:, :1], start=47).shape == (1, 1, 32)
    with pytest.raises(ValueError, match="n_ctx"):
        model.embed(idx[:, :2], start=47)


def test_text_embedding_structure_is_row_and_column_of_stride():
    cfg = small_config("fixed")  # default-style (n / l, l) = (6, 8)
    model = build(cfg)
    assert [e.num_embeddings for e in model.pos_emb] == [6, 8]
    assert SparseTransformerConfig(n_ctx=1024, stride=32).embed_shape == (32, 32)


# -- causality --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_causality(kind, mode, backend):
    """The output at i does not change when any input after i changes."""
    cfg = small_config(kind, mode, attention_backend=backend)
    model = build(cfg, seed=2)
    idx = tokens(cfg)
    base, _ = model(idx)
    g = torch.Generator().manual_seed(7)
    for i in (0, 9, 23, 40, 46):
        other = idx.clone()
        other[:, i + 1 :] = torch.randint(0, 256, other[:, i + 1 :].shape, generator=g)
        out, _ = model(other)
        torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[:, i + 1 :], base[:, i + 1 :])  # later outputs do move


@pytest.mark.parametrize("kind,mode", PATTERN_MODES, ids=IDS)
def test_causality_by_gradient(kind, mode):
    """d logits_i / d embedding_j is zero for every j > i (one backward per checked i)."""
    cfg = small_config(kind, mode)
    model = build(cfg, seed=4)
    idx = tokens(cfg, batch=1)
    h0 = model.embed(idx).detach().requires_grad_(True)
    h = h0
    for block in model.blocks:
        h = block(h)
    logits = model.head(model.ln_f(h))
    for i in (3, 17, 31):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), h0, retain_graph=True)
        assert grad[0, i + 1 :].abs().max() == 0
        assert grad[0, i].abs().max() > 0


# -- initialisation -------------------------------------------------------------------------


def test_initialisation_statistics():
    cfg = SparseTransformerConfig(
        n_layers=8, d_model=256, n_heads=4, n_ctx=1024, stride=32, summary=8, dropout=0.0
    )
    model = SparseTransformer(cfg)
    model.init_weights(0)
    d, N = cfg.d_model, cfg.n_layers

    def check_std(w: torch.Tensor, std: float) -> None:
        assert abs(w.mean().item()) < 4 * std / math.sqrt(w.numel())
        assert w.std().item() == pytest.approx(std, rel=0.05)

    check_std(model.tok_emb.weight, 0.125 / math.sqrt(d))
    for emb in model.pos_emb:  # n_emb = 2 embeddings: (32, 32)
        check_std(emb.weight, 0.125 / math.sqrt(d * 2))
    for blk in model.blocks:
        check_std(blk.attn.qkv.weight, 0.125 / math.sqrt(d))
        check_std(blk.ff.w1.weight, 0.125 / math.sqrt(d))
        check_std(blk.attn.proj.weight, 0.125 / math.sqrt(d) / math.sqrt(2 * N))
        check_std(blk.ff.w2.weight, 0.125 / math.sqrt(cfg.d_ff) / math.sqrt(2 * N))
        for lin in (blk.attn.qkv, blk.attn.proj, blk.ff.w1, blk.ff.w2):
            assert torch.count_nonzero(lin.bias) == 0
        for ln in (blk.ln_1, blk.ln_2):
            assert torch.equal(ln.weight, torch.ones(d)) and torch.count_nonzero(ln.bias) == 0
    assert torch.count_nonzero(model.head.weight) == 0
    assert model.head.bias is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_initial_loss_is_exactly_8_bits(dtype):
    cfg = small_config("fixed")
    model = SparseTransformer(cfg).to(dtype)
    idx = tokens(cfg)
    logits, nats = model(idx[:, :-1], targets=idx[:, 1:])
    assert torch.count_nonzero(logits) == 0
    bits = model.loss_bits(logits, idx[:, 1:])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert bits.item() == pytest.approx(8.0, abs=tol)
    assert nats_to_bits(nats).item() == pytest.approx(8.0, abs=tol)
    assert nats.item() == pytest.approx(math.log(256), abs=tol)


def test_meta_build_then_init_matches_direct_init():
    cfg = small_config("strided", "interleaved")
    with torch.device("meta"):
        lazy = SparseTransformer(cfg)
    assert all(p.is_meta for p in lazy.parameters())
    assert lazy.num_params() == SparseTransformer(cfg).num_params()
    with pytest.raises(RuntimeError, match="to_empty"):
        lazy.init_weights(0)
    lazy.to_empty(device="cpu")
    lazy.init_weights(123)
    eager = SparseTransformer(cfg)
    eager.init_weights(torch.Generator().manual_seed(123))
    for (name, a), (_, b) in zip(lazy.named_parameters(), eager.named_parameters()):
        assert torch.equal(a, b), name
    idx = tokens(cfg)
    _, loss = lazy(idx[:, :-1], targets=idx[:, 1:])
    assert nats_to_bits(loss).item() == pytest.approx(8.0, abs=1e-5)


# -- loss ---------------------------------------------------------------------------------


def test_loss_in_nats_and_bits_against_manual_cross_entropy():
    cfg = small_config("fixed")
    model = build(cfg)
    idx = tokens(cfg)
    targets = idx[:, 1:].clone()
    targets[0, :5] = -1  # ignored positions
    logits, nats = model(idx[:, :-1], targets=targets)
    logp = torch.log_softmax(logits, -1)
    keep = targets >= 0
    manual = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(nats, manual)
    torch.testing.assert_close(model.loss_bits(logits, targets), manual / math.log(2))


def test_a_few_steps_of_training_lower_the_loss():
    cfg = small_config("fixed", n_layers=2, qk_mult=1.0, ff_mult=4)
    torch.manual_seed(0)
    model = SparseTransformer(cfg)
    idx = torch.arange(49).remainder(7)[None].repeat(4, 1)  # a periodic sequence
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(nats_to_bits(loss.item()))
    assert losses[0] == pytest.approx(8.0, abs=1e-5)
    assert losses[-1] < 4.0


# -- dropout -------------------------------------------------------------------------------


def test_dropout_modules_sit_only_at_the_end_of_the_residual_branches():
    cfg = small_config("fixed", dropout=0.3)
    model = SparseTransformer(cfg)
    found = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    expect = {f"blocks.{r}.{d}" for r in range(cfg.n_layers) for d in ("drop_a", "drop_b")}
    assert found == expect
    assert all(model.get_submodule(name).p == 0.3 for name in found)


def test_dropout_one_removes_both_branches_and_nothing_else():
    """With p = 1 both a(H) and b(H) vanish: logits = head(norm(embed(x))). Dropout on the
    embedding, inside attention or before the head would change that."""
    cfg = small_config("strided", "merged", dropout=0.5)
    model = build(cfg, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 1.0
    idx = tokens(cfg)
    model.train()
    logits, _ = model(idx)
    torch.testing.assert_close(logits, model.head(model.ln_f(model.embed(idx))))


def test_dropout_is_random_in_training_and_off_in_eval():
    cfg = small_config("fixed", dropout=0.25)
    model = build(cfg, dtype=torch.float32)
    idx = tokens(cfg)
    model.eval()
    ref = naive_logits(model.double(), idx).float()
    model.float()
    torch.testing.assert_close(model(idx)[0], ref, rtol=1e-4, atol=1e-4)
    model.train()
    torch.manual_seed(0)
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.allclose(a, b)
    torch.manual_seed(0)
    torch.testing.assert_close(model(idx)[0], a, rtol=0, atol=0)


# -- recomputation ----------------------------------------------------------------------


def _grads(model, idx, seed):
    torch.manual_seed(seed)  # same dropout masks for every policy
    model.zero_grad()
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind,mode", [("fixed", "merged"), ("strided", "multihead")])
def test_recomputation_changes_no_number(kind, mode):
    cfg = small_config(kind, mode, dropout=0.2)
    model = build(cfg, dtype=torch.float32)
    model.train()
    idx = tokens(cfg)
    loss0, g0 = _grads(model, idx, seed=11)
    policies = ["attention", "block", ["block", "none", "attention"]]
    for policy in policies:
        model.set_recompute(policy)
        loss, g = _grads(model, idx, seed=11)
        assert torch.equal(loss, loss0), policy
        for name in g0:
            assert torch.equal(g[name], g0[name]), (policy, name)


def test_recomputation_policy_is_per_block_and_actually_checkpoints():
    cfg = small_config("fixed", recompute=["none", "attention", "block"])
    model = build(cfg, dtype=torch.float32)
    assert [b.recompute for b in model.blocks] == ["none", "attention", "block"]
    calls: dict[str, int] = {}

    def counter(name):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1

        return hook

    for r, blk in enumerate(model.blocks):
        blk.attn.qkv.register_forward_hook(counter(f"{r}.attn"))  # inside a(H)
        blk.ff.w1.register_forward_hook(counter(f"{r}.ff"))  # inside b(H)
    idx = tokens(cfg)
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert set(calls.values()) == {1}
    loss.backward()  # recomputed: a(H) of block 1, all of block 2
    assert calls == {"0.attn": 1, "0.ff": 1, "1.attn": 2, "1.ff": 1, "2.attn": 2, "2.ff": 2}
    calls.clear()
    with torch.no_grad():  # nothing to recompute without autograd
        model(idx)
    assert set(calls.values()) == {1}
