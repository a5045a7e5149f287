"""Checkpoints in object storage: a 2-worker run writes them to a real S3 server (SeaweedFS
on 127.0.0.1), a relaunch resumes from S3, ``eval`` reads the checkpoint back from its
s3:// URL, and the credentials appear in no stored object."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from sparse_transformer.cli import main
from tests.test_train import (
    local_ray,  # noqa: F401 - fixture
    small_config,
    small_dataset,  # noqa: F401 - fixture
)


@pytest.mark.slow
def test_checkpoints_in_s3_resume_and_eval(
    small_dataset: str,  # noqa: F811
    s3: tuple[str, dict[str, object]],
    local_ray: None,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fsspec

    from sparse_transformer.distributed.trainer import run_training

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket, options = s3
    name = f"s3run-{uuid.uuid4().hex[:8]}"
    cfg = small_config(Path("/unused"), small_dataset, name, steps=8, checkpoint_every=4)
    cfg.run.storage_path = f"{bucket}/runs"
    cfg.run.storage_options = dict(options)
    cfg.train.record_batches = False
    summary = run_training(cfg, verbose=False)
    assert summary.checkpoint is not None and summary.run_dir == f"{bucket}/runs/{name}"

    fs = fsspec.filesystem("s3", **options)
    root = f"{bucket[len('s3://') :]}/runs/{name}"

    def checkpoints() -> list[str]:
        fs.invalidate_cache()
        return sorted(p for p in fs.ls(root, refresh=True) if fs.exists(f"{p}/meta.json"))

    ckpts = checkpoints()
    assert len(ckpts) == 2  # steps 4 and 8 (num_to_keep = 2)
    metas = [json.loads(fs.cat(f"{c}/meta.json")) for c in ckpts]
    assert sorted(m["step"] for m in metas) == [4, 8]
    for c in ckpts:
        assert fs.exists(f"{c}/commit/rank0.json") and fs.exists(f"{c}/commit/rank1.json")
        assert str(options["secret"]) not in fs.cat(f"{c}/config.yaml").decode()
    stored = 0
    for path in fs.find(root):
        try:
            data = fs.cat(path)
        except FileNotFoundError:  # a listing entry for a marker Ray already removed
            continue
        stored += 1
        assert str(options["secret"]).encode() not in data, path
    assert stored > 10

    # relaunch with more steps: resumes from the step-8 checkpoint in S3
    cfg.train.steps = 12
    summary2 = run_training(cfg, verbose=False)
    assert summary2.metrics["step"] == 12
    latest = max(
        checkpoints(),
        key=lambda p: json.loads(fs.cat(f"{p}/meta.json"))["step"],
    )
    assert json.loads(fs.cat(f"{latest}/meta.json"))["step"] == 12

    capsys.readouterr()
    opts = [f"--storage-option={k}={v}" for k, v in options.items()]
    assert main(["eval", "--checkpoint", f"s3://{latest}", "--batches", "1", *opts]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 12 and 0 < out["loss_bits"] < 8


def test_unreachable_s3_storage_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import StorageError, check_storage

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = load_config(
        "tiny",
        [
            "run.storage_path=s3://nowhere/runs",
            f"data.url=file://{tmp_path}",
            "run.storage_options={endpoint_url: 'http://127.0.0.1:9', key: k, secret: s-9876}",
        ],
    )
    with pytest.raises(StorageError) as err:
        check_storage(cfg)
    assert "s3://nowhere/runs" in str(err.value) and "s-9876" not in str(err.value)
