"""A plain Ray user's path: ``ray start --head`` on loopback, then only Ray's own CLI
(``ray job submit / status / logs``) and the dashboard's REST API.

The tiny training runs as a Ray job from a staged working directory (a folder whose
``sparse_transformer`` entry links to the checkout: the checkout is the package, so
this is how Ray's ``--working-dir`` ships it), with environment variables set at job
level, checkpoints in an absolute folder, and ``run.ray_address`` left at ``local``:
the trainer joins the job's cluster by itself. The job succeeds; its logs show the
real dashboard URL and each progress line once; the final validation loss reaches
Prometheus while it runs; the dashboard's Train view lists the run, without the
secret the job was given; a relative run folder is refused inside a job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sparse_transformer.distributed.checkpoint import complete_checkpoints, verify_contents
from sparse_transformer.distributed.submit import PROJECT_ROOT
from tests.test_monitoring import prometheus_name, scrape
from tests.test_submit import RayHead
from tests.test_train import small_dataset  # noqa: F401 - fixture

RUN = "ray-job-tiny"
SECRET = "hunter2-job"


def ray_cli(head: RayHead, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).parent / "ray"  # the CLI of the Ray this suite runs
    exe = str(ray) if ray.exists() else "ray"
    return subprocess.run(  # Ray's CLI writes its messages to stderr: one stream here
        [exe, *argv],
        env=head.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def submit(head: RayHead, job_id: str, stage: Path, *train_args: str) -> None:
    env_json = json.dumps({"env_vars": {"PYTHONUNBUFFERED": "1", "ST_JOB_LEVEL": "yes"}})
    done = ray_cli(
        head,
        "job", "submit", "--address", head.address, "--submission-id", job_id, "--no-wait",
        "--working-dir", str(stage), "--runtime-env-json", env_json, "--",
        "python", "-m", "sparse_transformer", "train", "--config", "tiny", *train_args,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


def wait_terminal(head: RayHead, job_id: str, timeout: float, while_running=None) -> str:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ray_cli(head, "job", "status", "--address", head.address, job_id).stdout
        for status in ("SUCCEEDED", "FAILED", "STOPPED"):
            if f"Job '{job_id}' {status.lower()}" in out:
                return status
        if while_running is not None:
            while_running()
        time.sleep(1)
    raise TimeoutError(f"job {job_id} not done after {timeout:.0f} s; ray job status: {out}")


def rest(head: RayHead, path: str) -> dict:
    request = urllib.request.Request(
        head.address + path, headers={"Authorization": f"Bearer {head.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_a_ray_user_submits_the_tiny_training_with_rays_own_cli(
    small_dataset: str,  # noqa: F811
    tmp_path: Path,
    shared_ray_head: RayHead,
) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "sparse_transformer").symlink_to(PROJECT_ROOT)
    storage = tmp_path / "runs"
    head = shared_ray_head  # `python` on its PATH is the suite's (python_first_path)
    # a relative run folder would land in the job's temporary working directory
    submit(head, "st-relative", stage, "run.storage_path=runs", f"data.url={small_dataset}")
    assert wait_terminal(head, "st-relative", 120) == "FAILED"
    logs = ray_cli(head, "job", "logs", "--address", head.address, "st-relative").stdout
    assert "run.storage_path: 'runs' is relative; inside Ray job st-relative" in logs

    submit(
        head, "st-tiny", stage,
        "model.n_ctx=64", "model.stride=8", "model.summary=4", "model.block_q=8",
        "model.block_k=8", "model.embed_shape=[8,8]", "data.global_batch_size=4",
        "data.eval_batch_size=4", f"data.url={small_dataset}", "data.prepare=false",
        "scaling.num_workers=1",
        "train.steps=12", "train.log_every=2", "train.eval_every=4", "train.eval_batches=2",
        "train.checkpoint_every=12", "train.sample_length=8", f"run.name={RUN}",
        f"run.storage_path={storage}", f"run.storage_options={{secret: {SECRET}}}",
    )  # fmt: skip
    seen: dict[str, float] = {}

    def scrape_validation() -> None:
        samples = scrape(head.metrics_url).get(prometheus_name("val_loss_bits"), [])
        for labels, value in samples:
            if labels.get("run") == RUN:
                seen["val"] = value

    status = wait_terminal(head, "st-tiny", 300, while_running=scrape_validation)
    logs = ray_cli(head, "job", "logs", "--address", head.address, "st-tiny").stdout
    assert status == "SUCCEEDED", logs
    runs = rest(head, "/api/train/v2/runs/v1")["train_runs"]

    assert "[train] running as Ray job st-tiny: joined its cluster" in logs
    assert f"[train] Ray dashboard: {head.address}\n" in logs  # the port Ray took
    assert sum("[train] step      2/12" in line for line in logs.splitlines()) == 1
    assert "[train] finished in" in logs
    assert 0 < seen.get("val", -1) < 8, "val_loss_bits never reached Prometheus"

    (step, url), *_ = reversed(complete_checkpoints(str(storage / RUN)))
    assert step == 12 and Path(url).parent == storage / RUN
    verify_contents(url)

    (run,) = [r for r in runs if r["name"] == RUN]
    assert run["status"] == "FINISHED"
    loop_config = run["run_settings"]["train_loop_config"]
    assert loop_config["private"].startswith("ObjectRef(")  # the config travels as an object
    assert SECRET not in json.dumps(run["run_settings"])
