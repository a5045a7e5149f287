"""The one typed configuration of a training run, validated before any worker starts.

A run is described by a YAML file with five sections::

    model:    the network (``sparse_transformer.model.SparseTransformerConfig``)
    data:     DataSection      where the shards live, how they are prepared and batched
    train:    TrainSection     optimisation, precision, ZeRO, schedules, evaluation
    scaling:  ScalingSection   Ray Train workers and their resources
    run:      RunSection       name, storage (local folder or s3://), failures, checkpoints

:func:`load_config` reads a packaged name (``configs/NAME.yaml``) or a path and
applies ``key=value`` overrides (dotted paths, typed by the dataclass field, e.g.
``train.lr=3e-4 scaling.num_workers=2 model.n_layers=2``). Every value is checked
against its field's annotation (type, ``Literal`` choices, ``Range`` bounds) by the
one validator the model config uses too (``configs.schema.build``), and every
cross-field constraint (batch divisibility, sequence length versus context,
precision versus device) by the small checks of :func:`validate`, so a bad config
fails on the driver naming the field (``train.lr: expected float, got 'abc'``).
DeepSpeed's JSON (:func:`deepspeed_config`) and Ray's ScalingConfig / RunConfig
(``sparse_transformer.distributed.trainer``) are derived from the tree.

Every printed or saved config goes through ``distributed.redaction.redact`` (one set
of rules for the whole project).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from sparse_transformer import configs
from sparse_transformer.configs.schema import ConfigError, Range, build
from sparse_transformer.distributed.redaction import redact, redact_url
from sparse_transformer.model.config import SparseTransformerConfig

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Tristate = Literal["auto", "true", "false"]
"""auto, true or false (YAML's booleans are taken as "true" and "false")."""

PositiveInt = Annotated[int, Range(gt=0)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]
NonNegativeFloat = Annotated[float, Range(ge=0)]


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
    seq_len: NonNegativeInt = 0
    """Tokens per sample; 0 means the model's n_ctx."""
    global_batch_size: PositiveInt = 4
    """Samples per optimizer step over all workers (micro batch x workers x accumulation)."""
    seed: int = 0
    """Seed of the data order."""
    shuffle_window: PositiveInt = 4
    prefetch: NonNegativeInt = 2
    num_threads: PositiveInt = 1
    eval_batch_size: NonNegativeInt = 0
    """Global batch of the validation pass; 0 means ``global_batch_size``."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``url`` (e.g. ``endpoint_url``); credentials are never printed."""


@dataclass
class TrainSection:
    """Optimisation, precision and the loop's cadence."""

    steps: PositiveInt = 250
    """Optimizer steps of the whole run."""
    lr: PositiveFloat = 1e-3
    """Peak learning rate (after warm-up)."""
    warmup_steps: NonNegativeInt = 5000
    """Linear warm-up from 0 to ``lr``; then cosine decay to ``lr * min_lr_ratio``."""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.0
    weight_decay: NonNegativeFloat = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0
    grad_accum: PositiveInt = 1
    """Micro-batches per optimizer step on each worker."""
    precision: Precision = "auto"
    """auto (fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16 (GPU only)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage 0-3."""
    initial_scale_power: int = 16
    """fp16 dynamic loss scaling: the first scale is 2 ** initial_scale_power."""
    loss_scale_window: PositiveInt = 1000
    """Steps without overflow before the scale doubles."""
    hysteresis: PositiveInt = 2
    """Overflows tolerated before the scale halves."""
    min_loss_scale: PositiveFloat = 1.0
    seed: int = 0
    """Seed of the initial weights and of each rank's dropout RNG (seed + rank)."""
    log_every: PositiveInt = 10
    """Steps between metric reports (ray.train.report, Prometheus, TensorBoard)."""
    eval_every: NonNegativeInt = 100
    """Steps between validation passes (and one at the end); 0: only at the end."""
    eval_batches: NonNegativeInt = 4
    """Validation batches per pass; 0: the whole split."""
    checkpoint_every: NonNegativeInt = 50
    """Steps between checkpoints (and one at the end); 0: only at the end."""
    sample_length: NonNegativeInt = 200
    """Bytes sampled after training (0: none)."""
    sample_prompt: str = "The "
    record_batches: bool = False
    """Append a digest of every batch each rank consumes to <run>/batches/rank{r}.jsonl."""
    deterministic: bool = False
    """Bitwise-reproducible runs: torch.use_deterministic_algorithms, cuBLAS's fixed
    workspace, and the Triton attention kernels at fixed launch configurations instead of
    the ones Triton's autotuner times in each process."""
    torch_threads: NonNegativeInt = 0
    """torch.set_num_threads in each worker; 0: the worker's CPUs."""


@dataclass
class ScalingSection:
    """Ray Train workers (``ray.train.ScalingConfig``)."""

    num_workers: PositiveInt = 2
    min_workers: NonNegativeInt = 0
    """> 0 makes the group elastic: ScalingConfig(num_workers=(min_workers, num_workers))."""
    use_gpu: Tristate = "auto"
    """auto (GPUs when the Ray cluster has them), true or false."""
    cpus_per_worker: NonNegativeFloat = 1.0
    gpus_per_worker: NonNegativeFloat = 1.0
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
    max_failures: Annotated[int, Range(ge=-1)] = 2
    """Worker-group restarts after a failure (FailureConfig); -1: unlimited."""
    num_to_keep: PositiveInt = 2
    """Checkpoints kept (CheckpointConfig)."""
    ray_address: str = "local"
    """``local`` starts a Ray instance on 127.0.0.1; ``auto`` or ray://... joins a cluster."""
    dashboard: Tristate = "auto"
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


# -- building and cross-field checks -------------------------------------------------------


def _build(doc: Mapping[str, Any], *, name: str = "") -> Config:
    """The model and every section, each field checked against its annotation
    (``configs.schema.build``), then the run's name and the rules between fields."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: expected a mapping of sections, got {type(doc).__name__}")
    allowed = ("model", *SECTIONS)
    for key in doc:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown section; known sections: {', '.join(allowed)}")
    if not isinstance(doc.get("model"), Mapping):
        raise ConfigError("model: missing or not a mapping")
    model = build(SparseTransformerConfig, doc["model"], "model")
    sections = {
        s: build(cls, {} if doc.get(s) is None else doc[s], s) for s, cls in SECTIONS.items()
    }
    cfg = Config(model=model, **sections)
    if not cfg.run.name:
        cfg.run.name = name or "run"
    validate(cfg)
    return cfg


def _check_optimizer(cfg: Config) -> None:
    t = cfg.train
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {t.betas}")
    if cfg.model.compile in (True, "cudagraphs") and t.zero_stage == 3:
        raise ConfigError(
            "model.compile: ZeRO stage 3 gathers parameters in module hooks, which a compiled "
            "block cannot hold; use model.compile=false (or auto) or train.zero_stage <= 2"
        )
    if cfg.scaling.use_gpu == "false" and t.precision == "fp16":
        raise ConfigError("train.precision: fp16 needs GPUs (scaling.use_gpu=false); use fp32/bf16")


def _check_sizes(cfg: Config) -> None:
    """Workers, sequence length and batches: every world size of an elastic range must
    divide the global batch (with accumulation) and the evaluation batch."""
    d, t, s = cfg.data, cfg.train, cfg.scaling
    if s.min_workers > s.num_workers:
        raise ConfigError(
            f"scaling.min_workers: {s.min_workers} exceeds scaling.num_workers = {s.num_workers}"
        )
    if cfg.seq_len > cfg.model.n_ctx:
        raise ConfigError(
            f"data.seq_len: {cfg.seq_len} exceeds the model's context model.n_ctx = "
            f"{cfg.model.n_ctx}"
        )
    eval_batch = d.eval_batch_size or d.global_batch_size
    for world in range(s.min_workers or s.num_workers, s.num_workers + 1):
        if d.global_batch_size % (world * t.grad_accum):
            raise ConfigError(
                f"data.global_batch_size: {d.global_batch_size} is not divisible by "
                f"workers x train.grad_accum = {world} x {t.grad_accum}"
            )
        if eval_batch % world:
            raise ConfigError(
                f"data.eval_batch_size: {eval_batch} is not divisible by {world} workers"
            )


def _check_locations(cfg: Config) -> None:
    r = cfg.run
    if not r.name or "/" in r.name or r.name in (".", ".."):
        raise ConfigError(
            f"run.name: must be a folder name (not empty, '.' or '..', no '/'), got {r.name!r}"
        )
    if not cfg.data.url and is_remote(r.storage_path):
        raise ConfigError(
            "data.url: required when run.storage_path is remote "
            f"({redact_url(r.storage_path)}); prepare the dataset there and name it"
        )


def validate(cfg: Config) -> None:
    """The rules between fields; raises :class:`ConfigError` naming the field. Each
    field's own type, choices and bounds were checked when its section was built."""
    _check_optimizer(cfg)
    _check_sizes(cfg)
    _check_locations(cfg)


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
