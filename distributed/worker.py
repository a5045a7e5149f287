"""The per-worker training loop that Ray Train runs on every rank: :class:`Trainer`.

Each worker: builds the model on the meta device and initialises it on its own
device (same seed on every rank), wraps it with ``deepspeed.initialize`` (config
from :func:`sparse_transformer.distributed.config.deepspeed_config`), streams its
share of the data with :class:`sparse_transformer.data.StreamingDataset`, and
every ``train.checkpoint_every`` steps saves a checkpoint (DeepSpeed's
``save_checkpoint`` plus the data position, the RNG state and the step of each
rank, the redacted config, a consolidated state dict and one commit marker per
rank written last) that it reports with ``ray.train.report``. On start it restores
the newest complete checkpoint in the run folder (at least as new as
``ray.train.get_checkpoint()``), so a restarted group (or a relaunched job)
continues exactly where it stopped. When the driver asks the run to stop (SIGINT or
SIGTERM, :mod:`sparse_transformer.distributed.stopping`), every rank stops after the
same step and saves a checkpoint there.

Metrics go to ``ray.train.report`` (every ``train.log_every`` steps), to
``ray.util.metrics`` gauges (rank 0, tag ``run``) and to TensorBoard events in
the run folder; rank 0 writes a progress line that Ray forwards to the driver.
Losses are summed on the training device and read once per log window; every
collective goes through :mod:`sparse_transformer.distributed.collectives`, which
hands the backend (gloo or NCCL) a tensor on a device it takes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import resource
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparse_transformer.distributed import checkpoint as ckpt_io
from sparse_transformer.distributed import collectives, evaluation
from sparse_transformer.distributed import deepspeed_adapter as ds
from sparse_transformer.distributed.config import (
    Config,
    deepspeed_config,
    dump_yaml,
    resolve_compile,
    resolve_precision,
)
from sparse_transformer.distributed.hooks import RunInfo, TrainHooks
from sparse_transformer.distributed.monitoring import MetricsExporter
from sparse_transformer.distributed.stopping import StopWatcher


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; see the module docstring."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    # the config, storage options and hooks travel in the object store, kept out of the
    # dashboard
    loop_config = {**loop_config, **ray.get(loop_config["private"])}
    for key, value in loop_config.get("worker_env", {}).items():
        os.environ.setdefault(key, value)  # before DeepSpeed looks for its op cache
    try:
        Trainer(loop_config).run()
    except Exception as err:
        from sparse_transformer.distributed.failures import WorkerRankError

        # Ray shows this on the driver; name the rank and keep the worker's traceback.
        raise WorkerRankError.of(rank, err, traceback.format_exc()) from err


def _console() -> logging.Logger:
    """The logger of rank 0's progress lines: one plain stdout handler, not propagated.

    Ray Train patches ``print`` in its workers to log through the root logger and, as
    Ray wraps the worker's stdout, also to print the line itself: every printed line
    reached the driver twice. This logger writes each line once, to the stdout that Ray
    forwards to the driver.
    """
    log = logging.getLogger("sparse_transformer.train")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _progress(step: int, total: int, m: dict[str, Any]) -> str:
    width = 24
    done = int(width * step / max(total, 1))
    bar = "#" * done + "." * (width - done)
    return (
        f"[train] step {step:>6}/{total} [{bar}] loss {m['loss_bits']:.3f} bits/byte  "
        f"lr {m['learning_rate']:.2e}  scale {m['loss_scale']:g}  skipped {m['skipped_steps']}  "
        f"{m['tokens_per_second']:,.0f} tok/s  data wait {100 * m['data_wait_fraction']:.0f}%"
    )


def _device(cfg: Config, use_gpu: bool) -> torch.device:
    """This rank's device, after the process-wide settings the config asks for."""
    if cfg.train.deterministic:
        # before the first matmul creates cuBLAS's workspace; the Triton attention kernels
        # also launch at fixed configurations instead of timing-based autotuned ones
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    if torch.cuda.is_available() and use_gpu:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    from sparse_transformer.model import SparseTransformer

    with torch.device("meta"):
        model = SparseTransformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)  # identical on every rank
    return model


