"""The one typed configuration of a training run, validated before any worker starts.

A run is described by a YAML file with five sections::

    model:    the network (``sparse_transformer.model.SparseTransformerConfig``)
    data:     DataSection      where the shards live, how they are prepared and batched
    train:    TrainSection     optimisation, precision, ZeRO, schedules, evaluation, faults
    scaling:  ScalingSection   Ray Train workers and their resources
    run:      RunSection       name, storage (local folder or s3://), failures, checkpoints

:func:`load_config` reads a packaged name (``configs/NAME.yaml``) or a path and
applies ``key=value`` overrides (dotted paths, typed by the dataclass field, e.g.
``train.lr=3e-4 scaling.num_workers=2 model.n_layers=2``). Every value is checked
against its field's type and every cross-field constraint (batch divisibility,
sequence length versus context, precision versus device) is checked here, so a
bad config fails on the driver naming the field (``train.lr: expected float, got
'abc'``). DeepSpeed's JSON (:func:`deepspeed_config`) and Ray's ScalingConfig /
RunConfig (``sparse_transformer.distributed.trainer``) are derived from the tree.

Every printed or saved config goes through ``distributed.redaction.redact`` (one set
of rules for the whole project).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_transformer import configs
from sparse_transformer.distributed.redaction import redact, redact_url
from sparse_transformer.model.config import SparseTransformerConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRISTATE = ("auto", "true", "false")


class ConfigError(ValueError):
    """An invalid configuration; the message starts with the dotted field name."""


@dataclass
class DataSection:
    """Where the training data lives and how each rank streams it."""

    source: str = "wiki-sample"
    """``data.prepare`` source name, used when ``prepare`` is true."""
    url: str = ""
    """Dataset directory URL (file://, s3://, local path). Empty: for a local storage path,
    ``<run.storage_path>/data/<source>-<seq_len>``."""
    path: str = ""
    """A local copy of the source for ``prepare`` (empty: download where possible)."""
    prepare: bool = True
    """Prepare the dataset on the driver before training when it does not exist yet."""
    seq_len: int = 0
    """Tokens per sample; 0 means the model's n_ctx."""
    global_batch_size: int = 4
    """Samples per optimizer step over all workers (micro batch x workers x accumulation)."""
    seed: int = 0
    """Seed of the data order."""
    shuffle_window: int = 4
    prefetch: int = 2
    num_threads: int = 1
    eval_batch_size: int = 0
    """Global batch of the validation pass; 0 means ``global_batch_size``."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``url`` (e.g. ``endpoint_url``); credentials are never printed."""


@dataclass
class TrainSection:
    """Optimisation, precision and the loop's cadence."""

    steps: int = 250
    """Optimizer steps of the whole run."""
    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""
    warmup_steps: int = 5000
    """Linear warm-up from 0 to ``lr``; then cosine decay to ``lr * min_lr_ratio``."""
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    """Micro-batches per optimizer step on each worker."""
    precision: str = "auto"
    """auto (fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU only)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scaling: the first scale is 2 ** initial_scale_power."""
    loss_scale_window: int = 1000
    """Steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the scale halves."""
    min_loss_scale: float = 1.0
    seed: int = 0
    """Seed of the initial weights and of each rank's dropout RNG (seed + rank)."""
    log_every: int = 10
    """Steps between metric reports (ray.train.report, Prometheus, TensorBoard)."""
    eval_every: int = 100
    """Steps between validation passes (and one at the end); 0: only at the end."""
    eval_batches: int = 4
    """Validation batches per pass; 0: the whole split."""
    checkpoint_every: int = 50
    """Steps between checkpoints (and one at the end); 0: only at the end."""
    sample_length: int = 200
    """Bytes sampled after training (0: none)."""
    sample_prompt: str = "The "
    fault_step: int = -1
    """Fault injection for recovery tests: ``os._exit(1)`` at this step (-1: never) ..."""
    fault_rank: int = 1
    """... on this rank, only in the first attempt of the run (a marker file remembers)."""
    fault_target: str = "worker"
    """worker: the worker process exits; driver: it SIGKILLs the driver (whole-job restart)."""
    fault_overflow_step: int = -1
    """Fault injection: this step's backward gets an infinite loss on every rank, so its
    gradients overflow (fp16: DeepSpeed skips the step and lowers the loss scale; fp32:
    the non-finite guard skips it); the reported loss is the real one (-1: never)."""
    record_batches: bool = False
    """Append a digest of every batch each rank consumes to <run>/batches/rank{r}.jsonl."""
    deterministic: bool = False
    """Bitwise-reproducible runs: torch.use_deterministic_algorithms, cuBLAS's fixed
    workspace, and the Triton attention kernels at fixed launch configurations instead of
    the ones Triton's autotuner times in each process."""
    torch_threads: int = 0
    """torch.set_num_threads in each worker; 0: the worker's CPUs."""


@dataclass
class ScalingSection:
    """Ray Train workers (``ray.train.ScalingConfig``)."""

    num_workers: int = 2
    min_workers: int = 0
    """> 0 makes the group elastic: ScalingConfig(num_workers=(min_workers, num_workers))."""
    use_gpu: bool | str = "auto"
    """auto (GPUs when the Ray cluster has them), true or false."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker."""


@dataclass
class RunSection:
    """Where the run lives (``ray.train.RunConfig``) and which Ray cluster runs it."""

    name: str = ""
    """Run name (folder under storage_path); empty: the config's name."""
    storage_path: str = "runs"
    """Local folder (relative to the working directory) or s3://bucket/prefix."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """For s3://: endpoint_url, key, secret, region (pyarrow S3FileSystem)."""
    max_failures: int = 2
    """Worker-group restarts after a failure (FailureConfig)."""
    num_to_keep: int = 2
    """Checkpoints kept (CheckpointConfig)."""
    ray_address: str = "local"
    """``local`` starts a Ray instance on 127.0.0.1; ``auto`` or ray://... joins a cluster."""
    dashboard: bool | str = "auto"
    """The Ray dashboard (on 127.0.0.1) of a local instance: auto (start it when Ray's
    dashboard packages are installed, say once that it is off otherwise), true (insist:
    fail without them) or false."""
    num_cpus: int = 0
    """CPUs of a local Ray instance; 0: what the machine has."""


SECTIONS: dict[str, type] = {
    "data": DataSection,
    "train": TrainSection,
    "scaling": ScalingSection,
    "run": RunSection,
}


@dataclass
class Config:
    """The whole run: the model plus the four sections above."""

    model: SparseTransformerConfig
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    # -- derived values ----------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.n_ctx

    def micro_batch_size(self, world_size: int | None = None) -> int:
        world = world_size or self.scaling.num_workers
        return self.data.global_batch_size // (world * self.train.grad_accum)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (not redacted: pass through :func:`redact` to print/save)."""
        out: dict[str, Any] = {"model": self.model.to_dict()}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, name: str = "") -> Config:
        """Validate and build; raises :class:`ConfigError` naming the field."""
        return _build(doc, name=name)


