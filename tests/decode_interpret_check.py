"""Run the decoding attention kernel (``ops/decode_triton.py``) under TRITON_INTERPRET=1.

Executed in a subprocess by tests/test_decode_attention.py (the interpreter is chosen
when Triton's kernels are defined). Prints one JSON line per part: the kernel against
fp64 in three dtypes, then the eager path's tokens from the static mode (fixed merged:
a ring and a summary store per head) and from a compiled step that calls the kernel as
an opaque op (strided multihead: heads in different stores), the kernel's launches
counted. (``sampling_check`` runs every mode through the kernel on the GPU.)
"""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from sparse_transformer.model import SparseTransformer, SparseTransformerConfig, generate  # noqa: E402
from sparse_transformer.ops import decode, decode_triton  # noqa: E402

LAUNCHES = [0]
_launch = decode_triton.launch


def _counted(*args):
    LAUNCHES[0] += 1
    return _launch(*args)


decode_triton.launch = _counted  # did the kernel run (not the reference)?


def static_steps() -> dict:
    """The static mode on a fixed merged model (a ring and a summary store per head, one
    softmax over both): the eager tokens, every step through the kernel."""
    cfg = SparseTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, ff_mult=2, qk_mult=0.5, n_ctx=64,
        pattern="fixed", stride=8, summary=2, head_mode="merged", block_q=16, block_k=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    before = LAUNCHES[0]
    fast = generate(model, prompt, 20, temperature=1.0, top_p=0.9, generator=4, fast="static")
    launched = LAUNCHES[0] - before
    eager = generate(model, prompt, 20, temperature=1.0, top_p=0.9, generator=4)
    return {"same_tokens": bool(torch.equal(fast, eager)), "launches": launched}


def compiled_step() -> dict:
    """compile-blocks on a strided multihead model: the eager tokens, the kernel in the graph."""
    cfg = SparseTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, ff_mult=2, qk_mult=0.5, n_ctx=64,
        pattern="strided", stride=8, head_mode="multihead", block_q=16, block_k=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    counters.clear()
    before = LAUNCHES[0]
    fast = generate(model, prompt, 20, temperature=1.0, generator=3, fast="compile-blocks")
    launched = LAUNCHES[0] - before  # 2 layers x 19 steps through the compiled op
    eager = generate(model, prompt, 20, temperature=1.0, generator=3)
    return {
        "same_tokens": bool(torch.equal(fast, eager)),
        "graph_breaks": len(counters["graph_break"]),
        "launches": launched,
    }


def main() -> None:
    assert decode.uses_kernel(torch.zeros(1, 1, 2))
    ok, message = decode.check("cpu", (torch.float32, torch.float16, torch.bfloat16))
    print(json.dumps({"part": "check", "ok": ok, "message": message}))
    decode.KERNEL_MIN_ROWS = 0  # the tiny models' few rows through the kernel too
    print(json.dumps({"part": "static", **static_steps()}))
    print(json.dumps({"part": "compiled", **compiled_step()}))


if __name__ == "__main__":
    main()
