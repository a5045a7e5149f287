"""The per-worker training loop that Ray Train runs on every rank.

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
import shutil
import sys
import tempfile
import time
import traceback
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
from sparse_transformer.distributed.monitoring import EVAL_METRIC_NAMES, METRIC_NAMES, gauge_name
from sparse_transformer.distributed.stopping import StopWatcher


class _Exporter:
    """Rank 0's Prometheus gauges (``ray.util.metrics``) and TensorBoard writer."""

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


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``; see the module docstring."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    # the config and storage options travel in the object store, kept out of the dashboard
    loop_config = {**loop_config, **ray.get(loop_config["private"])}
    for key, value in loop_config.get("worker_env", {}).items():
        os.environ.setdefault(key, value)  # before DeepSpeed looks for its op cache
    try:
        _train(loop_config)
    except Exception as err:
        from sparse_transformer.distributed.failures import WorkerRankError

        # Ray shows this on the driver; name the rank and keep the worker's traceback.
        raise WorkerRankError.of(rank, err, traceback.format_exc()) from err


def _universal_copy(stack: contextlib.ExitStack, cdir: Path, key: str, local_rank: int) -> Path:
    """DeepSpeed's universal form of checkpoint ``cdir``, converted once per node.

    Local rank 0 converts into a node-local folder named after the checkpoint; the other
    ranks of the node wait at a barrier and read it. The folder is removed on leaving
    ``stack`` (after every rank has loaded).
    """
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir(), f"st-universal-{name}")
    if local_rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        ckpt_io.to_universal(cdir, out)
    collectives.barrier()

    def cleanup() -> None:
        collectives.barrier()  # every rank has loaded
        if local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)

    stack.callback(cleanup)
    return out


def _open_checkpoint_to_resume(
    stack: contextlib.ExitStack,
    loop_config: dict[str, Any],
    registered: Any,
    console: logging.Logger,
    rank: int,
) -> tuple[str | None, Path | None]:
    """(URL, local folder kept open on ``stack``) of the checkpoint to resume from: the
    newest complete one in the run folder whose files match its commit markers; (None,
    None) for a fresh start.

    Ray Train hands a restarted worker the newest checkpoint it registered, but it takes
    reports from a queue it polls: a checkpoint reported just before the worker died can
    be in storage, complete, and unknown to it. So the run folder is the record, and the
    commit markers tell complete checkpoints apart; a damaged one (a file truncated or
    changed after its marker was written) is skipped, saying so, for the one before it.
    """
    options = loop_config["storage_options"]
    for step, url in reversed(ckpt_io.complete_checkpoints(loop_config["run_dir"], options)):
        opened = contextlib.ExitStack()
        local = opened.enter_context(ckpt_io.local_copy(url, options))
        try:
            ckpt_io.verify_contents(local)
        except ckpt_io.CheckpointError as err:
            opened.close()
            if rank == 0:
                console.info(f"[train] skipping the checkpoint of step {step}: {err}")
            continue
        stack.push(opened)
        if rank == 0 and (registered is None or Path(registered.path).name != Path(url).name):
            console.info(
                f"[train] resuming from a checkpoint Ray Train did not register (step {step}): "
                "its report was lost when the worker stopped, or a newer one was skipped"
            )
        return url, Path(local)
    return None, None


def _build_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    from sparse_transformer.model import SparseTransformer

    with torch.device("meta"):
        model = SparseTransformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights(cfg.train.seed)  # identical on every rank
    return model