# -- typed conversion ------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(path, arm, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected None, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{path}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{path}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected str, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    if origin is dict:
        _, item = typing.get_args(tp) or (str, Any)
        if isinstance(value, Mapping):
            return {str(k): _coerce(f"{path}.{k}", item, v) for k, v in value.items()}
        raise ConfigError(f"{path}: expected a mapping, got {value!r}")
    raise ConfigError(f"{path}: unsupported field type {tp!r}")  # pragma: no cover


def _section(name: str, cls: type, values: Any) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown field; known fields: {', '.join(known)}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    return cls(**kwargs)


def _build(doc: Mapping[str, Any], *, name: str = "") -> Config:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(doc).__name__}")
    allowed = ("model", *SECTIONS)
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown section; known sections: {', '.join(allowed)}")
    if not isinstance(doc.get("model"), Mapping):
        raise ConfigError("model: missing or not a mapping")
    try:
        model = SparseTransformerConfig.from_dict(doc["model"])
    except (ValueError, TypeError) as err:
        msg = str(err).replace("SparseTransformerConfig.", "model.")
        raise ConfigError(msg if msg.startswith("model.") else f"model: {msg}") from err
    sections = {s: _section(s, cls, doc.get(s)) for s, cls in SECTIONS.items()}
    cfg = Config(model=model, **sections)
    if not cfg.run.name:
        cfg.run.name = name or "run"
    validate(cfg)
    return cfg


