"""The host-time breakdown of the attention op (``benchmarks/attention_host.py``) runs
every one of its rows: on the CPU, the Triton kernels interpreted at a tiny shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_attention_host_smoke_measures_every_row(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "sparse_transformer.benchmarks.attention_host", "--cpu-smoke"]
    proc = subprocess.run(
        [*cmd, "--config", "cifar10", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    us = json.loads(out.read_text())["us"]
    launches = {f"{k}_{via}" for k in ("delta", "dq", "dkdv") for via in ("cache", "jit")}
    assert set(us["launches"]) == launches  # no autotuner in the interpreter
    rows = ["fwd_impl", "bwd_impl", "fwd_bwd_autograd", "fwd_bwd_autograd_one_thread"]
    rows += ["bwd_impl_other_thread", "trivial_autograd", "trivial_autograd_one_thread"]
    for name in rows:
        assert us[name] > 0, name
    for mode in ("device_thread", "one_thread"):
        phases = us["phases"][mode]
        assert set(phases) == {
            "to_fwd_impl", "fwd_impl", "fwd_impl_to_caller",
            "grad_to_bwd_impl", "bwd_impl", "bwd_impl_to_caller",
        }  # fmt: skip
        assert all(t > 0 for t in phases.values()), phases
    assert "function calls" in us["profile_one_thread"][0]
    assert all(t > 0 for t in us["launches"].values())


def test_attention_host_smoke_needs_the_interpreter() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "sparse_transformer.benchmarks.attention_host", "--cpu-smoke"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