def _train(loop_config: dict[str, Any]) -> None:
    import deepspeed  # noqa: F401 - first: it picks its accelerator when imported
    import ray.train

    from sparse_transformer.data import StreamingDataset

    cfg = Config.from_dict(loop_config["config"])
    t, d = cfg.train, cfg.data
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    console = _console()
    if t.deterministic:
        # before the first matmul creates cuBLAS's workspace; the Triton attention kernels
        # also launch at fixed configurations instead of timing-based autotuned ones
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    on_gpu = torch.cuda.is_available() and loop_config.get("use_gpu", False)
    if on_gpu:
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if t.torch_threads:
        torch.set_num_threads(t.torch_threads)
    precision = resolve_precision(cfg, on_gpu)

    with contextlib.ExitStack() as stack:
        stack.enter_context(ckpt_io.weights_only_loads())  # DeepSpeed's loads included
        restored, cdir = _open_checkpoint_to_resume(
            stack, loop_config, ray.train.get_checkpoint(), console, rank
        )
        meta = ckpt_io.verify_complete(cdir) if cdir is not None else None
        universal = meta is not None and ckpt_io.needs_universal(meta, world, t.zero_stage)
        model = _build_model(cfg, device)
        compile_mode = resolve_compile(cfg, on_gpu)
        if compile_mode is not None:  # traced on the first step, which reports its time
            model.compile_blocks(mode=compile_mode)
        ds_config = deepspeed_config(cfg, world, on_gpu=on_gpu)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
        engine, scheduler = ds.initialize(model, ds_config)
        torch.manual_seed(t.seed + 1000 * (rank + 1))  # dropout stream of this rank
        state: dict[str, Any] | None = None
        if cdir is not None:
            load_dir = cdir
            if universal:
                load_dir = _universal_copy(stack, cdir, restored, ctx.get_local_rank())
                if rank == 0:
                    console.info(
                        f"[train] checkpoint of world size {meta['world_size']} (ZeRO stage "
                        f"{meta.get('zero_stage', 0)}) resumed on {world} worker(s) (ZeRO stage "
                        f"{t.zero_stage}) through DeepSpeed's universal format"
                    )
            load_path, _ = engine.load_checkpoint(
                str(load_dir),
                tag=ckpt_io.DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no checkpoint under {load_dir}")
            state = ckpt_io.load_rank_state(cdir, rank)

    url = loop_config["data_url"]
    common = dict(
        rank=rank,
        world_size=world,
        storage_options=d.storage_options or None,
        batched=True,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
    )
    train_ds = StreamingDataset(
        url,
        split="train",
        global_batch_size=d.global_batch_size,
        seed=d.seed,
        shuffle_window=d.shuffle_window,
        **common,
    )
    if train_ds.seq_len != cfg.seq_len:
        raise ValueError(
            f"data.seq_len: the dataset at {url} has samples of {train_ds.seq_len} tokens, "
            f"the config asks for {cfg.seq_len}"
        )

    # -- restore ----------------------------------------------------------------------------
    step = 0
    skipped_nonfinite = 0  # fp32 steps dropped for non-finite gradients (saved in checkpoints)
    if state is not None:
        step = int(state["step"])
        skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        train_ds.load_state_dict(state["data"])
        if state.get("world_size") == world and state.get("rank") == rank:
            torch.set_rng_state(state["rng_cpu"])
            if on_gpu and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], device)
        else:  # elastic restart with another world size: a fresh, deterministic stream
            torch.manual_seed(t.seed + 1000 * (rank + 1) + step)
        if rank == 0:
            console.info(f"[train] resumed from step {step} ({restored})")

    # -- fault injection (tests) --------------------------------------------------------------
    marker = loop_config.get("fault_marker")

    def maybe_fault(at: int) -> None:
        if t.fault_step != at or rank != t.fault_rank or not marker or os.path.exists(marker):
            return
        Path(marker).parent.mkdir(parents=True, exist_ok=True)
        Path(marker).write_text(f"fault injected at step {at} on rank {rank}\n")
        if t.fault_target == "driver" and loop_config.get("driver_pid"):
            import signal

            os.kill(int(loop_config["driver_pid"]), signal.SIGKILL)
            time.sleep(30)  # the whole local Ray instance goes down with the driver
        os._exit(1)

    local_dir = Path(loop_config["local_dir"])
    exporter = _Exporter(cfg.run.name, loop_config.get("tb_dir")) if rank == 0 else None
    history = local_dir / "metrics.jsonl"
    if rank == 0:
        local_dir.mkdir(parents=True, exist_ok=True)
    digests = local_dir / "batches" / f"rank{rank}.jsonl" if t.record_batches else None
    if digests is not None:
        digests.parent.mkdir(parents=True, exist_ok=True)
    val_ds = StreamingDataset(
        url,
        split="validation",
        global_batch_size=d.eval_batch_size or d.global_batch_size,
        shuffle=False,
        **common,
    )

    def forward(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if compile_mode == "reduce-overhead":  # CUDA graphs: each forward is a new step
            torch.compiler.cudagraph_mark_step_begin()
        return engine(x, y)

    @torch.no_grad()
    def evaluate() -> float:
        rng = torch.get_rng_state()  # evaluation must not move the training RNG
        try:
            return _evaluate()
        finally:
            torch.set_rng_state(rng)

    def _evaluate() -> float:
        engine.eval()
        val_ds.reset()
        batches = itertools.islice(val_ds.loader(), t.eval_batches or None)
        total = evaluation.loss_sums(forward, batches, device)
        engine.train()
        return evaluation.bits_per_token(collectives.all_reduce(total))  # one read

    def window_over_ranks() -> list[float]:
        """[sum of the losses over samples, samples] of the open log window, all ranks."""
        window = torch.stack([win_loss, win_loss.new_tensor(win_samples)])
        return collectives.all_reduce(window).tolist()  # the one read of the window

    def rank0_files(step: int) -> dict[str, Any]:
        """What only rank 0 writes: meta.json, the redacted config, the fp32 model."""
        model_state = None
        if t.zero_stage < 3:
            model_state = {
                k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()
            }
        meta = ckpt_io.make_meta(
            step=step,
            world_size=world,
            zero_stage=t.zero_stage,
            precision=precision,
            model=cfg.model.to_dict(),
            data_url=url,
        )
        return {"meta": meta, "config_yaml": dump_yaml(cfg), "model_state": model_state}

    def save(step: int, metrics: dict[str, Any]) -> None:
        # the checkpoint carries the open window: a resumed run reports the loss an
        # uninterrupted one does, on any world size (rank 0 carries it on)
        window = window_over_ranks()
        tmp = tempfile.mkdtemp(prefix=f"st-ckpt-{step:08d}-r{rank}-")
        try:
            ckpt_io.write(
                tmp,
                rank,
                save_engine=lambda d: engine.save_checkpoint(
                    d, tag=ckpt_io.DS_TAG, client_state={"step": step}
                ),
                rank_state={
                    "step": step,
                    "rank": rank,
                    "world_size": world,
                    "data": train_ds.state_dict(),
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if on_gpu else None,
                    "skipped_nonfinite": skipped_nonfinite,
                    "loss_window": window,
                },
                **(rank0_files(step) if rank == 0 else {}),
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the loop -----------------------------------------------------------------------------
    micro = cfg.micro_batch_size(world)
    loader_iter = iter(train_ds.loader(pin_memory=on_gpu))

    def next_batch() -> torch.Tensor:
        nonlocal loader_iter
        # A DataLoader draws its base seed from the global RNG when an iterator starts;
        # keep the dropout stream independent of when loaders (re)start, so a resumed
        # run consumes exactly the random numbers the uninterrupted one does.
        rng = torch.get_rng_state()
        try:
            return next(loader_iter)
        except StopIteration:  # epoch over: the dataset has moved on to the next one
            loader_iter = iter(train_ds.loader(pin_memory=on_gpu))
            return next(loader_iter)
        finally:
            torch.set_rng_state(rng)

    # the log window: the losses summed over samples stay on the device until they are read
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_samples = 0
    if state is not None and rank == 0 and "loss_window" in state:
        win_loss += state["loss_window"][0]
        win_samples = int(state["loss_window"][1])
    # DeepSpeed skips and counts fp16 overflows; fp32 with ZeRO 0 gets the same guard here.
    guard = precision == "fp32" and t.zero_stage == 0
    win_time = win_wait = 0.0
    win_steps = 0
    grad_norm = float("nan")
    last_val: float | None = None
    stopper = StopWatcher(loop_config.get("stop_flag"), world, device)
    engine.train()
    start = step
    while step < t.steps:
        maybe_fault(step)
        t0 = time.perf_counter()
        batch = next_batch()
        wait = time.perf_counter() - t0
        if digests is not None:
            digest = hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16]
            with open(digests, "a") as f:
                f.write(json.dumps({"step": step, "rank": rank, "batch": digest}) + "\n")
        # pinned on a GPU: the copy is queued behind the running step, the host goes on
        batch = batch.to(device, non_blocking=True)
        targets = evaluation.next_token_targets(batch)
        will_log = (step + 1) % t.log_every == 0 or step + 1 == t.steps
        skip = False
        for i in range(t.grad_accum):
            x, y = batch[i * micro : (i + 1) * micro], targets[i * micro : (i + 1) * micro]
            _, loss = forward(x, y)
            win_loss += loss.detach() * len(x)  # a sum over samples: any world size
            if step == t.fault_overflow_step:
                loss = loss * float("inf")  # fault injection: gradients overflow, loss as is
            engine.backward(loss)
            if i + 1 == t.grad_accum and (guard or will_log):
                grad_norm = ds.grad_norm(engine)  # the all-reduced gradients: same on every rank
                skip = guard and not math.isfinite(grad_norm)
            if skip:
                ds.step_without_update(engine)
            else:
                engine.step()
        win_samples += t.grad_accum * micro
        if skip:
            skipped_nonfinite += 1
            if rank == 0:
                console.info(f"[train] step {step + 1}: non-finite gradients, step skipped")
        step += 1
        if step == start + 1 and rank == 0:
            _report_first_step(console, device, t0, compile_mode is not None)
        win_wait += wait
        win_steps += 1
        stopping = step < t.steps and stopper.should_stop()  # the same on every rank

        metrics: dict[str, Any] | None = None
        if will_log:
            nats, count = window_over_ranks()
            # step times are the host's; this one includes waiting for the device's queue
            win_time += time.perf_counter() - t0
            tokens = win_steps * d.global_batch_size * cfg.seq_len
            metrics = {
                "step": step,
                "loss_bits": evaluation.bits_per_token([nats, count]),
                "learning_rate": float(scheduler.get_last_lr()[0]) if scheduler else t.lr,
                "loss_scale": ds.loss_scale(engine, precision),
                "skipped_steps": ds.skipped_steps(engine) + skipped_nonfinite,
                "grad_norm": grad_norm,
                "tokens_per_second": tokens / max(win_time, 1e-9),
                "samples_per_second": win_steps * d.global_batch_size / max(win_time, 1e-9),
                "data_wait_fraction": win_wait / max(win_time, 1e-9),
                "peak_memory_bytes": _peak_memory(device),
            }
            win_loss.zero_()
            win_samples = 0
            win_time = win_wait = 0.0
            win_steps = 0
        else:
            win_time += time.perf_counter() - t0
        do_eval = step == t.steps or (t.eval_every and step % t.eval_every == 0)
        do_ckpt = (
            step == t.steps or stopping or (t.checkpoint_every and step % t.checkpoint_every == 0)
        )
        if do_eval:
            last_val = evaluate()
            metrics = metrics or {"step": step}
            metrics["val_loss_bits"] = last_val
        if metrics is not None and exporter is not None:
            exporter.export(step, metrics)
            with open(history, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if "loss_bits" in metrics:
                console.info(_progress(step, t.steps, metrics))
            if "val_loss_bits" in metrics:
                console.info(f"[train] step {step}: validation {last_val:.4f} bits/byte")
        if step == t.steps and rank == 0 and (launch := _attention_launch_configs()):
            metrics = metrics or {"step": step}
            metrics["attention_launch_configs"] = launch
        if step == t.steps and t.sample_length > 0 and (rank == 0 or t.zero_stage == 3):
            # ZeRO-3 gathers parameters collectively in every forward: all ranks run the
            # same (seeded, hence identical) decoding in lockstep; rank 0 keeps the text.
            text = evaluation.sample_text(
                engine.module, t.sample_prompt, t.sample_length, seed=t.seed, device=device,
                top_p=0.9,
            )  # fmt: skip
            if rank == 0:
                metrics = metrics or {"step": step}
                metrics["sample"] = text
        if stopping:
            metrics = {**(metrics or {"step": step}), "stopped": stopper.reason}
            if rank == 0:
                console.info(f"[train] step {step}: stopping ({stopper.reason}), checkpointing")
        if do_ckpt:
            save(step, metrics or {"step": step})
        elif metrics is not None:
            ray.train.report(metrics)
        if stopping:
            break
    if exporter is not None:
        exporter.close()
    del loader_iter


def _report_first_step(
    console: logging.Logger, device: torch.device, t0: float, compiled: bool
) -> None:
    """Log the first step's time (one device sync): it compiles the blocks and tunes
    the attention kernels, so it is the compile time a run pays."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    what = "compiling the blocks and tuning the kernels" if compiled else "warm-up"
    console.info(f"[train] first step: {time.perf_counter() - t0:.1f} s ({what} included)")


def _attention_launch_configs() -> dict[str, list[str]] | None:
    """What Triton's autotuner chose for the attention kernels in this process (None when
    they never ran here): a run that resumes in another process may choose otherwise."""
    kernels = sys.modules.get("sparse_transformer.ops.triton_attention")
    return kernels.autotuned_configs() if kernels is not None else None
