"""GPU acceptance check: the GPU path end to end in one command, one line per check.

    python -m sparse_transformer.benchmarks.gpu_check --json benchmarks/results/gpu_check.json

On one CUDA GPU it prints ``PASS``, ``FAIL`` or ``INFO`` and a name and detail per
check, then ``N passed, M failed``; it exits 0 only when every check passed (its work
dir of runs and data is then removed; after a failure, or with ``--keep-work``, it is
kept and named). One local
Ray instance (dashboard on, Prometheus endpoint on 127.0.0.1) carries every training
run, all through Ray Train + DeepSpeed in fp16 with dynamic loss scaling and block
recomputation, on the repository's own text. Sections (``--only`` picks some):

- ``kernels``: the Triton kernels against the fp32 reference by flash-attention's
  rule (``ops.kernel_check``), n = 12,288 and 65,536, fp16 and bf16, and the fused
  backward (dQ by atomics) at the fixed and the music layer; in this process, beside
  the training runs.
- ``enwik8``: ZeRO stage 1, alone on the GPU. The loss falls with no skipped step after
  the first few; a gradient overflow injected at one step halves the loss scale and is
  skipped and counted; the worker is killed mid-run and Ray restarts the group, which
  resumes from the last checkpoint; the gauges are scraped from Ray's Prometheus
  endpoint while it trains; ``eval`` and ``sample`` read its last checkpoint on the GPU.
- ``cifar10``: the 128-layer model with ZeRO stage 2: the loss falls, no skipped steps
  after the first few.
- ``determinism``: a killed-and-resumed run ends on the weights of an uninterrupted one,
  bitwise, under ``train.deterministic`` (``tiny``, fp16, ZeRO 1).
- ``sampling``: the decoding step's attention kernel (``ops.decode``) against fp64 in
  fp16, bf16 and fp32, and every fast decoding mode (static cache, CUDA graphs,
  compiled) samples the eager path's tokens for the same seed, without a host sync per
  step (``benchmarks.sampling.sampling_check``); in this process, after everything else (a
  CUDA-graph capture must not share the GPU with another thread's launches).
- ``default-resume`` (not run by default): the same comparison in the default mode,
  reported, with the attention launch configurations each run's autotuner chose.

``cifar10`` and ``determinism`` run side by side after ``enwik8``, half a GPU each.
``--cpu-smoke`` runs the same sections on the CPU (fp32, gloo, small models, the PyTorch
attention backend standing in for the kernels) to check this script's plumbing; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("kernels", "enwik8", "cifar10", "determinism", "sampling", "default-resume")
DEFAULT_SECTIONS = SECTIONS[:5]


# -- reporting ------------------------------------------------------------------------------
@dataclass
class Report:
    """The checks made so far; each prints its line as it is recorded."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def _line(self, status: str, name: str, detail: str) -> None:
        elapsed = time.monotonic() - self.start
        self.rows.append(
            {"status": status, "check": name, "detail": detail, "t_s": round(elapsed, 1)}
        )
        # the real stdout: eval and sample output is captured while the kernel thread runs
        print(f"{status:4} {name}: {detail}  [{elapsed:.0f} s]", file=sys.__stdout__, flush=True)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self._line("PASS" if ok else "FAIL", name, detail)
        return ok

    def info(self, name: str, detail: str) -> None:
        self._line("INFO", name, detail)

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        """A section: an exception fails it with its message and the others still run."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - reported as a failed check
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.check(name, False, f"{type(err).__name__}: {err}\n    " + "\n    ".join(tail))

    @property
    def passed(self) -> int:
        return sum(r["status"] == "PASS" for r in self.rows)

    @property
    def failed(self) -> int:
        return sum(r["status"] == "FAIL" for r in self.rows)


# -- the training runs ----------------------------------------------------------------------
@dataclass
class Plan:
    """One training run of a check: the config, its size and the faults injected."""

    config: str
    batch: int
    steps: int
    zero_stage: int
    checkpoint_every: int = 0
    kill_at: int = -1  # the worker dies before this step (0-based) in the first attempt
    overflow_at: int = -1  # this step's gradients overflow (0-based)
    model: list[str] = field(default_factory=list)  # model.* overrides
    extra: list[str] = field(default_factory=list)

    def hooks(self) -> list[Any]:
        """The faults this plan injects (rank 0 is killed; every rank overflows)."""
        from sparse_transformer.benchmarks.faults import KillAt, OverflowAt

        hooks: list[Any] = []
        if self.kill_at >= 0:
            hooks.append(KillAt(self.kill_at, rank=0))
        if self.overflow_at >= 0:
            hooks.append(OverflowAt(self.overflow_at))
        return hooks

    @property
    def resume_step(self) -> int:
        """The last checkpoint before the worker is killed: where the restart resumes."""
        return self.kill_at // self.checkpoint_every * self.checkpoint_every


@dataclass
class Run:
    """A finished run: what the driver got back and what rank 0 logged."""

    name: str
    summary: Any
    history: list[dict[str, Any]]
    local_dir: Path
    wall_s: float

    def steps(self) -> dict[int, dict[str, Any]]:
        """The last training record of each step (a resumed run logs some steps twice)."""
        return {m["step"]: m for m in self.history if "loss_bits" in m}


@dataclass
class Env:
    """What every run of this check shares."""

    work: Path
    gpu: bool
    metrics_url: str | None = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


def _overrides(env: Env, plan: Plan, url: str, name: str, deterministic: bool) -> list[str]:
    from sparse_transformer.benchmarks.train_gpu import bench_overrides

    base = bench_overrides(
        plan.config,
        plan.steps,
        plan.batch,
        url,
        env.work / "runs",
        "auto" if env.gpu else "torch",
        precision="fp16" if env.gpu else "fp32",
        use_gpu=env.gpu,
    )
    return [
        *base,
        *plan.model,
        f"run.name={name}",
        f"train.zero_stage={plan.zero_stage}",
        "train.log_every=1",
        f"train.checkpoint_every={plan.checkpoint_every or plan.steps}",
        "train.hysteresis=1",  # the first overflow already halves the scale
        f"run.max_failures={1 if plan.kill_at >= 0 else 0}",
        f"train.deterministic={'true' if deterministic else 'false'}",
        *plan.extra,
    ]


def run_name(label: str) -> str:
    """A fresh run name (each run of the check gets its own folder and metric tag)."""
    return f"check-{label}-{uuid.uuid4().hex[:6]}"


def train(env: Env, plan: Plan, name: str, *, deterministic: bool = False) -> Run:
    """Train ``plan`` through Ray Train + DeepSpeed (Ray already started) and read it back."""
    from sparse_transformer.benchmarks.train_gpu import read_history, repo_text_dataset
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import local_state_dir, run_training

    probe = load_config(plan.config, plan.model)
    url = repo_text_dataset(env.work, probe.seq_len)
    cfg = load_config(plan.config, _overrides(env, plan, url, name, deterministic))
    start = time.monotonic()
    summary = run_training(cfg, verbose=False, hooks=plan.hooks())
    return Run(name, summary, read_history(cfg), local_state_dir(cfg), time.monotonic() - start)


class Scraper(threading.Thread):
    """Reads the trainer's gauges of one run from a Prometheus endpoint every second."""

    def __init__(self, url: str, run: str) -> None:
        super().__init__(daemon=True)
        self.url, self.run_name = url, run
        self.values: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        from sparse_transformer.distributed.monitoring import run_values, scrape

        while not self.done.wait(1.0):
            with contextlib.suppress(OSError):
                self.values.update(run_values(scrape(self.url), self.run_name))

    def finish(self, wait_s: float) -> dict[str, float]:
        """Keep scraping up to ``wait_s`` more seconds for gauges not seen yet."""
        from sparse_transformer.distributed.monitoring import METRIC_NAMES

        deadline = time.monotonic() + wait_s
        while len(self.values) < len(METRIC_NAMES) and time.monotonic() < deadline:
            time.sleep(1.0)
        self.done.set()
        self.join(5)
        return dict(self.values)


