"""The driver: check storage, prepare data, start or join Ray, run the TorchTrainer.

:func:`run_training` turns a validated :class:`Config` into Ray Train's
``ScalingConfig`` / ``RunConfig`` and a ``TorchTrainer`` whose workers run
:func:`sparse_transformer.distributed.worker.train_loop`. Relaunching with the same
``run.name`` and ``run.storage_path`` resumes from the run's latest checkpoint
(Ray Train restores its checkpoint manager from storage).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_transformer.distributed.config import (
    Config,
    ConfigError,
    data_url,
    dump_yaml,
    is_remote,
    local_path,
    relative_paths,
)
from sparse_transformer.distributed.hooks import TrainHooks
from sparse_transformer.distributed.redaction import redact, redact_url


class StorageError(RuntimeError):
    """Run storage that cannot be reached or written (raised before training starts)."""


class DataSetupError(RuntimeError):
    """A dataset that cannot be prepared or read (raised on the driver before Ray starts)."""


class TrainingError(RuntimeError):
    """Training workers failed; ``worker_failures`` maps each failed rank to its error.

    Ray Train's own message groups similar errors and cuts long ones in the middle, which
    can drop the line that says what went wrong; this one states every rank's cause in
    full, followed by the worker traceback of the lowest failed rank.
    """

    def __init__(self, worker_failures: dict[int, BaseException], permanent: bool = False) -> None:
        self.worker_failures = dict(worker_failures)
        self.permanent = permanent
        super().__init__(describe_worker_failures(self.worker_failures, permanent))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.worker_failures, self.permanent))


def describe_worker_failures(failures: dict[int, BaseException], permanent: bool = False) -> str:
    """One line per failed rank (its error's first line), then the lowest rank's text.
    ``permanent``: the error would recur, so Ray Train did not restart the workers."""
    from sparse_transformer.distributed.failures import root_cause, worker_report

    if not failures:
        return "training failed (no worker reported an error)"
    ranks = sorted(failures)
    why = " (a permanent error: not retried)" if permanent else ""
    lines = [f"training failed on {len(ranks)} worker(s), ranks {', '.join(map(str, ranks))}{why}:"]
    for rank in ranks:
        cause = root_cause(failures[rank])
        first = (str(cause).strip().splitlines() or [""])[0]
        lines.append(f"  rank {rank}: {type(cause).__name__}: {first}")
    lines.append(f"--- rank {ranks[0]} in full ---")
    lines.append(worker_report(failures[ranks[0]]).rstrip())
    return "\n".join(lines)


@dataclass
class TrainSummary:
    """What the driver learned from a finished run."""

    metrics: dict[str, Any]
    checkpoint: str | None
    run_dir: str
    stopped: str | None = None  # the signal that stopped the run early (SIGINT, SIGTERM)


def ray_environment() -> dict[str, str]:
    """Environment the workers need (the DeepSpeed op cache in the venv, loopback Ray)."""
    env = os.environ
    ext = env.get("TORCH_EXTENSIONS_DIR") or str(Path(sys.prefix) / "torch_extensions")
    out = {
        "TORCH_EXTENSIONS_DIR": ext,
        "DS_BUILD_OPS": env.get("DS_BUILD_OPS", "0"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"),
        "RAY_USAGE_STATS_ENABLED": env.get("RAY_USAGE_STATS_ENABLED", "0"),
        "PYTHONUNBUFFERED": "1",
    }
    if "DS_ACCELERATOR" in env:
        out["DS_ACCELERATOR"] = env["DS_ACCELERATOR"]
    return out


def storage_filesystem(cfg: Config) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Ray's RunConfig: a remote run folder goes
    through the filesystem the data and checkpoint readers use (``data.storage``: s3fs,
    gcsfs, ... with the same S3 defaults), wrapped for pyarrow
    (``PyFileSystem(FSSpecHandler(fs))``): one storage stack (``run.storage_options``)."""
    sp = cfg.run.storage_path
    if not is_remote(sp):
        return None, local_path(sp)
    import pyarrow.fs as pafs

    from sparse_transformer.data.storage import filesystem

    fs, path = filesystem(sp, storage_fsspec_options(cfg))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def storage_fsspec_options(cfg: Config) -> dict[str, Any]:
    """``run.storage_options`` for fsspec (s3fs takes the region as a client argument)."""
    options = dict(cfg.run.storage_options)
    region = options.pop("region", None)
    if region:
        options.setdefault("client_kwargs", {})["region_name"] = str(region)
    return options


def check_storage(cfg: Config) -> None:
    """Write and delete a probe under the run folder; fail with the URL otherwise."""
    fs, path = storage_filesystem(cfg)
    shown = redact_url(cfg.run.storage_path)
    probe = f"{path.rstrip('/')}/{cfg.run.name}/.probe-{uuid.uuid4().hex[:8]}"
    try:
        if fs is None:  # a local folder
            Path(probe).parent.mkdir(parents=True, exist_ok=True)
            Path(probe).write_text("ok")
            Path(probe).unlink()
            return
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except Exception as err:
        raise StorageError(
            f"run.storage_path {shown}: not reachable or not writable "
            f"({type(err).__name__}: {redact_url(str(err))})"
        ) from err


def prepare_data(cfg: Config) -> str:
    """The dataset URL, prepared (once; reused afterwards) when ``data.prepare`` is set,
    its manifest read back and every shard it lists found in storage at its size; a
    :class:`DataSetupError` naming the dataset otherwise.

    An existing dataset of another source, or one whose manifest cannot be read, is an
    error: nothing is ever rebuilt over it implicitly.
    """
    from sparse_transformer.data import check_shards, load_manifest, prepare
    from sparse_transformer.data.errors import DataError

    url = data_url(cfg)
    options = cfg.data.storage_options or None
    try:
        if cfg.data.prepare:
            prepare(
                cfg.data.source,
                url,
                path=cfg.data.path or None,
                seq_len=cfg.seq_len,
                storage_options=options,
                overwrite=False,
            )
        check_shards(load_manifest(url, options), options)
    except (DataError, ValueError) as err:
        raise DataSetupError(redact_url(str(err))) from err
    return url


def dashboard_dependency_error() -> str | None:
    """Why Ray's dashboard cannot start here (its packages, ``ray[default]``), or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what Ray itself checks
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def include_dashboard(cfg: Config) -> bool | None:
    """``include_dashboard`` for ``ray.init`` from ``run.dashboard``.

    auto: None (Ray's own default: start it) when its packages are there, else False and
    one line saying so; true: True, or a :class:`ConfigError` naming what is missing (Ray
    would raise a bare "Cannot include dashboard with missing packages"); false: False.
    """
    setting = cfg.run.dashboard
    if setting == "false":
        return False
    missing = dashboard_dependency_error()
    if setting == "true":
        if missing:
            raise ConfigError(
                f"run.dashboard: true, but Ray's dashboard cannot start here ({missing}); "
                "install ray[default], or set run.dashboard=auto to train without it"
            )
        return True
    if missing:
        print(
            f"[train] Ray dashboard off: its packages are missing ({missing}); install "
            "ray[default] to have it (run.dashboard=auto)",
            flush=True,
        )
        return False
    return None


@dataclass
class RayInstance:
    """What :func:`init_ray` did: whether it started (or joined) Ray, where to watch it,
    and the Ray job this driver runs as, if any."""

    started: bool
    dashboard_url: str | None = None
    metrics_url: str | None = None
    job_id: str | None = None


def ray_job_id() -> str | None:
    """The submission id of the Ray job this process is the driver of (``ray job submit``,
    ``sparse-transformer submit``); None outside a job. Ray's job supervisor hands the
    job's config to its entrypoint in ``RAY_JOB_CONFIG_JSON_ENV_VAR``."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw is None:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        metadata = {}
    return str(metadata.get("job_submission_id") or "(unnamed)")


def check_job_paths(cfg: Config, job_id: str | None) -> None:
    """Inside a Ray job the working directory is a temporary copy of the job's files,
    shared by later jobs of the same snapshot: a relative run folder or dataset path
    would land there. Refuse them, naming the field."""
    if job_id is not None and (relative := relative_paths(cfg)):
        field, value = relative[0]
        raise ConfigError(
            f"{field}: {value!r} is relative; inside Ray job {job_id} the working "
            f"directory ({os.getcwd()}) is a temporary copy of the job's files: give an "
            "absolute path every node can reach, or a URL (s3://...)"
        )


def _metrics_url() -> str | None:
    """The Prometheus endpoint of this process's local Ray node (None if unknown)."""
    import ray._private.worker  # no public API says where the node's metrics are served

    node = getattr(ray._private.worker.global_worker, "node", None)
    port = getattr(node, "metrics_export_port", None)
    return f"http://127.0.0.1:{port}/metrics" if port else None


def init_ray(cfg: Config) -> RayInstance:
    """Start (``run.ray_address=local``) or join Ray, unless this process already has.
    A local instance listens on loopback only (:mod:`.loopback`)."""
    import ray

    from sparse_transformer.distributed.loopback import (
        LOOPBACK,
        confine_to_loopback,
        private_auth_token,
    )

    job = ray_job_id()
    if ray.is_initialized():
        return RayInstance(started=False, job_id=job)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # the dashboard's Train view
    env = ray_environment()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    address = "auto" if job is not None and cfg.run.ray_address == "local" else cfg.run.ray_address
    if address != "local":
        # a job's driver keeps the job's runtime environment (the workers get ours through
        # the train loop's config): a second one passed here would conflict with it
        context = ray.init(address=address, runtime_env=None if job else {"env_vars": env})
        return RayInstance(True, _dashboard_url(context), _metrics_url(), job)
    confine_to_loopback()
    private_auth_token()
    context = ray.init(
        address="local",
        num_cpus=cfg.run.num_cpus or None,
        include_dashboard=include_dashboard(cfg),
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    return RayInstance(True, _dashboard_url(context), _metrics_url())


def _dashboard_url(context: Any) -> str | None:
    """The dashboard ``ray.init`` reports (the port Ray took), or None without one."""
    url = getattr(context, "dashboard_url", None)  # "127.0.0.1:8265"
    return f"http://{url}" if url else None


def use_gpu(cfg: Config) -> bool:
    if cfg.scaling.use_gpu != "auto":
        return cfg.scaling.use_gpu == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def run_dir(cfg: Config) -> str:
    """The run folder (``<storage_path>/<name>``) as a URL or local path."""
    sp = cfg.run.storage_path
    return (
        f"{sp.rstrip('/')}/{cfg.run.name}" if is_remote(sp) else f"{local_path(sp)}/{cfg.run.name}"
    )


def local_state_dir(cfg: Config) -> Path:
    """The local run folder (metrics.jsonl, TensorBoard events, batch digests, fault marker):
    the run folder itself for local storage, else ~/.cache/sparse-transformer/runs/NAME."""
    if not is_remote(cfg.run.storage_path):
        return Path(local_path(cfg.run.storage_path)) / cfg.run.name
    return Path.home() / ".cache" / "sparse-transformer" / "runs" / cfg.run.name


def build_trainer(
    cfg: Config,
    *,
    extra: dict[str, Any] | None = None,
    data_url: str | None = None,
    hooks: Sequence[TrainHooks] = (),
) -> Any:
    """The TorchTrainer for ``cfg`` (Ray must be initialised); ``data_url``: the dataset
    :func:`prepare_data` returned (prepared here when None); ``hooks``: what every
    worker's loop calls (:mod:`sparse_transformer.distributed.hooks`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from sparse_transformer.distributed.failures import StopOnPermanentError
    from sparse_transformer.distributed.worker import train_loop

    gpu = use_gpu(cfg)
    s = cfg.scaling
    resources: dict[str, float] = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if gpu:
        resources["GPU"] = s.gpus_per_worker
    scaling = ScalingConfig(
        num_workers=(s.min_workers, s.num_workers) if s.min_workers else s.num_workers,
        use_gpu=gpu,
        resources_per_worker=resources,
    )
    fs, path = storage_filesystem(cfg)
    local_state = local_state_dir(cfg)
    run_config = RunConfig(
        name=cfg.run.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.num_to_keep),
        callbacks=[StopOnPermanentError()],
    )
    import ray

    # Ray Train shows train_loop_config in the dashboard's Train view as it is: what may
    # hold credentials (the config's storage options) travels as an object the workers
    # fetch, and the view gets the redacted config.
    private = {
        "config": cfg.to_dict(),
        "storage_options": storage_fsspec_options(cfg),
        "hooks": list(hooks),
    }
    loop_config = {
        "private": ray.put(private),
        "config_redacted": redact(cfg),
        "data_url": data_url or prepare_data(cfg),
        "use_gpu": gpu,
        "local_dir": str(local_state),
        "run_dir": run_dir(cfg),
        "driver_pid": os.getpid(),
        "tb_dir": str(local_state / "tensorboard"),
        "worker_env": ray_environment(),
        **(extra or {}),
    }
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
    )


def run_training(
    cfg: Config, *, verbose: bool = True, hooks: Sequence[TrainHooks] = ()
) -> TrainSummary:
    """Train ``cfg`` to the end (or resume it) and return the final metrics and checkpoint.

    ``hooks`` run in every worker's loop (tests inject faults through them:
    :mod:`sparse_transformer.benchmarks.faults`); each is checked against the run first.
    """
    for hook in hooks:
        try:
            hook.check(cfg.scaling.num_workers)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if verbose:
        print("[train] config (redacted):\n" + dump_yaml(cfg), flush=True)
    check_job_paths(cfg, ray_job_id())
    check_storage(cfg)
    url = prepare_data(cfg)  # before Ray starts: a bad dataset fails here, naming it
    import ray

    from sparse_transformer.distributed.failures import permanent_failure
    from sparse_transformer.distributed.stopping import fit_beside_signals, stop_on_signals

    instance = init_ray(cfg)
    try:
        if verbose and instance.job_id and cfg.run.ray_address == "local":
            print(
                f"[train] running as Ray job {instance.job_id}: joined its cluster "
                "(run.ray_address=local applies outside jobs)",
                flush=True,
            )
        if verbose and instance.dashboard_url:
            print(f"[train] Ray dashboard: {instance.dashboard_url}", flush=True)
        if verbose and instance.metrics_url:
            print(f"[train] Prometheus metrics: {instance.metrics_url}", flush=True)
        try:
            with stop_on_signals(verbose) as flag:
                trainer = build_trainer(cfg, data_url=url, extra={"stop_flag": flag}, hooks=hooks)
                result = fit_beside_signals(trainer) if flag else trainer.fit()
        except Exception as err:
            if (permanent := permanent_failure(err)) is not None:
                raise TrainingError(permanent.worker_failures, permanent=True) from err
            failures = getattr(err, "worker_failures", None)
            if isinstance(failures, dict) and failures:
                raise TrainingError(failures) from err
            raise
        ckpt = result.checkpoint.path if result.checkpoint is not None else None
        metrics = dict(result.metrics or {})
        return TrainSummary(
            metrics=metrics, checkpoint=ckpt, run_dir=run_dir(cfg), stopped=metrics.get("stopped")
        )
    finally:
        if instance.started:
            ray.shutdown()


__all__ = [
    "ConfigError",
    "DataSetupError",
    "RayInstance",
    "StorageError",
    "TrainSummary",
    "TrainingError",
    "build_trainer",
    "check_job_paths",
    "check_storage",
    "include_dashboard",
    "init_ray",
    "prepare_data",
    "ray_job_id",
    "run_training",
]
