"""Permanent errors end a run at once; transient ones keep Ray Train's restarts.

A shard missing from storage is found on the driver before Ray starts. One that goes
missing after that check fails the workers with an error that will recur, so the run
ends on the first failure instead of spending every ``run.max_failures`` restart on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sparse_transformer.data.errors import (
    CorruptShardError,
    ManifestError,
    MissingShardError,
    RetriesExhaustedError,
)
from sparse_transformer.distributed.checkpoint import IncompleteCheckpointError
from sparse_transformer.distributed.config import ConfigError
from sparse_transformer.distributed.failures import is_permanent
from tests.test_train import (
    local_ray,  # noqa: F401 - fixture
    small_config,
    small_dataset,  # noqa: F401 - fixture
)


class _WrappedError(Exception):
    """Stands in for Ray's RayTaskError: the worker's exception is ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@pytest.mark.parametrize(
    ("error", "permanent"),
    [
        (MissingShardError("shard x: not found in storage"), True),
        (CorruptShardError("shard x: not a readable Parquet shard"), True),
        (ManifestError("m.json: no manifest"), True),
        (IncompleteCheckpointError("ckpt: no commit marker"), True),
        (ConfigError("train.zero_stage: ..."), True),
        (_WrappedError(MissingShardError("shard x")), True),
        (RetriesExhaustedError("shard x: 8 attempts"), False),  # storage may come back
        (RuntimeError("NCCL timeout"), False),
        (_WrappedError(OSError("connection reset")), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_which_errors_are_permanent(error: BaseException, permanent: bool) -> None:
    assert is_permanent(error) is permanent


def _without_train_shards(dataset_url: str, tmp: Path) -> tuple[str, str]:
    """A copy of the dataset whose train shards are gone; (its URL, one missing shard)."""
    copy = tmp / "ds"
    shutil.copytree(dataset_url.removeprefix("file://"), copy)
    shards = sorted((copy / "train").glob("*.parquet"))
    for shard in shards:
        shard.unlink()
    return f"file://{copy}", f"train/{shards[0].name}"


def test_missing_shard_is_found_on_the_driver_before_ray_starts(
    small_dataset: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    import ray

    from sparse_transformer.distributed.trainer import DataSetupError, run_training

    url, first = _without_train_shards(small_dataset, tmp_path)
    with pytest.raises(
        DataSetupError, match=rf"shard\(s\) the manifest lists are not in storage: {first}"
    ):
        run_training(small_config(tmp_path, url, "gone"), verbose=False)
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_shard_lost_after_the_driver_check_is_not_retried(
    small_dataset: str,  # noqa: F811
    tmp_path: Path,
    local_ray: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sparse_transformer.data
    from sparse_transformer.distributed.trainer import TrainingError, run_training

    url, _ = _without_train_shards(small_dataset, tmp_path)
    # the shards vanish between the driver's check and the workers' first read
    monkeypatch.setattr(sparse_transformer.data, "check_shards", lambda *a, **k: None)
    cfg = small_config(tmp_path, url, "lost")
    cfg.run.max_failures = 3
    with pytest.raises(TrainingError) as info:
        run_training(cfg, verbose=False)
    err = info.value
    assert err.permanent, str(err)
    assert "a permanent error: not retried" in str(err).splitlines()[0]
    assert isinstance(_cause(err.worker_failures[min(err.worker_failures)]), MissingShardError)
    assert f"{url}/train/" in str(err) and "not found in storage" in str(err)
    assert "--- worker traceback (rank" in str(err)  # the worker's own traceback is kept


def _cause(err: BaseException) -> BaseException:
    from sparse_transformer.distributed.failures import root_cause

    return root_cause(err)
