"""A real 2-worker Ray Train + DeepSpeed run on the CPU: the loss falls, checkpoints are
complete and redacted, a relaunch resumes from the last one, eval/sample read it back,
and a worker exception reaches the driver with its rank.

The helpers here (a small model config, a prepared text dataset, a local Ray instance on
127.0.0.1) are shared with tests/test_recovery.py.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from sparse_transformer.benchmarks.faults import KillAt, OverflowAt
from sparse_transformer.cli import main
from sparse_transformer.distributed.config import Config

# A 2-layer, 32-wide model with n = 64 = 8 x 8, dropout on (so the RNG state matters)
# and block recomputation (the model's activation checkpointing) on.
SMALL_MODEL = {
    "n_layers": 2,
    "d_model": 32,
    "n_heads": 2,
    "ff_mult": 4,
    "qk_mult": 1,
    "vocab_size": 256,
    "n_ctx": 64,
    "pattern": "fixed",
    "stride": 8,
    "summary": 4,
    "head_mode": "merged",
    "distinct_summary": True,
    "block_q": 8,
    "block_k": 8,
    "embed_shape": [8, 8],
    "dropout": 0.1,
    "recompute": "block",
    "attention_backend": "auto",
}

_VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "sparse transformer attention factorized stride block memory sequence model data"
)
WORDS = _VOCAB.split(" ")


def make_text(path: Path, n_bytes: int = 120_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_bytes:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        sentence = sentence.capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    path.write_text("".join(out))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from sparse_transformer.data import prepare

    d = tmp_path_factory.mktemp("train-data")
    make_text(d / "corpus.txt")
    url = f"file://{d}/ds"
    prepare("text", url, path=str(d / "corpus.txt"), seq_len=64, shard_bytes=64 * 256)
    return url


def small_config_doc(storage: Path, data_url: str, name: str, **train: object) -> dict:
    return {
        "model": dict(SMALL_MODEL),
        "data": {
            "url": data_url,
            "prepare": False,
            "global_batch_size": 4,
            "eval_batch_size": 4,
            "num_threads": 1,
        },
        "train": {
            "steps": 24,
            "lr": 3e-3,
            "warmup_steps": 4,
            "min_lr_ratio": 0.1,
            "log_every": 4,
            "eval_every": 12,
            "eval_batches": 2,
            "checkpoint_every": 8,
            "sample_length": 16,
            "deterministic": True,
            "torch_threads": 1,
            "record_batches": True,
            **train,
        },
        "scaling": {"num_workers": 2, "use_gpu": False},
        "run": {
            "name": name,
            "storage_path": str(storage),
            "max_failures": 1,
            "num_to_keep": 2,
            "dashboard": False,
            "num_cpus": 2,
        },
    }


def small_config(storage: Path, data_url: str, name: str, **train: object) -> Config:
    return Config.from_dict(small_config_doc(storage, data_url, name, **train))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray instance on loopback for the module's in-process runs."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sparse_transformer.distributed.loopback import confine_to_loopback, private_auth_token
    from sparse_transformer.distributed.trainer import ray_environment

    confine_to_loopback()
    private_auth_token()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": ray_environment()},
    )
    try:
        yield
    finally:
        ray.shutdown()


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    from sparse_transformer.distributed.checkpoint import consolidated_state_dict

    return consolidated_state_dict(checkpoint)


def consumed(run_dir: Path) -> tuple[dict[tuple[int, int], str], int]:
    """({(step, rank): digest of the batch that counted}, number of batches read)."""
    last: dict[tuple[int, int], str] = {}
    n = 0
    for f in sorted((run_dir / "batches").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            last[(e["step"], e["rank"])] = e["batch"]  # a re-run step replaces the lost one
            n += 1
    return last, n


@pytest.mark.slow
def test_two_workers_train_resume_eval_sample(
    small_dataset: str, tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from sparse_transformer.distributed.checkpoint import verify_complete
    from sparse_transformer.distributed.trainer import run_training

    cfg = small_config(tmp_path, small_dataset, "run", steps=16)
    cfg.run.storage_options = {"endpoint_url": "http://127.0.0.1:1", "secret": "hunter2-xyz"}
    summary = run_training(cfg, verbose=False, hooks=[OverflowAt(5)])
    run_dir = tmp_path / "run"
    h = history(run_dir)
    losses = [m["loss_bits"] for m in h if "loss_bits" in m]
    assert [m["step"] for m in h if "loss_bits" in m] == [4, 8, 12, 16]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns (8 bits at the start)
    last = h[-1]
    # the overflowed step was skipped and counted, never applied
    assert [m["skipped_steps"] for m in h if "loss_bits" in m] == [0, 1, 1, 1]
    assert all(math.isfinite(m["loss_bits"]) for m in h if "loss_bits" in m)
    assert all(torch.isfinite(w).all() for w in final_weights(summary.checkpoint).values())
    ds_state = torch.load(
        Path(summary.checkpoint, "ds", "mp_rank_00_model_states.pt"),
        map_location="cpu",
        weights_only=True,
    )
    adam_steps = {float(s["step"]) for s in ds_state["optimizer"]["state"].values()}
    assert adam_steps == {15.0}  # 16 steps, one without an optimizer update
    assert last["loss_scale"] == 1.0
    assert last["grad_norm"] > 0 and last["tokens_per_second"] > 0
    assert last["samples_per_second"] > 0 and 0 <= last["data_wait_fraction"] < 1
    assert last["peak_memory_bytes"] > 0 and last["learning_rate"] > 0
    assert 0 < summary.metrics["val_loss_bits"] < 8
    assert isinstance(summary.metrics["sample"], str) and summary.metrics["sample"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    # the checkpoint: complete, two ranks committed, the config redacted everywhere
    ckpt = Path(summary.checkpoint)
    meta = verify_complete(ckpt)
    assert meta["step"] == 16 and meta["world_size"] == 2
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == ["rank0.pt", "rank1.pt"]
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert saved["run"]["storage_options"]["secret"] == "***"
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert b"hunter2-xyz" not in f.read_bytes(), f

    # relaunch with the same name and storage and more steps: it resumes at step 16
    cfg2 = small_config(tmp_path, small_dataset, "run", steps=24)
    summary2 = run_training(cfg2, verbose=False)
    h2 = history(run_dir)[len(h) :]
    assert [m["step"] for m in h2 if "loss_bits" in m] == [20, 24]
    assert [m["skipped_steps"] for m in h2 if "loss_bits" in m] == [1, 1]  # restored count
    assert verify_complete(summary2.checkpoint)["step"] == 24
    batches, n_read = consumed(run_dir)
    assert sorted(batches) == [(s, r) for s in range(24) for r in (0, 1)]
    assert n_read == 48  # no batch was read twice or skipped across the relaunch

    # eval and sample work from the saved checkpoint
    capsys.readouterr()
    assert main(["eval", "--checkpoint", summary2.checkpoint, "--batches", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 24 and 0 < result["loss_bits"] < 8
    assert main(["sample", "--checkpoint", summary2.checkpoint, "--length", "20"]) == 0
    assert capsys.readouterr().out.startswith("The ")
    # a run folder stands for its newest complete checkpoint, named on stderr
    assert main(["eval", "--checkpoint", str(run_dir), "--batches", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert f"newest complete checkpoint, step 24: {summary2.checkpoint}" in err
    # the whole split (no --batches) counts every sample, the last short batch too
    from sparse_transformer.data import load_manifest

    n_val = load_manifest(small_dataset).split("validation").num_samples
    size = n_val // 2 + 1  # never divides n_val: a short last batch
    assert main(["eval", "--checkpoint", str(run_dir), "--batch-size", str(size)]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert whole["tokens"] == n_val * (SMALL_MODEL["n_ctx"] - 1)


@pytest.mark.slow
def test_worker_exception_reaches_the_driver_with_rank(
    small_dataset: str, tmp_path: Path, local_ray: None
) -> None:
    from sparse_transformer.distributed.trainer import TrainingError, run_training

    # a dataset of another sequence length: the workers fail on their first check
    cfg = small_config(tmp_path, small_dataset, "bad", steps=4)
    doc = cfg.to_dict()
    doc["data"]["seq_len"] = 32
    doc["run"]["max_failures"] = 0
    with pytest.raises(TrainingError) as err:
        run_training(Config.from_dict(doc), verbose=False)
    # Ray Train fails the run on the first health poll that sees an error: one rank or both
    failed = sorted(err.value.worker_failures)
    assert failed and set(failed) <= {0, 1}
    lines = str(err.value).splitlines()
    # every failed rank's cause on its own line, however long the tracebacks are
    for rank in failed:
        line = next(x for x in lines if x.startswith(f"  rank {rank}: "))
        assert line.startswith(f"  rank {rank}: ValueError: data.seq_len: the dataset")
    assert f"worker traceback (rank {failed[0]})" in str(err.value)


def no_dropout(storage: Path, data_url: str, name: str, steps: int, **train: object) -> Config:
    """A run without dropout, so that runs of any world size are comparable (each rank
    draws its own dropout stream), checkpointing every 2 steps."""
    doc = small_config_doc(
        storage, data_url, name, steps=steps, checkpoint_every=2, record_batches=False, **train
    )
    doc["model"]["dropout"] = 0.0
    return Config.from_dict(doc)


def checkpoint_at(run_dir: str, step: int) -> Path:
    """The run's kept checkpoint of ``step``."""
    from sparse_transformer.distributed.checkpoint import META_FILE

    for meta in Path(run_dir).glob(f"checkpoint_*/{META_FILE}"):
        if json.loads(meta.read_text())["step"] == step:
            return meta.parent
    raise AssertionError(f"no checkpoint of step {step} in {run_dir}")