@dataclass
class _Window:
    """The open log window. The losses, summed over samples (so any world size reports
    the same), stay on the device until the window is read."""

    loss: torch.Tensor
    samples: int = 0
    time: float = 0.0
    wait: float = 0.0
    steps: int = 0

    def over_ranks(self) -> list[float]:
        """[sum of the losses over samples, samples] of all ranks: one read."""
        window = torch.stack([self.loss, self.loss.new_tensor(self.samples)])
        return collectives.all_reduce(window).tolist()

    def reset(self) -> None:
        self.loss.zero_()
        self.samples, self.time, self.wait, self.steps = 0, 0.0, 0.0, 0


@dataclass
class _Counters:
    """What the loop counts beside the engine, saved in every rank's checkpoint state."""

    step: int = 0
    skipped_nonfinite: int = 0  # fp32 steps dropped for non-finite gradients
    grad_norm: float = float("nan")  # of the last step that computed it


class Trainer:
    """One rank's run. ``__init__`` builds the engine, the datasets and restores the
    newest checkpoint; :meth:`run` steps to the end. The pieces: :meth:`train_step`,
    :meth:`evaluate`, :meth:`save`, :meth:`restore`."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import deepspeed  # noqa: F401 - first: it picks its accelerator when imported
        import ray.train

        self.cfg = cfg = Config.from_dict(loop_config["config"])
        self.loop_config = loop_config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.console = _console()
        self.device = _device(cfg, loop_config.get("use_gpu", False))
        self.on_gpu = self.device.type == "cuda"
        self.precision = resolve_precision(cfg, self.on_gpu)
        self.compile_mode = resolve_compile(cfg, self.on_gpu)
        self.hooks: Sequence[TrainHooks] = loop_config.get("hooks", ())
        local_dir = Path(loop_config["local_dir"])
        self.info = RunInfo(self.rank, self.world, local_dir, loop_config.get("driver_pid"))
        self.checkpointer = ckpt_io.Checkpointer(
            loop_config["run_dir"],
            loop_config["storage_options"],
            rank=self.rank,
            world_size=self.world,
            local_rank=ctx.get_local_rank(),
            zero_stage=cfg.train.zero_stage,
            log=self._log0,
        )
        self.count = _Counters()
        self.window = _Window(torch.zeros((), dtype=torch.float64, device=self.device))
        registered = ray.train.get_checkpoint()
        resumed = self._build_engine(Path(registered.path).name if registered else None)
        self.train_ds = self._dataset(
            "train", global_batch_size=cfg.data.global_batch_size, seed=cfg.data.seed,
            shuffle_window=cfg.data.shuffle_window,
        )  # fmt: skip
        if resumed is not None:
            self.restore(*resumed)
        self.val_ds = self._dataset(
            "validation",
            global_batch_size=cfg.data.eval_batch_size or cfg.data.global_batch_size,
            shuffle=False,
        )
        self.exporter = None
        self.history = local_dir / "metrics.jsonl"
        if self.rank == 0:
            local_dir.mkdir(parents=True, exist_ok=True)
            self.exporter = MetricsExporter(cfg.run.name, loop_config.get("tb_dir"))
        self.digests = None
        if cfg.train.record_batches:
            self.digests = local_dir / "batches" / f"rank{self.rank}.jsonl"
            self.digests.parent.mkdir(parents=True, exist_ok=True)
        self.stopper = StopWatcher(loop_config.get("stop_flag"), self.world, self.device)

    # -- set-up -------------------------------------------------------------------------------

    def _log0(self, line: str) -> None:
        if self.rank == 0:
            self.console.info(line)

    def _build_engine(self, registered: str | None) -> tuple[dict[str, Any], str] | None:
        """The model (compiled per ``model.compile``) and its DeepSpeed engine, restored
        from the newest intact checkpoint; returns (this rank's saved state, the
        checkpoint's URL), None on a fresh start. ``registered``: the checkpoint Ray
        Train handed this worker."""
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            stack.enter_context(ckpt_io.weights_only_loads())  # DeepSpeed's loads included
            found = self.checkpointer.find(stack, registered)
            universal = self.checkpointer.needs_universal(found)
            model = _build_model(cfg, self.device)
            if self.compile_mode is not None:  # traced on the first step, which reports its time
                model.compile_blocks(mode=self.compile_mode)
            ds_config = deepspeed_config(cfg, self.world, on_gpu=self.on_gpu)
            if universal:
                ds_config["checkpoint"] = {"load_universal": True}
            self.engine, self.scheduler = ds.initialize(model, ds_config)
            torch.manual_seed(cfg.train.seed + 1000 * (self.rank + 1))  # this rank's dropout
            if found is None:
                return None
            return self.checkpointer.restore(stack, self.engine, found), found.url

    def _dataset(self, split: str, **kwargs: Any) -> Any:
        """This rank's share of ``split``, whole batches of the global batch."""
        from sparse_transformer.data import StreamingDataset

        d, url = self.cfg.data, self.loop_config["data_url"]
        ds_ = StreamingDataset(
            url, split=split, rank=self.rank, world_size=self.world,
            storage_options=d.storage_options or None, batched=True,
            num_threads=d.num_threads, prefetch=d.prefetch, **kwargs,
        )  # fmt: skip
        if ds_.seq_len != self.cfg.seq_len:
            raise ValueError(
                f"data.seq_len: the dataset at {url} has samples of {ds_.seq_len} tokens, "
                f"the config asks for {self.cfg.seq_len}"
            )
        return ds_

    def restore(self, state: dict[str, Any], url: str) -> None:
        """Continue from a checkpoint's rank state: the step, the data position, the
        RNG streams and (rank 0) the open log window."""
        step = self.count.step = int(state["step"])
        self.count.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        self.train_ds.load_state_dict(state["data"])
        if state.get("world_size") == self.world and state.get("rank") == self.rank:
            torch.set_rng_state(state["rng_cpu"])
            if self.on_gpu and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        else:  # elastic restart with another world size: a fresh, deterministic stream
            torch.manual_seed(self.cfg.train.seed + 1000 * (self.rank + 1) + step)
        if self.rank == 0 and "loss_window" in state:
            # a resumed run reports the loss an uninterrupted one does, on any world size
            self.window.loss += state["loss_window"][0]
            self.window.samples = int(state["loss_window"][1])
        self._log0(f"[train] resumed from step {step} ({url})")

    # -- the step -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compile_mode == "reduce-overhead":  # CUDA graphs: each forward is a new step
            torch.compiler.cudagraph_mark_step_begin()
        return self.engine(x, y)

    def train_step(self, batch: torch.Tensor, will_log: bool) -> bool:
        """One optimizer step on this rank's ``batch`` (on the device), in ``grad_accum``
        micro-batches; True when it was skipped for non-finite fp32 gradients (DeepSpeed
        skips and counts fp16 overflows; fp32 at ZeRO 0 gets the same guard here)."""
        t, step = self.cfg.train, self.count.step
        micro = self.cfg.micro_batch_size(self.world)
        targets = evaluation.next_token_targets(batch)
        guard = self.precision == "fp32" and t.zero_stage == 0
        skip = False
        for i in range(t.grad_accum):
            x, y = batch[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]
            _, loss = self.forward(x, y)
            self.window.loss += loss.detach() * len(x)  # a sum over samples: any world size
            for hook in self.hooks:
                loss = hook.loss(self.info, step, loss)
            ds.backward(self.engine, loss)
            if i + 1 == t.grad_accum and (guard or will_log):
                # the all-reduced gradients: the same on every rank
                self.count.grad_norm = ds.grad_norm(self.engine)
                skip = guard and not math.isfinite(self.count.grad_norm)
            if skip:
                ds.step_without_update(self.engine)
            else:
                self.engine.step()
        self.window.samples += t.grad_accum * micro
        return skip

    def _batches(self) -> Iterator[torch.Tensor]:
        """This rank's training batches, epoch after epoch (pinned on a GPU).

        A DataLoader draws its base seed from the global RNG when an iterator starts;
        the dropout stream is kept independent of when loaders (re)start, so a resumed
        run consumes exactly the random numbers the uninterrupted one does.
        """
        it = iter(self.train_ds.loader(pin_memory=self.on_gpu))
        while True:
            rng = torch.get_rng_state()
            try:
                batch = next(it)
            except StopIteration:  # epoch over: the dataset has moved on to the next one
                it = iter(self.train_ds.loader(pin_memory=self.on_gpu))
                batch = next(it)
            finally:
                torch.set_rng_state(rng)
            yield batch

    def _record(self, batch: torch.Tensor) -> None:
        if self.digests is not None:
            digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
            line = {"step": self.count.step, "rank": self.rank, "batch": digest}
            with open(self.digests, "a") as f:
                f.write(json.dumps(line) + "\n")

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Step to ``train.steps`` (or a stop request), logging, evaluating and saving."""
        t = self.cfg.train
        start = self.count.step
        batches = self._batches()
        self.engine.train()
        try:
            while self.count.step < t.steps:
                for hook in self.hooks:
                    hook.before_step(self.info, self.count.step)
                t0 = time.perf_counter()
                batch = next(batches)
                self.window.wait += time.perf_counter() - t0
                self._record(batch)
                # pinned on a GPU: the copy is queued behind the running step, the host goes on
                batch = batch.to(self.device, non_blocking=True)
                will_log = (
                    self.count.step + 1
                ) % t.log_every == 0 or self.count.step + 1 == t.steps
                if self.train_step(batch, will_log):
                    self.count.skipped_nonfinite += 1
                    self._log0(
                        f"[train] step {self.count.step + 1}: non-finite gradients, step skipped"
                    )
                self.count.step += 1
                if self.count.step == start + 1:
                    self._report_first_step(t0)
                self.window.steps += 1
                stopping = self.count.step < t.steps and self.stopper.should_stop()  # all ranks
                if will_log:
                    metrics: dict[str, Any] | None = self._window_metrics(t0)
                else:
                    metrics = None
                    self.window.time += time.perf_counter() - t0
                if not self._after_step(metrics, stopping):
                    break
        finally:
            batches.close()
            if self.exporter is not None:
                self.exporter.close()

    def _after_step(self, metrics: dict[str, Any] | None, stopping: bool) -> bool:
        """Evaluate, publish, sample, save and report as the step asks; False to stop."""
        t, step = self.cfg.train, self.count.step
        if step == t.steps or (t.eval_every and step % t.eval_every == 0):
            metrics = metrics or {"step": step}
            metrics["val_loss_bits"] = self.evaluate()
        if metrics is not None:
            self._publish(metrics)
        if step == t.steps:
            metrics = self._end_of_run(metrics)
        if stopping:
            metrics = {**(metrics or {"step": step}), "stopped": self.stopper.reason}
            self._log0(f"[train] step {step}: stopping ({self.stopper.reason}), checkpointing")
        if step == t.steps or stopping or (t.checkpoint_every and step % t.checkpoint_every == 0):
            self.save(metrics or {"step": step})
        elif metrics is not None:
            import ray.train

            ray.train.report(metrics)
        return not stopping

    def _window_metrics(self, t0: float) -> dict[str, Any]:
        """The metrics of the log window that ends with this step; the window resets."""
        nats, count = self.window.over_ranks()
        w, d = self.window, self.cfg.data
        w.time += time.perf_counter() - t0  # the host's time, waiting for the device's queue
        elapsed = max(w.time, 1e-9)
        metrics = {
            "step": self.count.step,
            "loss_bits": evaluation.bits_per_token([nats, count]),
            "learning_rate": (
                float(self.scheduler.get_last_lr()[0]) if self.scheduler else self.cfg.train.lr
            ),
            "loss_scale": ds.loss_scale(self.engine, self.precision),
            "skipped_steps": ds.skipped_steps(self.engine) + self.count.skipped_nonfinite,
            "grad_norm": self.count.grad_norm,
            "tokens_per_second": w.steps * d.global_batch_size * self.cfg.seq_len / elapsed,
            "samples_per_second": w.steps * d.global_batch_size / elapsed,
            "data_wait_fraction": w.wait / elapsed,
            "peak_memory_bytes": _peak_memory(self.device),
        }
        w.reset()
        return metrics

    def _publish(self, metrics: dict[str, Any]) -> None:
        """Rank 0: gauges, TensorBoard, ``metrics.jsonl`` and the progress line."""
        if self.exporter is None:
            return
        self.exporter.export(self.count.step, metrics)
        with open(self.history, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if "loss_bits" in metrics:
            self.console.info(_progress(self.count.step, self.cfg.train.steps, metrics))
        if "val_loss_bits" in metrics:
            self.console.info(
                f"[train] step {self.count.step}: validation {metrics['val_loss_bits']:.4f} "
                "bits/byte"
            )

    def _end_of_run(self, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
        """The last step's extras: the attention launch configs and a sample (rank 0)."""
        t, step = self.cfg.train, self.count.step
        if self.rank == 0 and (launch := _attention_launch_configs()):
            metrics = {**(metrics or {"step": step}), "attention_launch_configs": launch}
        if t.sample_length > 0 and (self.rank == 0 or t.zero_stage == 3):
            # ZeRO-3 gathers parameters collectively in every forward: all ranks run the
            # same (seeded, hence identical) decoding in lockstep; rank 0 keeps the text.
            text = evaluation.sample_text(
                self.engine.module, t.sample_prompt, t.sample_length, seed=t.seed,
                device=self.device, top_p=0.9,
            )  # fmt: skip
            if self.rank == 0:
                metrics = {**(metrics or {"step": step}), "sample": text}
        return metrics

    def _report_first_step(self, t0: float) -> None:
        """Rank 0 logs the first step's time (one device sync): it compiles the blocks
        and tunes the attention kernels, so it is the compile time a run pays."""
        if self.rank != 0:
            return
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        compiled = self.compile_mode is not None
        what = "compiling the blocks and tuning the kernels" if compiled else "warm-up"
        self.console.info(f"[train] first step: {time.perf_counter() - t0:.1f} s ({what} included)")

    # -- evaluation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation bits per token over ``train.eval_batches`` batches of every rank
        (one host read); the training RNG does not move."""
        rng = torch.get_rng_state()
        self.engine.eval()
        try:
            self.val_ds.reset()
            batches = itertools.islice(self.val_ds.loader(), self.cfg.train.eval_batches or None)
            total = evaluation.loss_sums(self.forward, batches, self.device)
        finally:
            self.engine.train()
            torch.set_rng_state(rng)
        return evaluation.bits_per_token(collectives.all_reduce(total))

    def save(self, metrics: dict[str, Any]) -> None:
        """Checkpoint this step (collective: every rank calls it) and report it to Ray
        with ``metrics``. The open log window goes in too, so a resumed run reports the
        loss an uninterrupted one does."""
        import ray.train

        step = self.count.step
        rank_state = {
            "step": step,
            "rank": self.rank,
            "world_size": self.world,
            "data": self.train_ds.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.on_gpu else None,
            "skipped_nonfinite": self.count.skipped_nonfinite,
            "loss_window": self.window.over_ranks(),
        }
        with self.checkpointer.save(step, self.engine, rank_state, self._rank0_files) as d:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))

    def _rank0_files(self) -> dict[str, Any]:
        """What only rank 0 writes: meta.json, the redacted config, the fp32 model."""
        t = self.cfg.train
        model_state = None
        if t.zero_stage < 3:
            module = self.engine.module
            model_state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
        meta = ckpt_io.make_meta(
            step=self.count.step, world_size=self.world, zero_stage=t.zero_stage,
            precision=self.precision, model=self.cfg.model.to_dict(),
            data_url=self.loop_config["data_url"],
        )  # fmt: skip
        return {"meta": meta, "config_yaml": dump_yaml(self.cfg), "model_state": model_state}


def _attention_launch_configs() -> dict[str, list[str]] | None:
    """What Triton's autotuner chose for the attention kernels in this process (None when
    they never ran here): a run that resumes in another process may choose otherwise."""
    kernels = sys.modules.get("sparse_transformer.ops.triton_attention")
    return kernels.autotuned_configs() if kernels is not None else None