# -- checks on a run ------------------------------------------------------------------------
def check_learns(report: Report, label: str, run: Run, min_drop: float) -> None:
    steps = run.steps()
    losses = [steps[s]["loss_bits"] for s in sorted(steps)]
    first, last = losses[0], sum(losses[-5:]) / len(losses[-5:])
    report.check(
        f"{label}: the loss falls",
        all(math.isfinite(x) for x in losses) and last < first - min_drop,
        f"{first:.3f} -> {last:.3f} bits/byte (mean of the last 5 of {len(losses)} steps; "
        f"needs a drop of {min_drop}), {run.wall_s:.0f} s",
    )


def natural_overflows(run: Run, injected: int) -> list[int]:
    """The steps (1-based) skipped other than the injected one."""
    steps = run.steps()
    out, before = [], 0
    for s in sorted(steps):
        now = steps[s]["skipped_steps"]
        if now > before and s != injected + 1:
            out.append(s)
        before = now
    return out


def check_no_late_skips(report: Report, label: str, run: Run, plan: Plan, first_few: int) -> None:
    skipped = natural_overflows(run, plan.overflow_at)
    steps = run.steps()
    report.check(
        f"{label}: no skipped steps after the first {first_few}",
        all(s <= first_few for s in skipped),
        f"natural skips at steps {skipped or 'none'}; loss "
        f"scale {steps[max(steps)]['loss_scale']:g} at the end",
    )


