"""Attention of one query per head over gathered cache rows: the decoding step's attention.

A decoding step asks, for every sequence b and head h, for the attention of one
query ``q[b, h]`` (d_qk) over the keys and values held in rows ``rows[h, :]`` of a
cache buffer ``kv[b]`` (each row a key and its value side by side, d_qk + d_v),
of which only those with ``readable[h, s]`` may be read. The caller decides what
the rows are (a ring, summary cells, a band and a column of a full store): this
module knows nothing of patterns or models.

- :func:`decode_attention_ref`: plain PyTorch, in fp32 (fp64 for fp64 inputs);
  the reference, and what runs off CUDA (but for the kernel's tests under
  TRITON_INTERPRET=1) and where heads read few rows (``torch.compile`` fuses it).
- :func:`decode_attention`: on CUDA, where heads read many rows
  (:data:`KERNEL_MIN_ROWS`), one Triton kernel (``_decode_kernel``), one program
  per (b, h) with an online softmax over blocks of rows, instead of the separate
  score, softmax and weighted-sum kernels that the reference compiles to; else the
  reference. The kernel is a ``torch.library`` custom op, so a compiled graph calls
  it as it is. ``SPARSE_TRANSFORMER_DECODE_KERNEL=0`` runs the reference everywhere.

Rows with nothing readable give zeros, as in ``ops.sparse_attention``.
"""

from __future__ import annotations

import os

import torch

from sparse_transformer.ops.attention import _HAVE_TRITON, _triton_interpreter, triton_available


def _check(
    q: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, readable: torch.Tensor, d_qk: int
) -> None:
    b, h, dq = q.shape
    if kv.dim() != 3 or kv.shape[0] != b or dq != d_qk or kv.shape[2] <= d_qk:
        raise ValueError(
            f"decode_attention: q {tuple(q.shape)} and kv {tuple(kv.shape)} do not fit "
            f"(expected kv (B, R, d_qk + d_v) with B = {b}, d_qk = {d_qk})"
        )
    if rows.shape != readable.shape or rows.dim() != 2 or rows.shape[0] != h:
        raise ValueError(
            f"decode_attention: rows {tuple(rows.shape)} and readable "
            f"{tuple(readable.shape)} must both be (H, S) with H = {h}"
        )
    if readable.dtype != torch.bool or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"decode_attention: rows must be int32/int64 and readable bool, got "
            f"{rows.dtype} and {readable.dtype}"
        )


# When traced by torch.compile the products are written as multiply-and-sum: Inductor makes
# each one reduction that reads the fp16 keys/values and widens them in registers (a matmul
# would first write an fp32 copy of the cache). Eager, einsum (a batched matmul) is faster.
def _dot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, H, d) . k (B, H, S, d) -> (B, H, S)."""
    if torch.compiler.is_compiling():
        return (q[:, :, None, :] * k).sum(-1)
    return torch.einsum("bhd,bhsd->bhs", q, k)


def _mix(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """p (B, H, S) weights the values v (B, H, S, d) -> (B, H, d)."""
    if torch.compiler.is_compiling():
        return (p[..., None] * v).sum(-2)
    return torch.einsum("bhs,bhsd->bhd", p, v)


def masked_softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of scores with -inf where masked; all-masked rows give 0."""
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))  # exp(-inf) = 0 when masked
    denom = p.sum(-1, keepdim=True)
    return p / torch.where(denom == 0, 1.0, denom)


def decode_attention_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    readable: torch.Tensor,
    scale: float,
    d_qk: int,
    upcast: bool = True,
) -> torch.Tensor:
    """q (B, H, d_qk) over kv[:, rows] (B, H, S, d_qk + d_v) where readable (H, S)
    -> (B, H, d_v) in q's dtype, computed in fp32 (fp64 for fp64); ``upcast=False``
    computes in q's dtype (PyTorch's own low-precision error, for :func:`check`)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    compute = compute if upcast else q.dtype
    gathered = kv[:, rows]  # (B, H, S, d_qk + d_v)
    k, v = gathered[..., :d_qk], gathered[..., d_qk:]
    s = _dot(q.to(compute), k.to(compute)) * scale  # (B, H, S)
    p = masked_softmax(s.masked_fill(~readable, float("-inf")))
    return _mix(p, v.to(compute)).to(q.dtype)


KERNEL = os.environ.get("SPARSE_TRANSFORMER_DECODE_KERNEL", "1") != "0"
"""Run the Triton kernel where it can run (read once, at import). This and
:data:`KERNEL_MIN_ROWS` are read when a step is traced or captured: a compiled graph
or a CUDA graph keeps the choice it was made with."""
_INTERPRETED = _HAVE_TRITON and _triton_interpreter()  # kernels on the CPU (tests)


KERNEL_MIN_ROWS = 1024
"""The kernel runs where heads read at least this many rows. One program per (sequence,
head) walks them in turn, which pays where rows are many: on the H200 (compiled blocks),
enwik8's step (batch 4, 8 heads, 3,200 rows) took 1.60 ms with it and 2.94 ms with the
compiled reference, cifar10's (batch 16, 2 heads, 129 rows) 3.98 ms and 3.02 ms,
music-65k's (1, 8, 513) 1.23 and 1.19 ms."""