def assert_same_weights(a: str | Path, b: str | Path) -> None:
    """Equal up to the order of fp32 reductions (a few Adam steps from identical starts)."""
    from sparse_transformer.distributed.checkpoint import consolidated_state_dict

    wa, wb = consolidated_state_dict(a), consolidated_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wb:
        torch.testing.assert_close(
            wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


@pytest.fixture(scope="module")
def zero2_run(small_dataset: str, tmp_path_factory: pytest.TempPathFactory, local_ray: None):
    """Eight uninterrupted fp32 steps with ZeRO stage 2 on 2 CPU workers, checkpoints at
    steps 6 and 8 kept: the reference of the ZeRO and elastic tests."""
    from sparse_transformer.distributed.trainer import run_training

    cfg = no_dropout(tmp_path_factory.mktemp("zero2"), small_dataset, "zero2", 8, zero_stage=2)
    return run_training(cfg, verbose=False)


@pytest.mark.slow
def test_zero2_sharded_checkpoint_exports_a_consolidated_state_dict(
    zero2_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ZeRO stage 2 on 2 CPU workers: each rank saves its optimizer shard; DeepSpeed's
    zero_to_fp32 export of the shards equals the consolidated weights, and eval reads a
    checkpoint that has only the shards."""
    import shutil

    from sparse_transformer.distributed.checkpoint import MODEL_FILE, consolidated_state_dict

    ckpt = Path(zero2_run.checkpoint)
    shards = sorted(p.name for p in (ckpt / "ds").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2
    full = consolidated_state_dict(ckpt)
    sharded = tmp_path / "shards-only"
    shutil.copytree(ckpt, sharded)
    (sharded / MODEL_FILE).unlink()  # as if never written (a ZeRO-3 checkpoint has none):
    marker = sharded / "commit" / "rank0.json"  # rank 0's marker no longer lists it
    recorded = json.loads(marker.read_text())
    del recorded["files"][MODEL_FILE]
    marker.write_text(json.dumps(recorded))
    exported = consolidated_state_dict(sharded)  # zero_to_fp32 from the optimizer shards
    assert exported.keys() == full.keys()
    assert all(torch.equal(exported[k], full[k]) for k in full)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(sharded), "--batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 8 and 0 < result["loss_bits"] < 8


@pytest.mark.slow
def test_zero3_trains_the_zero2_model_and_recovers_exactly(
    zero2_run, small_dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ZeRO stage 3 (parameters partitioned, gathered in every forward) on 2 CPU workers,
    rank 1 killed at step 6 and the group restarted by Ray Train: the step-6 checkpoint
    holds the ZeRO-2 weights up to fp32 reduction order, eval reads its parameter shards,
    the recovered run ends on the uninterrupted run's weights, and the end-of-run sample
    (decoded by all ranks in lockstep) is reported."""
    from sparse_transformer.distributed.checkpoint import MODEL_FILE
    from sparse_transformer.distributed.trainer import run_training

    cfg = no_dropout(tmp_path, small_dataset, "zero3", 8, zero_stage=3)
    summary = run_training(cfg, verbose=False, hooks=[KillAt(6, rank=1)])
    assert Path(summary.run_dir, ".fault-injected").exists()
    assert summary.metrics["step"] == 8 and summary.metrics["sample"].startswith("The ")
    assert_same_weights(summary.checkpoint, zero2_run.checkpoint)
    assert summary.metrics["loss_bits"] == pytest.approx(zero2_run.metrics["loss_bits"], rel=1e-5)
    at6 = checkpoint_at(summary.run_dir, 6)
    assert not (at6 / MODEL_FILE).exists()  # stage 3 keeps only the shards
    assert len(list((at6 / "ds").glob("zero_pp_rank_*_model_states.pt"))) == 2
    assert_same_weights(at6, checkpoint_at(zero2_run.run_dir, 6))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(at6), "--batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 6 and 0 < result["loss_bits"] < 8


@pytest.mark.slow
def test_elastic_group_starts_with_what_fits_and_resumes_on_more_workers(
    zero2_run, small_dataset: str, tmp_path: Path
) -> None:
    """``scaling.min_workers`` makes ScalingConfig(num_workers=(min, max)). With 2 CPUs per
    worker on this 2-CPU cluster only one worker fits: the elastic group trains with world
    size 1, and its step-6 weights equal the 2-worker run's (the global batch order does
    not depend on the world size). Its worker dies at step 6 (no retries); relaunched with
    1 CPU per worker, the run resumes the world-1 ZeRO-2 checkpoint on 2 workers
    (DeepSpeed's universal format repartitions the optimizer state) and ends on the
    uninterrupted 2-worker run's weights."""
    from sparse_transformer.distributed.checkpoint import META_FILE
    from sparse_transformer.distributed.trainer import build_trainer, run_training

    cfg = no_dropout(tmp_path, small_dataset, "elastic", 8, zero_stage=2)
    cfg.run.max_failures = 0
    cfg.scaling.min_workers, cfg.scaling.num_workers = 1, 2
    cfg.scaling.cpus_per_worker = 2.0
    assert build_trainer(cfg).scaling_config.num_workers == (1, 2)
    with pytest.raises(Exception, match="rank 0"):
        run_training(cfg, verbose=False, hooks=[KillAt(6, rank=0)])
    at6 = checkpoint_at(str(tmp_path / "elastic"), 6)
    assert json.loads((at6 / META_FILE).read_text())["world_size"] == 1
    assert_same_weights(at6, checkpoint_at(zero2_run.run_dir, 6))

    cfg.scaling.cpus_per_worker = 1.0
    again = run_training(cfg, verbose=False)
    # resumed, not restarted: steps 1-4 were logged once (a fresh start would log 4 again)
    assert [m["step"] for m in history(Path(again.run_dir)) if "loss_bits" in m] == [4, 8]
    meta = json.loads((Path(again.checkpoint) / META_FILE).read_text())
    assert meta["world_size"] == 2 and meta["step"] == 8
    assert_same_weights(again.checkpoint, zero2_run.checkpoint)
    assert again.metrics["loss_bits"] == pytest.approx(zero2_run.metrics["loss_bits"], rel=1e-5)
