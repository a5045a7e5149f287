"""SIGINT or SIGTERM to ``sparse-transformer train``: a clean stop, a registered
checkpoint, one line saying how to resume, and no Ray process left behind.

For SIGINT the driver runs as a real subprocess with its own local Ray instance (2 CPU
workers); the signal goes to the driver alone, as ``kill`` sends it (a terminal's Ctrl-C also
reaches Ray's processes, which block SIGINT). While it trains, its sockets are checked:
only PyTorch's rendezvous store may listen beyond loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from sparse_transformer.distributed.checkpoint import complete_checkpoints, verify_contents
from tests.test_loopback import is_loopback, listening
from tests.test_train import (
    local_ray,  # noqa: F401 - fixture
    small_config_doc,
    small_dataset,  # noqa: F401 - fixture
)


def _wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.5)


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sigint_stops_at_a_step_with_a_checkpoint_and_no_ray_left(
    small_dataset: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    sig, code = signal.SIGINT, 130
    doc = small_config_doc(tmp_path, small_dataset, "stopped", steps=10_000, log_every=2)
    doc["train"].update(eval_every=0, checkpoint_every=0, record_batches=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "sparse_transformer", "train", "--config", str(tmp_path / "c.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    run_dir = tmp_path / "stopped"
    try:
        _wait_for(lambda: len(_logged_steps(run_dir)) >= 2, 240, "two logged steps")
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        assert ray_processes
        # while it trains, only PyTorch's rendezvous store (rank 0) is beyond loopback
        sockets = listening([psutil.Process(driver.pid), *ray_processes])
        outside = [s for s in sockets if not is_loopback(s[1])]
        assert len(outside) <= 1 and all("RayTrainWorker" in s[0] for s in outside), outside
        driver.send_signal(sig)
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == code, out

    # the workers stopped after one step, checkpointed it, and Ray Train registered it
    found = complete_checkpoints(str(run_dir))
    assert len(found) == 1, found
    step, url = found[0]
    verify_contents(url)
    assert 0 < step < 10_000
    assert _logged_steps(run_dir)[-1] <= step
    snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    assert Path(url).name in snapshot  # registered, not an orphan
    lines = [line for line in out.splitlines() if "stopped by" in line]
    assert lines == [
        f"[train] stopped by {sig.name} at step {step} after {lines[0].split(' after ')[1]}"
    ], out
    assert f"checkpoint {url}. Run the same command again to resume from it." in lines[0]
    assert "Traceback" not in out

    # nothing the driver started is still running
    def all_gone() -> bool:
        return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_processes)

    _wait_for(all_gone, 30, "the driver's Ray processes to exit")


# after the subprocess test: this one's local Ray instance lives to the module's end
@pytest.mark.slow
def test_sigterm_asks_for_a_stop_and_a_second_signal_stops_at_once(
    local_ray: None,  # noqa: F811
) -> None:
    """SIGTERM takes the same path as SIGINT (the subprocess test above): the request
    reaches the flag the workers poll, naming the signal; a second one interrupts."""
    import ray

    from sparse_transformer.distributed.stopping import NAMESPACE, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(verbose=False) as name:
        assert name is not None
        flag = ray.get_actor(name, namespace=NAMESPACE)
        assert ray.get(flag.reason.remote()) is None
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for(lambda: ray.get(flag.reason.remote()) == "SIGTERM", 10, "the request")
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, in the main thread
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(("reason", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_the_exit_code_and_the_resume_line_name_the_signal(
    reason: str, code: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparse_transformer.cli import main
    from sparse_transformer.distributed import trainer

    def stopped_run(cfg: object) -> trainer.TrainSummary:  # what a stopped run returns
        return trainer.TrainSummary({"step": 7, "stopped": reason}, "/r/ckpt", "/r", reason)

    monkeypatch.setattr(trainer, "run_training", stopped_run)
    assert main(["train"]) == code
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"[train] stopped by {reason} at step 7 after ")
    assert line.endswith("checkpoint /r/ckpt. Run the same command again to resume from it.")