def uses_kernel(kv: torch.Tensor) -> bool:
    """Can :func:`decode_attention` run the Triton kernel for this buffer?"""
    if not KERNEL or kv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if kv.is_cuda:
        return triton_available()
    return kv.device.type == "cpu" and _INTERPRETED


def decode_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    readable: torch.Tensor,
    scale: float,
    d_qk: int,
    kernel: bool | None = None,
) -> torch.Tensor:
    """The attention of q (B, H, d_qk) over the readable rows (H, S) of kv (B, R, d_qk + d_v)
    -> (B, H, d_v). ``kernel``: True the Triton kernel, False the reference, None the
    kernel where it can run (:func:`uses_kernel`) and S >= :data:`KERNEL_MIN_ROWS`."""
    _check(q, kv, rows, readable, d_qk)
    if kernel is None:
        kernel = uses_kernel(kv) and rows.shape[1] >= KERNEL_MIN_ROWS
    elif kernel and not uses_kernel(kv):
        raise ValueError(f"decode_attention: no Triton kernel for {kv.dtype} on {kv.device}")
    if kernel:
        return decode_attention_op(q, kv, rows, readable, scale, d_qk)
    return decode_attention_ref(q, kv, rows, readable, scale, d_qk)


@torch.library.custom_op("sparse_transformer::decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor,
    kv: torch.Tensor,
    rows: torch.Tensor,
    readable: torch.Tensor,
    scale: float,
    d_qk: int,
) -> torch.Tensor:
    """The Triton kernel (``ops/decode_triton.py``) as an opaque op."""
    from sparse_transformer.ops import decode_triton

    return decode_triton.launch(q, kv, rows, readable, scale, d_qk)


@decode_attention_op.register_fake
def _(q, kv, rows, readable, scale, d_qk):
    return q.new_empty(q.shape[0], q.shape[1], kv.shape[2] - d_qk)


# -- the check: kernel against the reference -------------------------------------------------------

CHECK_SHAPES: tuple[tuple[int, int, int, int, int, int], ...] = (
    # (B, H, S, d_qk, d_v, R): one block; several blocks with a ragged end; d not a power of 2
    (2, 2, 24, 16, 32, 64),
    (3, 4, 300, 32, 64, 700),
    (1, 3, 129, 24, 40, 400),
)


def check_inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random q, kv, rows and readable of ``shape``: readable rows at random, one head with
    nothing readable, and one with only a few readable at the end (whole blocks skipped)."""
    b, h, s, dq, dv, r = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, dq, generator=g)
    kv = torch.randn(b, r, dq + dv, generator=g)
    rows = torch.randint(0, r, (h, s), generator=g)
    readable = torch.rand(h, s, generator=g) < 0.7
    readable[0] = False  # a head that reads nothing: zeros
    if h > 2:
        readable[1, : s - 5] = False  # the head's first blocks skipped
    return tuple(t.to(device) for t in (q.to(dtype), kv.to(dtype), rows, readable))


def check(device: torch.device | str, dtypes: tuple[torch.dtype, ...]) -> tuple[bool, str]:
    """The Triton kernel against the fp64 reference on :data:`CHECK_SHAPES`, at every size
    (not only where it is chosen): its error at most twice the reference's own in the same
    dtype (``upcast=False``), plus 1e-6, and zeros for a head that reads nothing.
    (ok, message); the message names the worst case. On CUDA a missing kernel fails; off
    CUDA without the interpreter the reference is checked instead (the plumbing)."""
    worst, problems, names = (0.0, ""), [], set()
    for shape in CHECK_SHAPES:
        for dtype in dtypes:
            q, kv, rows, ok = check_inputs(shape, dtype, device)
            kernel = uses_kernel(kv)
            if kv.is_cuda and not kernel:
                return False, f"no Triton kernel for {dtype} on {device} (is Triton installed?)"
            names.add("Triton kernel" if kernel else "reference")
            scale = shape[3] ** -0.5
            exact = decode_attention_ref(q.double(), kv.double(), rows, ok, scale, shape[3])
            ours = decode_attention(q, kv, rows, ok, scale, shape[3], kernel).double()
            theirs = decode_attention_ref(q, kv, rows, ok, scale, shape[3], upcast=False)
            err = (ours - exact).abs().max().item()
            bound = 2 * (theirs.double() - exact).abs().max().item() + 1e-6
            if not err <= bound:
                problems.append(f"{shape} {dtype}: error {err:.2e} > bound {bound:.2e}")
            if ours[:, 0].abs().max().item() != 0.0:
                problems.append(f"{shape} {dtype}: a head that reads nothing is not zero")
            worst = max(worst, (err / bound, f"{shape} {dtype}: {err:.2e} of {bound:.2e}"))
    name = " and ".join(sorted(names))
    if problems:
        return False, f"{name}: " + "; ".join(problems)
    return True, f"{name}: {len(CHECK_SHAPES) * len(dtypes)} cases; worst {worst[1]}"