def check_overflow(report: Report, label: str, run: Run, plan: Plan, fp16: bool) -> None:
    steps = run.steps()
    s = plan.overflow_at + 1
    before, at = steps[s - 1], steps[s]
    halved = at["loss_scale"] == before["loss_scale"] / 2 if fp16 else at["loss_scale"] == 1
    counted = at["skipped_steps"] == before["skipped_steps"] + 1
    goes_on = max(steps) == plan.steps and math.isfinite(steps[max(steps)]["loss_bits"])
    report.check(
        f"{label}: an injected gradient overflow is skipped, counted and the scale halves",
        halved and counted and goes_on,
        f"step {s}: loss scale {before['loss_scale']:g} -> {at['loss_scale']:g}, skipped "
        f"{before['skipped_steps']} -> {at['skipped_steps']}; the run went on to step "
        f"{max(steps)}",
    )


def resumed_from(run: Run) -> int | None:
    """The step a restarted attempt resumed from: where the logged steps go back."""
    logged = [m["step"] for m in run.history if "loss_bits" in m]
    for prev, cur in zip(logged, logged[1:]):
        if cur <= prev:
            return cur - 1
    return None


def check_restart(report: Report, label: str, run: Run, plan: Plan) -> None:
    from sparse_transformer.benchmarks.faults import MARKER
    from sparse_transformer.distributed.checkpoint import verify_complete

    expected = plan.resume_step
    marker = run.local_dir / MARKER
    final = verify_complete(run.summary.checkpoint)["step"] if run.summary.checkpoint else None
    got = resumed_from(run)
    report.check(
        f"{label}: a worker killed mid-run is restarted by Ray and resumes from its checkpoint",
        marker.exists() and got == expected and final == plan.steps,
        f"killed before step {plan.kill_at + 1} (fault marker "
        f"{'written' if marker.exists() else 'missing'}), resumed from step {got} (last "
        f"checkpoint: {expected}), final checkpoint at step {final}",
    )


def check_prometheus(report: Report, label: str, values: dict[str, float], env: Env) -> None:
    from sparse_transformer.distributed.monitoring import implausible

    problems = implausible(values, on_gpu=env.gpu)
    shown = ", ".join(
        f"{k}={values[k]:.4g}" for k in ("step", "loss_bits", "loss_scale") if k in values
    )
    report.check(
        f"{label}: training gauges scraped from Ray's Prometheus endpoint",
        not problems,
        f"{len(values)} gauges at {env.metrics_url} ({shown})"
        + (f"; implausible: {problems}" if problems else ""),
    )


def _cli(argv: list[str]) -> str:
    """What ``sparse-transformer ARGV`` prints (run in this process)."""
    from sparse_transformer.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"sparse-transformer {' '.join(argv)} exited {code}")
    return out.getvalue()


def check_eval_and_sample(report: Report, label: str, run: Run, env: Env) -> None:
    ckpt = run.summary.checkpoint
    start = time.monotonic()
    printed = _cli(["eval", "--checkpoint", ckpt, "--batches", "2", "--batch-size", "2",
                    "--device", env.device])  # fmt: skip
    result = json.loads([x for x in printed.splitlines() if x.startswith("{")][-1])
    report.check(
        f"{label}: eval reads the last checkpoint on {env.device}",
        0 < result["loss_bits"] < 8.5 and result["step"] == max(run.steps()),
        f"step {result['step']}: {result['loss_bits']:.4f} bits/byte over {result['tokens']} "
        f"tokens, {time.monotonic() - start:.1f} s",
    )
    start = time.monotonic()
    text = _cli(["sample", "--checkpoint", ckpt, "--length", "32", "--device", env.device])
    report.check(
        f"{label}: sample reads the last checkpoint on {env.device}",
        text.startswith("The ") and len(text.encode(errors="replace")) >= 8,
        f"{text[:60]!r}, {time.monotonic() - start:.1f} s",
    )


