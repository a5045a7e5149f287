"""Training metrics reach the Ray cluster's Prometheus endpoint.

``scrape`` reads the metrics endpoint of a real loopback Ray head (started as
in ``test_submit``) with Prometheus' own text parser. The end-to-end check
with the real trainer lives in ``test_submit_training``; here a Ray job sets
gauges with the trainer's names through ``ray.util.metrics`` from inside a Ray
actor (as the trainer's rank 0 does), which pins down the path from
``ray.util.metrics`` to the endpoint, the ``ray_`` prefix and the tags.
"""

from __future__ import annotations

import sys
import time

import pytest

from sparse_transformer.distributed import submit as sub
from sparse_transformer.distributed.monitoring import (
    METRIC_NAMES,
    Samples,
    implausible,
    prometheus_name,
    run_values,
    scrape,
)
from tests.test_submit import RayHead, reset_ray_token_cache

TRAINING_METRICS = tuple(METRIC_NAMES)  # the trainer's gauges (distributed/worker.py)


def latest(samples: Samples, key: str, run: str) -> float:
    values = run_values(samples, run)
    assert key in values, f"{prometheus_name(key)}{{run={run!r}}} not exported"
    return values[key]


def check_sane(values: dict[str, float], *, on_gpu: bool = False) -> None:
    """Plausible values for a byte-level model training (CPU unless ``on_gpu``)."""
    problems = implausible(values, on_gpu=on_gpu)
    assert not problems, problems


@pytest.fixture
def head(shared_ray_head: RayHead) -> RayHead:
    return shared_ray_head


def test_metrics_endpoint_is_loopback_prometheus(head: RayHead) -> None:
    samples = scrape(head.metrics_url)
    assert any(name.startswith("ray_") for name in samples)  # Ray's own metrics


GAUGE_JOB = """
import time, ray
from ray.util.metrics import Gauge

ray.init()

@ray.remote(num_cpus=0)
class Rank0:
    def __init__(self):
        self.g = {{k: Gauge("sparse_transformer_" + k, tag_keys=("run",)) for k in {keys!r}}}
    def report(self, step):
        v = dict(loss_bits=8.0 / step, learning_rate=1e-3, loss_scale=65536.0, skipped_steps=2,
                 grad_norm=0.5, tokens_per_second=1234.5, samples_per_second=1.2,
                 data_wait_fraction=0.05, peak_memory_bytes=2.0e8, step=step)
        for k, g in self.g.items():
            g.set(v[k], tags={{"run": "{run}"}})

a = Rank0.remote()
for step in range(1, 121):
    ray.get(a.report.remote(step))
    print("step", step, flush=True)
    time.sleep(0.5)
"""


def test_gauges_set_in_a_job_are_scraped_from_the_endpoint(
    head: RayHead, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    run = "gauge-probe"
    script = GAUGE_JOB.format(keys=TRAINING_METRICS, run=run)
    job_client, job_id, _, _ = sub.submit_job([sys.executable, "-c", script], address=head.address)
    try:
        deadline = time.monotonic() + 90
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            samples = scrape(head.metrics_url)
            if all(
                any(lb.get("run") == run for lb, _ in samples.get(prometheus_name(k), []))
                for k in TRAINING_METRICS
            ):
                values = {k: latest(samples, k, run) for k in TRAINING_METRICS}
                if values["step"] >= 2:
                    break
            time.sleep(1)
        assert values, "the gauges never reached the metrics endpoint"
        check_sane(values)
        assert values["loss_bits"] == pytest.approx(8.0 / values["step"], rel=0.5)
        assert values["skipped_steps"] == 2 and values["loss_scale"] == 65536
    finally:
        job_client.stop_job(job_id)
        reset_ray_token_cache()  # later ray.init() calls in this process must not reuse it
