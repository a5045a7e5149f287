"""``ops.decode``: one query per head over gathered cache rows (the decoding step).

The reference against a per-(sequence, head) loop written out by hand; its errors;
the Triton kernel against fp64 under TRITON_INTERPRET=1 (a subprocess) and, marked
``gpu``, on CUDA in fp16, bf16 and fp32 with the flash-attention rule (its error at
most twice PyTorch's own in the same dtype).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_transformer.ops import decode


def _by_hand(q, kv, rows, readable, scale, d_qk):
    b, h, _ = q.shape
    out = torch.zeros(b, h, kv.shape[2] - d_qk, dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            take = rows[j][readable[j]]
            if len(take) == 0:
                continue
            k, v = kv[i, take, :d_qk].double(), kv[i, take, d_qk:].double()
            p = torch.softmax(k @ q[i, j].double() * scale, 0)
            out[i, j] = p @ v
    return out


@pytest.mark.parametrize("shape", decode.CHECK_SHAPES, ids=str)
def test_reference_is_attention_over_the_readable_rows(shape):
    q, kv, rows, readable = decode.check_inputs(shape, torch.float64, "cpu", seed=5)
    scale = 0.3
    got = decode.decode_attention_ref(q, kv, rows, readable, scale, shape[3])
    torch.testing.assert_close(got, _by_hand(q, kv, rows, readable, scale, shape[3]))
    assert got[:, 0].abs().max() == 0  # head 0 reads nothing: zeros


def test_a_row_read_twice_counts_twice_and_fp16_keys_are_multiplied_in_fp32():
    kv = torch.full((1, 2, 64 + 8), 300.0).half()  # q . k = 5.8e6 overflows fp16
    kv[0, 1, 64:] = 2.0
    rows = torch.tensor([[0, 1, 1]])
    out = decode.decode_attention(
        kv[:, :1, :64], kv, rows, torch.ones_like(rows, dtype=torch.bool), 0.1, 64
    )
    assert out.dtype == torch.float16
    torch.testing.assert_close(
        out.float(), torch.full((1, 1, 8), 300 / 3 + 4 / 3), rtol=1e-3, atol=0
    )


def test_shapes_are_checked():
    q, kv, rows, readable = decode.check_inputs((1, 2, 8, 4, 4, 16), torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        decode.decode_attention(q, kv, rows, readable, 1.0, 3)
    with pytest.raises(ValueError, match=r"must both be \(H, S\)"):
        decode.decode_attention(q, kv, rows, readable[:, :4], 1.0, 4)
    with pytest.raises(ValueError, match="readable bool"):
        decode.decode_attention(q, kv, rows, readable.float(), 1.0, 4)


def test_the_kernel_is_asked_for_only_where_it_runs():
    q, kv, rows, readable = decode.check_inputs((1, 2, 8, 4, 4, 16), torch.float32, "cpu")
    assert not decode.uses_kernel(kv)  # the CPU, no interpreter
    with pytest.raises(ValueError, match="no Triton kernel"):
        decode.decode_attention(q, kv, rows, readable, 1.0, 4, kernel=True)
    expect = decode.decode_attention_ref(q, kv, rows, readable, 1.0, 4)
    assert torch.equal(decode.decode_attention(q, kv, rows, readable, 1.0, 4), expect)


@pytest.mark.slow
def test_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("decode_interpret_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = {r["part"]: r for r in map(json.loads, proc.stdout.splitlines()) if "part" in r}
    assert parts["check"]["ok"] and parts["check"]["message"].startswith("Triton kernel"), parts
    static = parts["static"]
    assert static["same_tokens"] and static["launches"] == 2 * 19, static
    compiled = parts["compiled"]
    assert compiled["same_tokens"] and compiled["graph_breaks"] == 0, compiled
    assert compiled["launches"] == 2 * 19, compiled  # every layer of every step


@pytest.mark.gpu
def test_kernel_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert decode.uses_kernel(torch.zeros(1, 1, 2, device="cuda"))
    ok, message = decode.check("cuda", (torch.float16, torch.bfloat16, torch.float32))
    assert ok, message
