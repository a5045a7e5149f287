"""The Triton kernels against the fp32 truth, by flash-attention's rule (GPU only).

For out, dq, dk and dv the kernel's largest error against fp32 (or, for n too long
for O(n^2), the fp32 block-sparse PyTorch backend) may be at most twice PyTorch's own
error in the same low precision (dense attention run in fp16/bf16, or FlexAttention
for long n), plus a small absolute term. Outputs start as NaN, so an element a kernel
fails to write shows. Each case runs twice, so the second run goes through the op's
cached launches; ``check_launches`` feeds them inputs Triton specialises differently.
Used by ``tests/test_triton_gpu.py`` (the full grid) and by ``benchmarks/gpu_check.py``
(a quick grid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparse_transformer.ops.attention import sparse_attention
from sparse_transformer.ops.layout import compile_layout
from sparse_transformer.ops.patterns import pattern_for_layer
from sparse_transformer.ops.reference import reference_attention

STRIDES = {1000: 32, 4096: 64, 12288: 128, 65536: 256}
"""The pattern stride used at each checked sequence length."""
NAMES = ("out", "dq", "dk", "dv")


@dataclass
class KernelCheck:
    """One comparison: the kernel's and PyTorch's largest errors against the truth."""

    case: str
    kernel_err: dict[str, float]
    torch_err: dict[str, float]
    atol: float
    unwritten: list[str]

    @property
    def ok(self) -> bool:
        return not self.unwritten and all(
            self.kernel_err[k] <= 2 * self.torch_err[k] + self.atol for k in NAMES
        )

    def describe(self) -> str:
        worst = max(NAMES, key=lambda k: self.kernel_err[k] - 2 * self.torch_err[k])
        text = (
            f"{self.case}: worst {worst} kernel {self.kernel_err[worst]:.3g} vs PyTorch "
            f"{self.torch_err[worst]:.3g} (bound 2x + {self.atol:g})"
        )
        return text + (f"; unwritten (NaN): {', '.join(self.unwritten)}" if self.unwritten else "")


def default_blocks(kind: str, d: int) -> tuple[int, int]:
    """(block_q, block_k) the checks use for a pattern kind and head dim."""
    if kind == "fixed":
        return (64, 32) if d == 128 else (128, 32)
    return (64, 64)


def _grads(fn: Callable, q, k, v, dout, how: str = "contiguous") -> list[torch.Tensor]:
    """``fn``'s output and the gradients of q, k, v for ``dout``, with q, k, v held in
    fresh memory (``contiguous``) or as ``check_launches``' other ``LAUNCH_VARIANTS``:
    ``misaligned`` starts one element past a 16-byte boundary, ``strided`` is a
    (B, n, H, d) tensor transposed, ``padded`` has rows of d + 8 elements (a row stride
    Triton does not see as a multiple of 16). The leaves are that memory, so ``fn`` sees
    the views themselves."""
    shape, d = q.shape, q.shape[-1]

    def view(leaf: torch.Tensor) -> torch.Tensor:
        if how == "misaligned":
            return leaf[1:].view(shape)
        if how == "padded":
            return leaf[..., :d]
        return leaf.transpose(1, 2) if how == "strided" else leaf

    leaves = []
    for x in (q.detach(), k.detach(), v.detach()):
        if how == "misaligned":
            leaf = torch.cat([x.new_zeros(1), x.flatten()])
        elif how == "padded":
            leaf = torch.cat([x, x.new_zeros(*shape[:-1], 8)], dim=-1)
        else:
            leaf = x.transpose(1, 2).contiguous() if how == "strided" else x.clone()
        leaves.append(leaf.requires_grad_())
    out = fn(*(view(leaf) for leaf in leaves))
    out.backward(dout)
    return [out.detach(), *(view(leaf.grad) for leaf in leaves)]


def check_kernel(
    kind: str,
    mode: str,
    layer: int,
    n: int,
    d: int,
    dtype: torch.dtype,
    *,
    heads: int = 2,
    batch: int = 1,
    seed: int | None = None,
    backend: str = "triton",
    device: str = "cuda",
) -> KernelCheck:
    """Run one case: dense truth up to n = 12,288, block-sparse beyond. ``backend`` and
    ``device`` are for checking this harness itself elsewhere (the CPU and its backend)."""
    from sparse_transformer.ops import triton_attention as ta

    pattern = pattern_for_layer(
        kind, mode=mode, layer=layer, n_heads=heads, stride=STRIDES[n], summary=16
    )
    bq, bk = default_blocks(kind, d)
    layout = compile_layout(pattern, n, heads, bq, bk, device=device)
    seed = torch.seed() % 2**31 if seed is None else seed
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v, dout = (
        torch.randn(batch, heads, n, d, device=device, generator=gen) for _ in range(4)
    )
    lo = [x.to(dtype) for x in (q, k, v, dout)]
    if n <= 12288:
        truth = _grads(lambda a, b, c: reference_attention(a, b, c, layout), q, k, v, dout)
        base = _grads(lambda a, b, c: reference_attention(a, b, c, layout, upcast=False), *lo)
    else:  # n too long for O(n^2): block-sparse fp32 truth, FlexAttention as PyTorch's own
        truth = _grads(
            lambda a, b, c: sparse_attention(a, b, c, layout, backend="torch"), q, k, v, dout
        )
        base = _grads(lambda a, b, c: sparse_attention(a, b, c, layout, backend="flex"), *lo)
    ta.POISON_OUTPUTS = True
    try:  # twice: Triton's launch path compiles and launches, then the op's cached launches
        runs = [
            _grads(lambda a, b, c: sparse_attention(a, b, c, layout, backend=backend), *lo)
            for _ in range(2)
        ]
    finally:
        ta.POISON_OUTPUTS = False
    name = str(dtype).removeprefix("torch.")
    return _judge(f"{backend} {kind}/{mode}/layer {layer} n={n} d={d} {name} seed={seed}",
                  runs, base, truth, dtype)  # fmt: skip


def _judge(case: str, runs: list[list[torch.Tensor]], base, truth, dtype) -> KernelCheck:
    """The worst of ``runs`` (each out, dq, dk, dv) against PyTorch's ``base``."""
    return KernelCheck(
        case=case,
        kernel_err={
            k: max((run[i].float() - truth[i]).abs().max().item() for run in runs)
            for i, k in enumerate(NAMES)
        },
        torch_err={k: (b.float() - t).abs().max().item() for k, b, t in zip(NAMES, base, truth)},
        atol=1e-3 if dtype == torch.float16 else 8e-3,
        unwritten=[k for i, k in enumerate(NAMES) if any(run[i].isnan().any() for run in runs)],
    )