# -- sections -------------------------------------------------------------------------------
def section_kernels(report: Report, env: Env) -> None:
    import torch

    if env.gpu:  # enwik8's layer, a permuted (strided A2) layer, music-65k's layer
        grid = [
            ("fixed", "merged", 0, 12288, 64),
            ("strided", "interleaved", 1, 12288, 64),
            ("strided", "multihead", 0, 65536, 64),
        ]
        backend = "triton"
    else:  # the harness itself, with the PyTorch backend standing in
        grid = [("fixed", "merged", 0, 1000, 32), ("strided", "interleaved", 1, 1000, 32)]
        backend = "torch"
    dtypes = (torch.float16, torch.bfloat16)
    cases = [(case, dtype, "two-pass") for case in grid for dtype in dtypes]
    if env.gpu:  # the fused backward (dQ by atomics) on the fixed and the music layer
        cases += [(grid[0], torch.float16, "fused"), (grid[2], torch.float16, "fused")]
    for (kind, mode, layer, n, d), dtype, backward in cases:
        start = time.monotonic()
        with report.guard(f"kernels: {kind}/{mode}/layer {layer} n={n} d={d} {dtype}"):
            case = (kind, mode, layer, n, d, dtype)
            result = _check_backward(backward, *case, backend=backend, env=env)
            took = time.monotonic() - start
            which = f", {backward} backward" if backend == "triton" else ""
            detail = f"{result.describe()}{which}, {took:.1f} s"
            report.check("kernels", result.ok, detail)
    if env.gpu:  # the op's cached launches: inputs that Triton specialises differently
        from sparse_transformer.ops.kernel_check import check_launches

        start = time.monotonic()
        with report.guard("kernels: cached launches"):
            result = check_launches()
            took = time.monotonic() - start
            report.check("kernels", result.ok, f"{result.describe()}, {took:.1f} s")
        torch.cuda.empty_cache()  # the training runs' workers share this GPU


def _check_backward(backward: str, *case, backend: str, env: Env):
    from sparse_transformer.ops import triton_attention
    from sparse_transformer.ops.kernel_check import check_kernel

    before, triton_attention.BACKWARD = triton_attention.BACKWARD, backward
    try:
        return check_kernel(*case, backend=backend, device=env.device)
    finally:
        triton_attention.BACKWARD = before


def section_sampling(report: Report, env: Env) -> None:
    import torch

    from sparse_transformer.benchmarks.sampling import sampling_check
    from sparse_transformer.ops import decode

    start = time.monotonic()
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if env.gpu else (torch.float32,)
    ok, message = decode.check(env.device, dtypes)
    took = time.monotonic() - start
    report.check("sampling: decode attention against fp64", ok, f"{message}, {took:.0f} s")
    start = time.monotonic()
    ok, message = sampling_check(env.device)
    took = time.monotonic() - start
    report.check("sampling: fast decoding gives the eager tokens", ok, f"{message}, {took:.0f} s")


def section_enwik8(report: Report, env: Env, plan: Plan, label: str) -> None:
    name = run_name(label)
    scraper = Scraper(env.metrics_url, name) if env.metrics_url else None
    if scraper is not None:
        scraper.start()
    run = train(env, plan, name)
    check_learns(report, label, run, min_drop=0.5)
    check_no_late_skips(report, label, run, plan, first_few=10)
    check_overflow(report, label, run, plan, fp16=env.gpu)
    check_restart(report, label, run, plan)
    if scraper is None:
        report.check(f"{label}: training gauges scraped", False, "no Prometheus endpoint")
    else:
        check_prometheus(report, label, scraper.finish(wait_s=20), env)
    check_eval_and_sample(report, label, run, env)


def section_cifar10(report: Report, env: Env, plan: Plan, label: str) -> None:
    run = train(env, plan, run_name(label))
    check_learns(report, label, run, min_drop=0.5)
    check_no_late_skips(report, label, run, plan, first_few=10)


