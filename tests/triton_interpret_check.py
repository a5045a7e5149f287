"""Run the Triton kernels under TRITON_INTERPRET=1 on the CPU against the reference.

Executed in a subprocess by tests/test_triton.py: the interpreter must be chosen
before Triton compiles anything, so it cannot share a process with other tests.
Prints one JSON line per case: the kernel's max error and the reference's own.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

import sparse_transformer.ops.triton_attention as ta  # noqa: E402
from sparse_transformer.ops import compile_layout, pattern_for_layer  # noqa: E402
from sparse_transformer.ops.kernel_check import check_launches  # noqa: E402
from sparse_transformer.ops.reference import reference_attention  # noqa: E402


def cases():
    for kind, mode, layer, l, c in [
        ("fixed", "merged", 0, 32, 16),
        ("fixed", "interleaved", 1, 32, 16),
        ("fixed", "multihead", 0, 32, 16),
        ("strided", "multihead", 0, 24, 0),
        ("strided", "interleaved", 1, 20, 0),
        ("strided", "merged", 0, 20, 0),
        ("dense", "merged", 0, 0, 0),
    ]:
        yield pattern_for_layer(kind, mode=mode, layer=layer, n_heads=4, stride=l, summary=c)


FUSED_CASES = (1, 3, 4, 6)
"""The cases the fused backward runs too: both dK/dV paths, the transposed order, and
the fixed, strided and dense patterns (all seven would double the interpreter's time)."""


def main() -> None:
    ta.POISON_OUTPUTS = True  # NaN-filled outputs: every element must be written
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    gen = torch.Generator().manual_seed(seed)
    runs = [(i, "two-pass") for i in range(7)] + [(i, "fused") for i in FUSED_CASES]
    patterns = list(cases())
    for i, backward in runs:
        ta.BACKWARD = backward
        # d 32 with 16-wide key blocks takes the transposed dK/dV path, the rest the plain
        n, d = (37, 100)[i % 2], (16, 32)[i % 2]
        bq, bk = ((16, 16), (32, 16), (16, 32))[i % 3]
        layout = compile_layout(patterns[i], n, 4, bq, bk)
        errs = errors(layout, n, d, gen)
        row = {"pattern": patterns[i].describe(), "n": n, "d": d, "block_k": bk}
        row.update(backward=backward, transposed=ta.transposed_dkdv(d, bk))
        print(json.dumps({**row, "errors": errs}))
    ta.BACKWARD = "two-pass"
    launches = check_launches(n=100, d=16, dtype=torch.float32, stride=20, device="cpu")
    print(json.dumps({"launches": launches.ok, "detail": launches.describe()}))


def errors(layout, n: int, d: int, gen: torch.Generator) -> list[float]:
    """Max errors of the fp32 kernels' out, dq, dk, dv against the fp64 reference."""
    q, k, v, w = (torch.randn(2, 4, n, d, generator=gen, dtype=torch.float64) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    ref = reference_attention(q, k, v, layout)
    ref_g = torch.autograd.grad((ref * w).sum(), (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = ta.triton_sparse_attention(q32, k32, v32, layout)
    g = torch.autograd.grad((out * w.float()).sum(), (q32, k32, v32))
    assert not any(t.isnan().any() for t in (out, *g)), "unwritten output elements"
    errs = [float((out.detach().double() - ref.detach()).abs().max())]
    return errs + [float((a.double() - b).abs().max()) for a, b in zip(g, ref_g)]


def check_compile() -> None:
    """The custom op traces under torch.compile(fullgraph=True) through its fake
    implementation and gives the eager numbers; it also survives activation
    checkpointing."""
    pattern = pattern_for_layer("fixed", mode="merged", layer=0, n_heads=2, stride=32, summary=16)
    layout = compile_layout(pattern, 64, 2, 16, 16)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    eager = ta.triton_sparse_attention(q, k, v, layout)
    compiled = torch.compile(
        lambda a, b, c: ta.triton_sparse_attention(a, b, c, layout), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(compiled(q, k, v), eager)
    qg = q.clone().requires_grad_()
    out = torch.utils.checkpoint.checkpoint(
        lambda a: ta.triton_sparse_attention(a, k, v, layout), qg, use_reentrant=False
    )
    out.sum().backward()
    qr = q.clone().requires_grad_()
    ta.triton_sparse_attention(qr, k, v, layout).sum().backward()
    torch.testing.assert_close(qg.grad, qr.grad)
    check_model_compile()
    ta.BACKWARD = "fused"  # the fused backward's dQ must have the strides the fake op gives
    try:
        check_model_compile()
    finally:
        ta.BACKWARD = "two-pass"
    print(json.dumps({"compile": "ok"}), flush=True)


def check_model_compile() -> None:
    """The GPU's training path: the model's blocks compiled by Inductor with whole-block
    recomputation around the Triton op give the eager loss and gradients."""
    from sparse_transformer.model import SparseTransformer, SparseTransformerConfig

    cfg = SparseTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, n_ctx=64, pattern="fixed", stride=32, summary=16,
        block_q=16, block_k=16, recompute="block", attention_backend="triton",
    )  # fmt: skip
    model = SparseTransformer(cfg)
    idx = torch.randint(0, 256, (2, 64))

    def loss_and_grads():
        model.zero_grad()
        _, loss = model(idx, idx.roll(-1, dims=1))
        loss.backward()
        return [loss.detach(), *(p.grad.clone() for p in model.parameters())]

    eager = loss_and_grads()
    model.compile_blocks()
    for got, want in zip(loss_and_grads(), eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    main()
    check_compile()
