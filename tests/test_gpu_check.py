"""The GPU acceptance command's plumbing, run on the CPU (``gpu_check --cpu-smoke``).

Device time is scarce and CI has no GPU: a gpu_check that breaks on its own plumbing
(a renamed field, a check reading the wrong record) would waste a GPU session. Here
the same sections run on the CPU with small models (fp32, gloo, the PyTorch attention
backend standing in for the Triton kernels); the figures mean nothing, every check must
pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_check_cpu_smoke_passes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [
        sys.executable, "-m", "sparse_transformer.benchmarks.gpu_check", "--cpu-smoke",
        "--only", "kernels,enwik8,determinism,sampling", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x[:4] in ("PASS", "FAIL", "INFO")]
    assert proc.returncode == 0, "\n".join(lines) + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = [r["check"] for r in report["checks"] if r["status"] == "PASS"]
    assert report["summary"].endswith(" passed, 0 failed")
    assert not _work_dir(proc.stdout).exists()  # removed after a pass
    for name in (
        "kernels",
        "ray: the dashboard starts",
        "enwik8: the loss falls",
        "enwik8: an injected gradient overflow is skipped, counted and the scale halves",
        "enwik8: a worker killed mid-run is restarted by Ray and resumes from its checkpoint",
        "enwik8: training gauges scraped from Ray's Prometheus endpoint",
        "enwik8: eval reads the last checkpoint on cpu",
        "enwik8: sample reads the last checkpoint on cpu",
        "determinism: train.deterministic: resumed == uninterrupted, bitwise",
        "sampling: decode attention against fp64",
        "sampling: fast decoding gives the eager tokens",
    ):
        assert name in checks, (name, lines)


def _work_dir(stdout: str) -> Path:
    info = next(x for x in stdout.splitlines() if x.startswith("INFO device"))
    return Path(re.search(r"work dir (\S+)", info).group(1))


def test_keep_work_keeps_the_work_dir() -> None:
    cmd = [
        sys.executable, "-m", "sparse_transformer.benchmarks.gpu_check", "--cpu-smoke",
        "--only", "sampling", "--keep-work",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    work = _work_dir(proc.stdout)
    try:
        assert work.is_dir() and f"work dir kept: {work}" in proc.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
