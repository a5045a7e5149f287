"""End to end: the tiny training submitted to a real loopback Ray head, followed and scraped.

``sparse-transformer submit --follow --config tiny ...`` runs as a subprocess
(as a user would run it) against a head with token authentication; while it
streams the job's logs, the cluster's Prometheus endpoint is scraped for the
trainer's metrics. The job must succeed, its logs must carry the final
validation bits per byte, and every training metric must have been exported
with sane values.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_monitoring import TRAINING_METRICS, check_sane, prometheus_name, scrape
from tests.test_submit import RayHead

STEPS = 30
# tiny at a context of 64 (as in test_ray_jobs): what is checked here is the path from
# submit to the job, its logs and the metrics, not the model; n = 1,024 made each of the
# 30 steps cost ~2.5 s on two cores.
SMALL = (
    "model.n_ctx=64", "model.stride=8", "model.summary=4", "model.block_q=8", "model.block_k=8",
    "model.embed_shape=[8,8]", "train.sample_length=8",
)  # fmt: skip


@pytest.mark.slow
def test_tiny_training_submitted_followed_and_scraped(
    tmp_path: Path, shared_ray_head: RayHead
) -> None:
    _run(shared_ray_head, tmp_path)


def _run(head: RayHead, tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE")
    }
    env.update(
        RAY_AUTH_TOKEN_PATH=str(head.token_path),  # the client finds the token where Ray does
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PYTHONUNBUFFERED="1",
    )
    run_name = "submitted-tiny"
    storage = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "sparse_transformer",
        "submit",
        "--address",
        head.address,
        "--follow",
        "--config",
        "tiny",
        *SMALL,
        f"train.steps={STEPS}",
        "train.log_every=2",
        f"train.eval_every={STEPS}",
        "train.eval_batches=2",
        f"train.checkpoint_every={STEPS}",
        f"run.storage_path={storage}",
        f"run.name={run_name}",
    ]
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
        )
        seen: dict[str, list[float]] = {k: [] for k in TRAINING_METRICS}
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                samples = scrape(head.metrics_url)
            except OSError:
                samples = {}
            for k in TRAINING_METRICS:
                for labels, value in samples.get(prometheus_name(k), []):
                    if labels.get("run") == run_name:
                        seen[k].append(value)
            time.sleep(1)
        if proc.poll() is None:
            proc.kill()
            pytest.fail("submit --follow did not end within 10 minutes:\n" + log.read_text())
    text = log.read_text()
    assert proc.returncode == 0, text
    assert head.token not in text
    job_id = re.search(r"submitted job (\S+)", text)[1]
    assert f"job {job_id} SUCCEEDED" in text, text
    m = re.search(r"validation: ([0-9.]+) bits per byte", text)
    assert m, text
    bits = float(m[1])
    assert 0 < bits < 7.5, bits  # untrained: 8 bits per byte; 30 steps learn the byte statistics

    missing = [k for k, v in seen.items() if not v]
    assert not missing, f"never scraped: {missing}\n{text[-3000:]}"
    last = {k: v[-1] for k, v in seen.items()}
    check_sane(last)
    assert max(seen["step"]) <= STEPS
    assert (storage / run_name / "tensorboard").is_dir()