def _positive(path: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{path}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def _tristate(path: str, value: bool | str) -> str:
    """auto, true or false (YAML booleans become "true"/"false")."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    if value not in TRISTATE:
        raise ConfigError(f"{path}: expected one of {TRISTATE}, got {value!r}")
    return value


def validate(cfg: Config) -> None:
    """Cross-field checks; raises :class:`ConfigError` naming the field."""
    d, t, s, r = cfg.data, cfg.train, cfg.scaling, cfg.run
    for path, value, zero_ok in (
        ("train.steps", t.steps, False),
        ("train.lr", t.lr, False),
        ("train.warmup_steps", t.warmup_steps, True),
        ("train.weight_decay", t.weight_decay, True),
        ("train.eps", t.eps, False),
        ("train.grad_clip", t.grad_clip, True),
        ("train.grad_accum", t.grad_accum, False),
        ("train.log_every", t.log_every, False),
        ("train.eval_every", t.eval_every, True),
        ("train.eval_batches", t.eval_batches, True),
        ("train.checkpoint_every", t.checkpoint_every, True),
        ("train.sample_length", t.sample_length, True),
        ("train.loss_scale_window", t.loss_scale_window, False),
        ("train.hysteresis", t.hysteresis, False),
        ("train.min_loss_scale", t.min_loss_scale, False),
        ("train.torch_threads", t.torch_threads, True),
        ("data.global_batch_size", d.global_batch_size, False),
        ("data.seq_len", d.seq_len, True),
        ("data.eval_batch_size", d.eval_batch_size, True),
        ("data.shuffle_window", d.shuffle_window, False),
        ("data.prefetch", d.prefetch, True),
        ("data.num_threads", d.num_threads, False),
        ("scaling.num_workers", s.num_workers, False),
        ("scaling.min_workers", s.min_workers, True),
        ("scaling.cpus_per_worker", s.cpus_per_worker, True),
        ("scaling.gpus_per_worker", s.gpus_per_worker, True),
        ("run.max_failures", r.max_failures + 1, False),  # -1 means unlimited in Ray
        ("run.num_to_keep", r.num_to_keep, False),
    ):
        _positive(path, value, zero_ok=zero_ok)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision: expected one of {PRECISIONS}, got {t.precision!r}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: expected 0, 1, 2 or 3, got {t.zero_stage}")
    if cfg.model.compile in (True, "cudagraphs") and t.zero_stage == 3:
        raise ConfigError(
            "model.compile: ZeRO stage 3 gathers parameters in module hooks, which a compiled "
            "block cannot hold; use model.compile=false (or auto) or train.zero_stage <= 2"
        )
    if t.fault_target not in ("worker", "driver"):
        raise ConfigError(f"train.fault_target: expected worker or driver, got {t.fault_target!r}")
    s.use_gpu = _tristate("scaling.use_gpu", s.use_gpu)
    r.dashboard = _tristate("run.dashboard", r.dashboard)
    if s.use_gpu == "false" and t.precision == "fp16":
        raise ConfigError("train.precision: fp16 needs GPUs (scaling.use_gpu=false); use fp32/bf16")
    if s.min_workers > s.num_workers:
        raise ConfigError(
            f"scaling.min_workers: {s.min_workers} exceeds scaling.num_workers = {s.num_workers}"
        )
    if cfg.seq_len > cfg.model.n_ctx:
        raise ConfigError(
            f"data.seq_len: {cfg.seq_len} exceeds the model's context model.n_ctx = "
            f"{cfg.model.n_ctx}"
        )
    worlds = range(s.min_workers or s.num_workers, s.num_workers + 1)
    for world in worlds:
        per_step = world * t.grad_accum
        if d.global_batch_size % per_step:
            raise ConfigError(
                f"data.global_batch_size: {d.global_batch_size} is not divisible by "
                f"workers x train.grad_accum = {world} x {t.grad_accum}"
            )
        eval_batch = d.eval_batch_size or d.global_batch_size
        if eval_batch % world:
            raise ConfigError(
                f"data.eval_batch_size: {eval_batch} is not divisible by {world} workers"
            )
    if t.fault_step >= 0 and not 0 <= t.fault_rank < s.num_workers:
        raise ConfigError(
            f"train.fault_rank: {t.fault_rank} is not a rank of {s.num_workers} workers"
        )
    if not r.name or "/" in r.name or r.name in (".", ".."):
        raise ConfigError(
            f"run.name: must be a folder name (not empty, '.' or '..', no '/'), got {r.name!r}"
        )
    if not d.url and is_remote(r.storage_path):
        raise ConfigError(
            "data.url: required when run.storage_path is remote "
            f"({redact_url(r.storage_path)}); prepare the dataset there and name it"
        )


# -- loading and overrides ---------------------------------------------------------------


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(file, run name) of a packaged config name or a YAML path (``configs.resolve``)."""
    try:
        return configs.resolve(name_or_path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--config: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML: 3e-4, true, [1, 2], abc)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if len(keys) < 2:
        raise ConfigError(f"override {text!r}: the key needs a section (e.g. train.lr)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads 3e-4 as a string; numbers written like that are meant as floats.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value) else value
    return keys, value


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``doc`` with every ``key=value`` applied (validation happens in _build)."""
    import copy

    out = copy.deepcopy(doc)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def load_config(
    name_or_path: str | os.PathLike[str] = "tiny", overrides: Sequence[str] = ()
) -> Config:
    """Read a packaged config name or YAML file, apply overrides, validate everything."""
    import yaml

    path, name = resolve_config_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config: {path} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config: {path} is not valid YAML{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config: {path} does not hold a mapping")
    doc.pop("runtime_env", None)  # the Ray job's runtime environment: `submit` reads it
    return _build(apply_overrides(doc, overrides), name=name)


# -- storage helpers -----------------------------------------------------------------------


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """The absolute local path of a local folder or file:// URL."""
    if url.startswith("file://"):
        url = url[len("file://") :]
    return str(Path(url).expanduser().resolve())


def relative_paths(cfg: Config) -> list[tuple[str, str]]:
    """(field, value) of ``run.storage_path`` and ``data.url`` where they are relative local
    paths (which a Ray job would resolve inside its temporary working directory)."""
    fields = (("run.storage_path", cfg.run.storage_path), ("data.url", cfg.data.url))
    return [
        (field, value)
        for field, value in fields
        if value and "://" not in value and not os.path.isabs(os.path.expanduser(value))
    ]


def data_url(cfg: Config) -> str:
    """The dataset URL: ``data.url`` or ``file://<storage>/data/<source>-<seq_len>``."""
    if cfg.data.url:
        u = cfg.data.url
        return u if "://" in u else "file://" + local_path(u)
    root = local_path(cfg.run.storage_path)
    return f"file://{root}/data/{cfg.data.source}-{cfg.seq_len}"


# -- printing ---------------------------------------------------------------------------------


def dump_yaml(cfg: Config) -> str:
    """The redacted config as YAML (what is printed and saved in checkpoints)."""
    import yaml

    return yaml.safe_dump(redact(cfg), sort_keys=False)


# -- DeepSpeed --------------------------------------------------------------------------------


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "fp16" if on_gpu else "fp32"
    if p == "fp16" and not on_gpu:
        raise ConfigError("train.precision: fp16 needs a GPU; use fp32 or bf16 on the CPU")
    return p


def fp16_zero0_warning(cfg: Config, on_gpu: bool) -> str | None:
    """The warning a run of fp16 under ZeRO stage 0 gets (None for any other run).

    DeepSpeed 0.19.8 wraps the optimizer in ``FP16_Optimizer`` at stage 0, which is not
    a ZeRO optimizer, so ``engine.backward`` never multiplies the loss by the loss scale,
    while ``step`` still divides the gradients by it: the update sees gradients 65,536
    times too small (Adam mostly hides it; clipping never triggers; the logged grad norm
    reads about 1e-5). Stages 1 and 2 scale the loss as they should.
    """
    if cfg.train.zero_stage != 0 or resolve_precision(cfg, on_gpu) != "fp16":
        return None
    return (
        "[train] warning: train.zero_stage=0 with fp16: DeepSpeed 0.19.8 divides the "
        "gradients by the loss scale without having scaled the loss (its ZeRO-0 fp16 "
        "optimizer), so updates are far too small and clipping never applies; use "
        "train.zero_stage=1 (the same memory on one GPU) or train.precision=bf16"
    )


def resolve_compile(cfg: Config, on_gpu: bool) -> str | None:
    """How training compiles the model's blocks: None (eager), ``"default"`` or
    ``"reduce-overhead"`` (CUDA graphs), as ``torch.compile``'s mode. ``model.compile:
    auto`` means compiled on GPUs (eager on the CPU, where compiling takes longer than a
    short run saves) and not under ZeRO stage 3."""
    c = cfg.model.compile
    if c == "auto":
        return "default" if on_gpu and cfg.train.zero_stage < 3 else None
    if c == "cudagraphs":
        return "reduce-overhead"
    return "default" if c else None


def deepspeed_config(cfg: Config, world_size: int, *, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's JSON config derived from the tree for ``world_size`` workers."""
    t = cfg.train
    precision = resolve_precision(cfg, on_gpu)
    opt_params: dict[str, Any] = {
        "lr": t.lr,
        "betas": list(t.betas),
        "eps": t.eps,
        "weight_decay": t.weight_decay,
    }
    if not on_gpu:
        # DeepSpeed's FusedAdam is a CUDA kernel (on the CPU accelerator it JIT-builds a
        # C++ op); torch.optim.AdamW is exact and needs no compile.
        opt_params["torch_adam"] = True
    warmup = max(1, min(t.warmup_steps, t.steps))  # DeepSpeed needs >= 1
    ds: dict[str, Any] = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size(world_size),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": t.min_lr_ratio,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "fp16": {"enabled": precision == "fp16"},
        "bf16": {"enabled": precision == "bf16"},
    }
    if precision == "fp16":
        ds["fp16"].update(
            {
                "loss_scale": 0,  # 0 = dynamic
                "initial_scale_power": t.initial_scale_power,
                "loss_scale_window": t.loss_scale_window,
                "hysteresis": t.hysteresis,
                "min_loss_scale": t.min_loss_scale,
            }
        )
    return ds
