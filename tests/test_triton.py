"""The Triton kernels' logic, checked on the CPU under TRITON_INTERPRET=1 at tiny sizes.

The full-size GPU grid (every pattern, n up to 65,536, fp16/bf16) is in
tests/test_triton_gpu.py, marked ``gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_triton_kernels_match_reference_in_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("triton_interpret_check.py")
    seed = int.from_bytes(os.urandom(2), "little")  # fresh inputs; named in any failure
    proc = subprocess.run(
        [sys.executable, str(script), str(seed)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, f"seed {seed}\n" + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows[-1] == {"compile": "ok"}
    launches = rows[-2]  # misaligned and strided inputs between aligned ones
    assert launches["launches"] is True, launches["detail"]
    rows = rows[:-2]
    assert len(rows) == 11  # 7 patterns two-pass, 4 of them fused
    assert {(row["backward"], row["transposed"]) for row in rows} == {
        (backward, transposed) for backward in ("two-pass", "fused") for transposed in (0, 1)
    }  # every dK/dV path
    for row in rows:
        # fp32 kernels vs the fp64 reference: out, dq, dk, dv
        assert max(row["errors"]) < 1e-4, (seed, row)


def test_launch_signature_separates_what_triton_specialises() -> None:
    """The cached launch's key (``_signature``) differs wherever Triton may compile
    another kernel: the current device, a pointer's alignment, a dtype, an int's value,
    a bool or float in an int's place, a constexpr, autotuned or not, Triton's debug
    knob; and there is none (no caching) for arguments it cannot vouch for or while a
    hook runs on every launch."""
    import torch
    import triton

    from sparse_transformer.ops import triton_attention as ta

    kernel = ta._fwd_kernel
    buf = torch.zeros(1024, dtype=torch.float16)
    start = (-buf.data_ptr() // 2) % 128  # the first element on a 256-byte boundary
    x, y = buf[start : start + 64], buf[start + 128 : start + 192]  # 256 bytes apart

    def sig(*args, launcher=kernel, device=0, **constexprs):
        return ta._signature(kernel, launcher, device, args, constexprs or {"D": 16})

    assert sig(x, 3, 0.5) is not None
    assert sig(x, 3, 0.5) == sig(y, 3, 0.5)
    assert sig(x, 3, 0.5) != sig(x, 3, 0.5, device=1)
    assert sig(x, 3, 0.5) != sig(x[1:], 3, 0.5)  # 2 bytes past the 256-byte boundary
    assert sig(x, 3, 0.5) != sig(x.float(), 3, 0.5)
    assert sig(x, 16, 0.5) != sig(x, 17, 0.5)
    assert sig(x, 1, 0.5) != sig(x, True, 0.5)
    assert sig(x, 1, 1) != sig(x, 1, 1.0)
    assert sig(x, 3, 0.5) != sig(x, 3, 0.5, D=32)
    assert sig(x, 3, 0.5) != sig(x, 3, 0.5, launcher=object())
    assert sig(x, [3], 0.5) is None
    before = sig(x, 3, 0.5)
    runtime = triton.knobs.runtime
    debug = runtime.debug
    runtime.debug = not debug
    try:
        assert sig(x, 3, 0.5) != before
    finally:
        runtime.debug = debug
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    try:
        assert sig(x, 3, 0.5) is None
    finally:
        kernel.pre_run_hooks.pop()
