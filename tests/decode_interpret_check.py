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


def decode_tokens(pattern: str, mode: str, fast: str) -> dict:
    """A tiny model of the pattern decoded by ``fast``: does it give the eager path's
    tokens, how many kernel launches, how many graph breaks."""
    cfg = SparseTransformerConfig(
        n_layers=2, d_model=32, n_heads=2, ff_mult=2, qk_mult=0.5, n_ctx=64,
        pattern=pattern, stride=8, summary=2, head_mode=mode, block_q=16, block_k=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SparseTransformer(cfg).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    options = dict(temperature=1.0, top_p=0.9, generator=4)
    counters.clear()
    before = LAUNCHES[0]
    tokens = generate(model, prompt, 20, **options, fast=fast)
    launched = LAUNCHES[0] - before  # 2 layers x 19 steps
    eager = generate(model, prompt, 20, **options)
    return {
        "same_tokens": bool(torch.equal(tokens, eager)),
        "graph_breaks": len(counters["graph_break"]),
        "launches": launched,
    }


def main() -> None:
    assert decode.uses_kernel(torch.zeros(1, 1, 2))
    ok, message = decode.check("cpu", (torch.float32, torch.float16, torch.bfloat16))
    print(json.dumps({"part": "check", "ok": ok, "message": message}))
    decode.KERNEL_MIN_ROWS = 0  # the tiny models' few rows through the kernel too
    # static: a ring and a summary store per head, one softmax over both
    print(json.dumps({"part": "static", **decode_tokens("fixed", "merged", "static")}))
    # compile-blocks: heads in different stores, the kernel an opaque op in the graph
    compiled = decode_tokens("strided", "multihead", "compile-blocks")
    print(json.dumps({"part": "compiled", **compiled}))


if __name__ == "__main__":
    main()
