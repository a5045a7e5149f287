"""The trainer's metrics as Prometheus sees them, and reading them back.

Rank 0 sets one ``ray.util.metrics`` gauge per entry of :data:`METRIC_NAMES` and
:data:`EVAL_METRIC_NAMES` (tag ``run``); Ray's metrics agent serves them on the node's
Prometheus endpoint as ``ray_sparse_transformer_<name>``. :func:`scrape` reads such an endpoint with
Prometheus' own text parser (the tests and ``benchmarks/gpu_check.py`` use it).
"""

from __future__ import annotations

import math
import os
import urllib.request
from typing import Any

METRIC_NAMES = {
    "loss_bits": "Training loss, bits per dim/byte (mean over ranks since the last report)",
    "learning_rate": "Learning rate of the last step",
    "loss_scale": "Dynamic fp16 loss scale (1 without fp16)",
    "skipped_steps": "Optimizer steps skipped: fp16 overflow or non-finite gradients (total)",
    "grad_norm": "Global gradient norm before clipping",
    "tokens_per_second": "Training tokens per second over all workers",
    "samples_per_second": "Training samples per second over all workers",
    "data_wait_fraction": "Fraction of step time spent waiting for data (rank 0)",
    "peak_memory_bytes": "Peak device memory of rank 0 (CUDA allocator, else process RSS)",
    "step": "Optimizer steps done",
}

#: Set after each evaluation, beside the training gauges.
EVAL_METRIC_NAMES = {
    "val_loss_bits": "Validation loss, bits per dim/byte, at the last evaluation",
}

Samples = dict[str, list[tuple[dict[str, str], float]]]


def gauge_name(key: str) -> str:
    """The ``ray.util.metrics`` gauge of a metric."""
    return f"sparse_transformer_{key}"


def prometheus_name(key: str) -> str:
    """The series name of a metric on Ray's Prometheus endpoint."""
    return f"ray_{gauge_name(key)}"


class MetricsExporter:
    """Rank 0's Prometheus gauges (``ray.util.metrics``, tag ``run``) and TensorBoard
    writer (when ``tb_dir`` is given)."""

    def __init__(self, run: str, tb_dir: str | None) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {
            k: Gauge(gauge_name(k), description=d, tag_keys=("run",))
            for k, d in {**METRIC_NAMES, **EVAL_METRIC_NAMES}.items()
        }
        self.writer = None
        if tb_dir:
            from tensorboardX import SummaryWriter

            os.makedirs(tb_dir, exist_ok=True)
            self.writer = SummaryWriter(tb_dir)

    def export(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key in self.gauges and math.isfinite(value):
                self.gauges[key].set(float(value), tags=self.tags)
            if self.writer is not None:
                self.writer.add_scalar(f"train/{key}" if "val" not in key else key, value, step)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """``{series name: [(labels, value), ...]}`` from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def run_values(samples: Samples, run: str) -> dict[str, float]:
    """The latest value of each of the trainer's metrics of run ``run`` (those present)."""
    out = {}
    for key in METRIC_NAMES:
        values = [
            v for labels, v in samples.get(prometheus_name(key), []) if labels.get("run") == run
        ]
        if values:
            out[key] = values[-1]
    return out


def implausible(values: dict[str, float], *, on_gpu: bool = False) -> list[str]:
    """The metrics whose values no byte-level training run can have; empty when all fit.

    Every metric of :data:`METRIC_NAMES` must be present and finite; the loss is in
    (0, 16) bits (at most ~8 at the start); the loss scale is >= 1 on GPUs (fp16) and > 0
    elsewhere; counts are whole numbers.
    """
    missing = [k for k in METRIC_NAMES if k not in values]
    if missing:
        return [f"missing: {', '.join(missing)}"]
    bad = [f"{k}={v}" for k, v in values.items() if not math.isfinite(v)]
    if bad:
        return bad
    v = values
    rules = {
        "loss_bits": 0 < v["loss_bits"] < 16,
        "learning_rate": 0 < v["learning_rate"] < 1,
        "loss_scale": v["loss_scale"] >= 1 if on_gpu else v["loss_scale"] > 0,
        "skipped_steps": v["skipped_steps"] >= 0 and v["skipped_steps"] == int(v["skipped_steps"]),
        "grad_norm": v["grad_norm"] > 0,
        "tokens_per_second": v["tokens_per_second"] > 0,
        "samples_per_second": v["samples_per_second"] > 0,
        "data_wait_fraction": 0 <= v["data_wait_fraction"] <= 1,
        "peak_memory_bytes": v["peak_memory_bytes"] >= 0,
        "step": v["step"] >= 1 and v["step"] == int(v["step"]),
    }
    return [f"{k}={v[k]}" for k, ok in rules.items() if not ok]


__all__ = [
    "EVAL_METRIC_NAMES",
    "METRIC_NAMES",
    "MetricsExporter",
    "gauge_name",
    "implausible",
    "prometheus_name",
    "run_values",
    "scrape",
]