LAUNCH_VARIANTS = ("contiguous", "misaligned", "strided", "padded", "contiguous again")
"""The inputs ``check_launches`` feeds the kernels one after another."""


def check_launches(
    kind: str = "strided",
    mode: str = "interleaved",
    n: int = 4096,
    d: int = 64,
    dtype: torch.dtype = torch.float16,
    *,
    stride: int | None = None,
    device: str = "cuda",
) -> KernelCheck:
    """The op's cached launches (``triton_attention._cached_launch``) against inputs that
    Triton specialises differently (``LAUNCH_VARIANTS``: a pointer off 16-byte alignment,
    other strides, a row stride not divisible by 16, then the first kind again): each
    must compile or find its own kernel and compute what the others do, by
    flash-attention's rule."""
    from sparse_transformer.ops import triton_attention as ta

    stride = stride or STRIDES[n]
    pattern = pattern_for_layer(kind, mode=mode, layer=1, n_heads=2, stride=stride, summary=8)
    layout = compile_layout(pattern, n, 2, *default_blocks(kind, d), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, n, d, device=device, generator=gen) for _ in range(4))
    lo = [x.to(dtype) for x in (q, k, v, dout)]
    truth = _grads(lambda a, b, c: reference_attention(a, b, c, layout), q, k, v, dout)
    base = _grads(lambda a, b, c: reference_attention(a, b, c, layout, upcast=False), *lo)

    def attn(a, b, c):
        return sparse_attention(a, b, c, layout, backend="triton")

    runs = []
    ta.POISON_OUTPUTS = True
    try:
        for how in LAUNCH_VARIANTS:
            runs += [_grads(attn, *lo, how) for _ in range(2)]
    finally:
        ta.POISON_OUTPUTS = False
    name = str(dtype).removeprefix("torch.")
    case = f"launches ({', '.join(LAUNCH_VARIANTS)}) {kind}/{mode} n={n} d={d} {name}"
    return _judge(case, runs, base, truth, dtype)


__all__ = ["LAUNCH_VARIANTS", "KernelCheck", "check_kernel", "check_launches", "default_blocks"]
