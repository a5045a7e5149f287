"""Finding the checkpoint to resume from in a run folder, local or in S3.

Ray Train registers a checkpoint when its controller polls the worker's report; a worker
that dies right after reporting leaves a complete checkpoint in storage that Ray Train
never registered (seen on the CPU: a run killed one step after its checkpoint restarted
from step 0). The worker resumes from the newest complete checkpoint in the run folder,
told apart by the per-rank commit markers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_transformer.distributed.checkpoint import (
    COMMIT_DIR,
    META_FILE,
    IncompleteCheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    verify_complete,
)


def write_checkpoint(put, name: str, step: int, world: int, committed: list[int] | None = None,
                     committed_step: int | None = None) -> None:  # fmt: skip
    """A checkpoint folder's bookkeeping files through ``put(relative path, text)``."""
    put(f"{name}/{META_FILE}", json.dumps({"step": step, "world_size": world}))
    for r in range(world) if committed is None else committed:
        marker = {"step": step if committed_step is None else committed_step, "world_size": world}
        put(f"{name}/{COMMIT_DIR}/rank{r}.json", json.dumps(marker))


def populate(put) -> None:
    write_checkpoint(put, "checkpoint_a", 8, 2)
    write_checkpoint(put, "checkpoint_b", 16, 2)  # complete: the one to resume from
    write_checkpoint(put, "checkpoint_c", 24, 2, committed=[0])  # rank 1 never committed
    write_checkpoint(put, "checkpoint_d", 20, 1, committed_step=12)  # a stale marker
    put("checkpoint_e/ds/mp_rank_00_model_states.pt", "no meta.json: half-written")
    put("checkpoint_f/meta.json", "{not json")


def test_local_run_folder(tmp_path: Path) -> None:
    def put(rel: str, text: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)

    populate(put)
    found = complete_checkpoints(str(tmp_path))
    assert found == [(8, str(tmp_path / "checkpoint_a")), (16, str(tmp_path / "checkpoint_b"))]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint_b")
    assert verify_complete(found[-1][1])["step"] == 16
    with pytest.raises(IncompleteCheckpointError, match="rank 1 of 2 has no commit marker"):
        verify_complete(tmp_path / "checkpoint_c")
    with pytest.raises(IncompleteCheckpointError, match="rank 0 committed another step"):
        verify_complete(tmp_path / "checkpoint_d")
    with pytest.raises(IncompleteCheckpointError, match="no meta.json"):
        verify_complete(tmp_path / "checkpoint_e")
    assert complete_checkpoints(str(tmp_path / "empty")) == []
    assert latest_checkpoint(str(tmp_path / "empty")) is None


def test_run_folder_in_s3(s3: tuple[str, dict[str, object]]) -> None:
    import fsspec

    bucket, options = s3
    fs = fsspec.filesystem("s3", **options)
    root = f"{bucket}/runs/r1"
    populate(lambda rel, text: fs.pipe_file(f"{root}/{rel}", text.encode()))
    found = complete_checkpoints(root, dict(options))
    assert found == [(8, f"{root}/checkpoint_a"), (16, f"{root}/checkpoint_b")]


def test_commit_markers_record_each_files_size_and_hash(tmp_path: Path) -> None:
    from sparse_transformer.distributed.checkpoint import (
        CheckpointError,
        verify_contents,
        write_commit,
    )

    ckpt = tmp_path / "c"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"w" * 5000)
    (ckpt / META_FILE).write_text(json.dumps({"step": 3, "world_size": 1}))
    write_commit(ckpt, 0, 3, 1)
    marker = json.loads((ckpt / COMMIT_DIR / "rank0.json").read_text())
    assert marker["step"] == 3 and sorted(marker["files"]) == ["ds/mp_rank_00_model_states.pt",
                                                                 META_FILE]  # fmt: skip
    assert marker["files"][META_FILE]["size"] == len((ckpt / META_FILE).read_bytes())
    verify_complete(ckpt)
    verify_contents(ckpt)

    model = ckpt / "ds" / "mp_rank_00_model_states.pt"
    model.write_bytes(b"w" * 2500)  # truncated after the marker was written
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt has 2,500 bytes"):
        verify_contents(ckpt)
    model.write_bytes(b"w" * 4999 + b"x")  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match the sha256"):
        verify_contents(ckpt)
    model.unlink()
    with pytest.raises(CheckpointError, match="is missing"):
        verify_contents(ckpt)

    # a marker written before sizes were recorded lists no files: nothing to compare
    (ckpt / COMMIT_DIR / "rank0.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    verify_contents(ckpt)


def test_the_checkpointer_writes_the_format_it_reads(tmp_path: Path) -> None:
    """``checkpoint.write`` lays one checkpoint out as the module documents it: every
    rank's DeepSpeed part and state, rank 0's meta, config and model, the commit markers
    last; it is complete only once every rank of the world has written its part."""
    from sparse_transformer.distributed import checkpoint as ckpt

    def save_engine(rank: int):
        def save(directory: str) -> None:
            Path(directory, ckpt.DS_TAG).mkdir(exist_ok=True)
            Path(directory, ckpt.DS_TAG, f"shard{rank}.pt").write_bytes(b"x" * (rank + 1))

        return save

    meta = ckpt.make_meta(step=8, world_size=2, zero_stage=1, precision="fp32",
                          model={"n_layers": 1}, data_url="file:///d")  # fmt: skip
    model_state = {"w": torch.ones(2)}
    for rank in (0, 1):
        extra = {"meta": meta, "config_yaml": "run: {}\n", "model_state": model_state}
        ckpt.write(
            tmp_path, rank, save_engine=save_engine(rank),
            rank_state={"step": 8, "world_size": 2, "rank": rank},
            **(extra if rank == 0 else {}),
        )  # fmt: skip
        if rank == 0:  # one rank of two: not complete yet
            with pytest.raises(ckpt.IncompleteCheckpointError):
                ckpt.verify_complete(tmp_path)
    assert ckpt.verify_complete(tmp_path) == meta
    assert ckpt.load_rank_state(tmp_path, 1) == {"step": 8, "world_size": 2, "rank": 1}
    assert torch.equal(ckpt.consolidated_state_dict(tmp_path)["w"], torch.ones(2))
    assert (tmp_path / ckpt.CONFIG_FILE).read_text() == "run: {}\n"