def _weights(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's consolidated weights and, with ZeRO, its fp32 master weights."""
    from sparse_transformer.distributed.checkpoint import (
        consolidated_state_dict,
        fp32_master_weights,
        verify_complete,
    )

    out = dict(consolidated_state_dict(checkpoint))
    if verify_complete(checkpoint).get("zero_stage", 0) >= 1:
        out.update({f"fp32 master {k}": v for k, v in fp32_master_weights(checkpoint).items()})
    return out


def compare_weights(a: str, b: str) -> tuple[list[str], float, int]:
    """(names of the tensors that differ, largest absolute difference, tensors compared)."""
    wa, wb = _weights(a), _weights(b)
    if wa.keys() != wb.keys():
        return sorted(wa.keys() ^ wb.keys()), math.inf, len(wa)
    differ = [k for k in wa if not wa[k].equal(wb[k])]
    worst = max(((wa[k].float() - wb[k].float()).abs().max().item() for k in differ), default=0.0)
    return differ, worst, len(wa)


def flagged_ops(env: Env) -> list[str]:
    """The ops PyTorch flags as nondeterministic in one fp16 training step of ``tiny``."""
    import warnings

    import torch

    from sparse_transformer.model import SparseTransformer, load_model_config

    model = SparseTransformer(load_model_config("tiny").replace(recompute="block"))
    model = model.to(env.device, torch.float16 if env.gpu else torch.float32)
    idx = torch.randint(0, 256, (2, model.config.n_ctx), device=env.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, loss = model(idx, idx)
            loss.backward()
    finally:
        torch.use_deterministic_algorithms(False)
    marker = " does not have a deterministic implementation"
    return sorted({str(w.message).split(marker)[0] for w in caught if marker in str(w.message)})


def compare_resumed(
    report: Report, env: Env, plan: Plan, label: str, *, deterministic: bool
) -> tuple[bool, str]:
    """Train ``plan`` uninterrupted and killed-and-resumed; (bitwise equal, what was seen)."""
    import dataclasses

    whole = dataclasses.replace(plan, kill_at=-1)
    a = train(env, whole, run_name(f"{label}-whole"), deterministic=deterministic)
    b = train(env, plan, run_name(f"{label}-resumed"), deterministic=deterministic)
    differ, worst, n = compare_weights(a.summary.checkpoint, b.summary.checkpoint)
    expected = plan.resume_step
    same = not differ and resumed_from(b) == expected
    launch_a = a.steps()[plan.steps].get("attention_launch_configs")
    launch_b = b.steps()[plan.steps].get("attention_launch_configs")
    detail = (
        f"killed before step {plan.kill_at + 1}, resumed from step {resumed_from(b)} (last "
        f"checkpoint: {expected}): "
        + ("bitwise equal weights" if same else f"{len(differ)} of {n} tensors differ")
        + (f" (largest |difference| {worst:.3g}, e.g. {differ[0]})" if differ else "")
        + f"; attention launch configs {'the same' if launch_a == launch_b else 'differ'}"
    )
    if launch_a != launch_b:
        report.info(f"{label}: launch configs", f"uninterrupted {launch_a}; resumed {launch_b}")
    return same, detail


def section_determinism(report: Report, env: Env, plan: Plan, label: str) -> None:
    same, detail = compare_resumed(report, env, plan, label, deterministic=True)
    report.check(f"{label}: train.deterministic: resumed == uninterrupted, bitwise", same, detail)


def section_default_resume(report: Report, env: Env, plan: Plan, label: str) -> None:
    """Not a check: in default mode Triton's autotuner times its candidates in each process."""
    _, detail = compare_resumed(report, env, plan, label, deterministic=False)
    report.info(f"{label}: default mode: resumed vs uninterrupted", detail)


def report_flagged_ops(report: Report, env: Env) -> None:
    flagged = flagged_ops(env)
    report.info(
        "determinism: ops PyTorch flags as nondeterministic in a training step",
        ", ".join(flagged) if flagged else "none",
    )


# -- main -------------------------------------------------------------------------------------
RUNNERS = {
    "enwik8": section_enwik8,
    "cifar10": section_cifar10,
    "determinism": section_determinism,
    "default-resume": section_default_resume,
}


def plans(gpu: bool) -> dict[str, Plan]:
    """The runs of each section on a GPU, or their small CPU stand-ins (``--cpu-smoke``)."""
    if gpu:
        # A gentle peak learning rate: with 13 warm-up steps and the configs' 3.5e-4 at
        # batch 4, enwik8 spiked at step 28 (5.0 -> 7.7, then 10.1 bits) through four
        # fp16 overflows before it recovered.
        lr = ["train.lr=1.5e-4"]
        half = ["scaling.gpus_per_worker=0.5"]  # the sections after enwik8 share the GPU
        tiny = Plan(
            "tiny",
            batch=8,
            steps=8,
            zero_stage=1,
            checkpoint_every=4,
            kill_at=6,
            model=["model.recompute=block"],
            extra=["train.sample_length=16", *half],
        )
        return {
            "enwik8": Plan("enwik8", batch=4, steps=40, zero_stage=1, checkpoint_every=20,
                           kill_at=23, overflow_at=30, extra=lr),
            "cifar10": Plan("cifar10", batch=4, steps=30, zero_stage=2, extra=[*lr, *half]),
            "determinism": tiny,
            "default-resume": tiny,
        }  # fmt: skip
    small = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "train.lr=4e-3"]
    tiny = Plan(
        "tiny",
        batch=4,
        steps=6,
        zero_stage=1,
        checkpoint_every=3,
        kill_at=4,
        model=[*small, "model.recompute=block"],
        extra=["train.sample_length=8", "train.torch_threads=1"],
    )
    return {
        "enwik8": Plan("tiny", batch=4, steps=10, zero_stage=1, checkpoint_every=4, kill_at=6,
                       overflow_at=2, model=small),
        "cifar10": Plan("tiny", batch=4, steps=8, zero_stage=2, model=small,
                        extra=["train.torch_threads=1"]),
        "determinism": tiny,
        "default-resume": tiny,
    }  # fmt: skip


def start_ray(report: Report, env: Env) -> None:
    """One local Ray instance for every run, with the dashboard and a metrics endpoint."""
    from sparse_transformer.distributed.config import ConfigError, load_config
    from sparse_transformer.distributed.trainer import dashboard_dependency_error, init_ray

    try:
        instance = init_ray(load_config("tiny", ["run.dashboard=true"]))
    except ConfigError as err:
        report.check("ray: the dashboard starts", False, str(err))
        instance = init_ray(load_config("tiny", ["run.dashboard=false"]))
    else:
        report.check(
            "ray: the dashboard starts",
            instance.dashboard_url is not None,
            f"{instance.dashboard_url}; dashboard packages: {dashboard_dependency_error() or 'ok'}",
        )
    env.metrics_url = instance.metrics_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"sections: {', '.join(SECTIONS)} (default: all but default-resume)",
    )
    p.add_argument("--json", default="", help="write the checks as JSON here")
    p.add_argument("--cpu-smoke", action="store_true", help="the plumbing on the CPU (fp32)")
    p.add_argument(
        "--keep-work", action="store_true", help="keep the work dir (runs, data) after a pass"
    )
    args = p.parse_args(argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; have {', '.join(SECTIONS)}")

    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: needs a CUDA GPU (or --cpu-smoke)", file=sys.stderr)
        return 2
    env = Env(work=Path(tempfile.mkdtemp(prefix="st-gpu-check-")), gpu=not args.cpu_smoke)
    report = Report()
    device = torch.cuda.get_device_name(0) if env.gpu else "cpu (smoke run: plumbing only)"
    report.info("device", f"{device}; torch {torch.__version__}; work dir {env.work}")

    todo = plans(env.gpu)

    def run(name: str) -> None:
        with report.guard(f"{name}: the section ran"):
            if name == "kernels":
                section_kernels(report, env)
            elif name == "sampling":
                section_sampling(report, env)
            else:
                RUNNERS[name](report, env, todo[name], name)

    def in_thread(name: str) -> threading.Thread:
        thread = threading.Thread(target=run, args=(name,), daemon=True)
        thread.start()
        return thread

    # Checking is not timing: the kernel checks run in this process beside the training
    # runs, and after enwik8 (alone: the killed worker, the gauges) the other runs share
    # the GPU, half each, so that the whole check stays within 8 minutes on an H200.
    threads = [in_thread("kernels")] if "kernels" in sections else []
    runs = [s for s in sections if s not in ("kernels", "sampling")]
    if runs:
        import ray

        start_ray(report, env)
        try:
            if "enwik8" in runs:
                run("enwik8")
            for thread in [in_thread(n) for n in runs if n != "enwik8"]:
                thread.join()
        finally:
            ray.shutdown()
    for thread in threads:
        thread.join()
    if "sampling" in sections:
        run("sampling")
    if "determinism" in sections or "default-resume" in sections:
        report_flagged_ops(report, env)  # after the kernel checks: it flips a global mode
    summary = f"{report.passed} passed, {report.failed} failed"
    print(f"{summary} in {time.monotonic() - report.start:.0f} s", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"device": device, "summary": summary, "checks": report.rows}, indent=1)
        )
    ok = report.failed == 0 and report.passed > 0
    if ok and not args.keep_work:  # tens of MB of runs and data a time
        shutil.rmtree(env.work, ignore_errors=True)
    else:
        print(f"work dir kept: {env.work}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
