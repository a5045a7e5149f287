"""Checkpoint layout, commit markers, and loading a checkpoint for evaluation or sampling.

One checkpoint is one directory (Ray Train merges what every rank reports)::

    ds/                   DeepSpeed's save_checkpoint (tag "ds"): module, optimizer,
                          loss scaler, LR scheduler; ZeRO shards per rank for stage >= 1
    state/rank{r}.pt      step, data-loader position, torch (and CUDA) RNG state of rank r,
                          the open log window's loss sum over all ranks
    model.pt              consolidated fp32 state dict (rank 0; stages 0-2)
    config.yaml           the run's config, redacted
    meta.json             step, world size, ZeRO stage, precision, model config, data URL
    commit/rank{r}.json   written last by each rank: the step, the world size and the size
                          and sha256 of every file the rank wrote; the checkpoint is
                          complete only when every rank of meta.json's world size has its
                          marker, and intact when every listed file matches

Every load is ``torch.load(..., weights_only=True)``: our files directly, ``ds/``
through DeepSpeed's loaders inside :func:`weights_only_loads` (they ask for
``weights_only=False``), so a crafted checkpoint cannot run code.

A ZeRO checkpoint (stage >= 1) is partitioned by world size; resuming it on another
world size (an elastic group that grew or shrank) or another ZeRO stage goes through
DeepSpeed's universal format (:func:`to_universal`: one fp32 weight and moment file per
parameter), which any partitioning loads. A ZeRO-sharded checkpoint without
``model.pt`` is exported to a consolidated state dict with DeepSpeed's ``zero_to_fp32``.

:class:`Checkpointer` is one rank's side of it during training: find the newest intact
checkpoint of the run, restore an engine from it, and save a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DS_TAG = "ds"
STATE_DIR = "state"
COMMIT_DIR = "commit"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder and the file."""


class IncompleteCheckpointError(CheckpointError):
    """A checkpoint without every rank's commit marker (half-written): never loaded."""


def _deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed's checkpoints pickle besides plain data and tensors: its loss
    scalers (fp16), the ZeRO stage enum and the addresses of parameter fragments."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every ``torch.load`` is ``weights_only=True``, DeepSpeed's own included.

    DeepSpeed's loaders (its checkpoint engine, ``zero_to_fp32``, ``ds_to_universal``)
    call ``torch.load(..., weights_only=False)``, which runs whatever a pickle asks for:
    a crafted checkpoint would run code. Inside this context their loads go through
    PyTorch's restricted unpickler, which lets plain data, tensors and DeepSpeed's own
    bookkeeping classes (:func:`_deepspeed_globals`) through and refuses anything else.
    It swaps ``torch.load`` for the whole process while it lasts.
    """
    original = torch.load
    allowed = _deepspeed_globals()

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def save_rank_state(directory: str | os.PathLike[str], rank: int, state: dict[str, Any]) -> None:
    path = Path(directory, STATE_DIR)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / f"rank{rank}.pt")


def make_meta(
    *,
    step: int,
    world_size: int,
    zero_stage: int,
    precision: str,
    model: dict[str, Any],
    data_url: str,
) -> dict[str, Any]:
    """``meta.json``'s record (:func:`verify_complete` and the loaders read it back)."""
    return {
        "step": step,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "precision": precision,
        "model": model,
        "data_url": data_url,
    }


def write(
    directory: str | os.PathLike[str],
    rank: int,
    *,
    save_engine: Callable[[str], None],
    rank_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    config_yaml: str | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write rank ``rank``'s part of one checkpoint into ``directory``, in the layout the
    module docstring describes, the commit marker last.

    ``save_engine(directory)`` writes DeepSpeed's ``ds/`` (every rank calls it: it is
    collective). Rank 0 passes ``meta`` (:func:`make_meta`), the redacted ``config_yaml``
    and, below ZeRO 3, the consolidated fp32 ``model_state``.
    """
    save_engine(str(directory))
    save_rank_state(directory, rank, rank_state)
    if meta is not None:
        if config_yaml is not None:
            Path(directory, CONFIG_FILE).write_text(config_yaml)
        if model_state is not None:
            torch.save(model_state, Path(directory, MODEL_FILE))
        Path(directory, META_FILE).write_text(json.dumps(meta, indent=1))
    write_commit(directory, rank, rank_state["step"], rank_state["world_size"])


def load_rank_state(directory: str | os.PathLike[str], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s state, or rank 0's when the world shrank (elastic restart)."""
    path = Path(directory, STATE_DIR, f"rank{rank}.pt")
    if not path.exists():
        path = Path(directory, STATE_DIR, "rank0.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_commit(directory: str | os.PathLike[str], rank: int, step: int, world: int) -> None:
    """Rank ``rank``'s commit marker, written last: the step, the world size, and the size
    and sha256 of every file this rank wrote into ``directory`` (its part of the checkpoint
    Ray Train merges), so that a truncated or changed file is told from a good one."""
    d = Path(directory)
    files = {
        str(p.relative_to(d)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.relative_to(d).parts[0] != COMMIT_DIR
    }
    (d / COMMIT_DIR).mkdir(parents=True, exist_ok=True)
    marker = {"step": step, "world_size": world, "files": files}
    (d / COMMIT_DIR / f"rank{rank}.json").write_text(json.dumps(marker, indent=1))


def verify_contents(directory: str | os.PathLike[str]) -> None:
    """Every file the commit markers list is there with its recorded size and sha256;
    a :class:`CheckpointError` naming the file otherwise (markers of checkpoints written
    before sizes were recorded list none)."""
    d = Path(directory)
    for marker in sorted((d / COMMIT_DIR).glob("rank*.json")):
        for name, want in json.loads(marker.read_text()).get("files", {}).items():
            path = d / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint {d}: {name} is missing ({marker.name} lists it)")
            size = path.stat().st_size
            if size != want["size"]:
                raise CheckpointError(
                    f"checkpoint {d}: {name} has {size:,} bytes, {marker.name} recorded "
                    f"{want['size']:,} (truncated or changed)"
                )
            if _sha256(path) != want["sha256"]:
                raise CheckpointError(
                    f"checkpoint {d}: {name} does not match the sha256 {marker.name} recorded"
                )


def _check_complete(read: Callable[[str], bytes], where: str) -> dict[str, Any]:
    """meta.json of the checkpoint whose files ``read(relative path)`` returns (raising
    FileNotFoundError for a missing one); IncompleteCheckpointError unless complete."""
    try:
        meta = json.loads(read(META_FILE))
    except FileNotFoundError:
        raise IncompleteCheckpointError(
            f"checkpoint {where}: no {META_FILE} (incomplete)"
        ) from None
    world, step = int(meta["world_size"]), int(meta["step"])
    for r in range(world):
        try:
            marker = json.loads(read(f"{COMMIT_DIR}/rank{r}.json"))
        except FileNotFoundError:
            raise IncompleteCheckpointError(
                f"checkpoint {where}: rank {r} of {world} has no commit marker (half-written)"
            ) from None
        if int(marker["step"]) != step:
            raise IncompleteCheckpointError(f"checkpoint {where}: rank {r} committed another step")
    return meta


def verify_complete(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a complete checkpoint; raises IncompleteCheckpointError otherwise."""
    d = Path(directory)

    def read(name: str) -> bytes:
        if not (d / name).is_file():
            raise FileNotFoundError(d / name)
        return (d / name).read_bytes()

    if not (d / META_FILE).is_file() and (inside := complete_checkpoints(str(d))):
        raise IncompleteCheckpointError(
            f"{d} is a run folder, not a checkpoint; its newest complete checkpoint is "
            f"{inside[-1][1]} (step {inside[-1][0]})"
        )
    return _check_complete(read, str(d))


def complete_checkpoints(
    run_url: str, storage_options: dict[str, Any] | None = None
) -> list[tuple[int, str]]:
    """(step, URL) of every complete checkpoint in a run folder (local or remote), by step.

    The folder holds Ray Train's ``checkpoint_*`` directories; incomplete or unreadable
    ones are left out. A checkpoint a worker reported just before it died can be here
    although Ray Train never registered it (it takes reports from a queue it polls).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(run_url, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = []
    for meta_path in fs.glob(f"{root.rstrip('/')}/*/{META_FILE}"):
        directory = meta_path.rsplit("/", 1)[0]
        try:
            meta = _check_complete(lambda name, d=directory: fs.cat_file(f"{d}/{name}"), directory)
        except (IncompleteCheckpointError, ValueError, KeyError, OSError):
            continue
        url = directory if protocol in ("file", "local") else f"{protocol}://{directory}"
        found.append((int(meta["step"]), url))
    return sorted(found)


def needs_universal(meta: dict[str, Any], world: int, zero_stage: int) -> bool:
    """Whether DeepSpeed's own loader cannot read this checkpoint's optimizer state here:
    it holds ZeRO partitions (stage >= 1) for another world size, or another stage."""
    saved_stage = int(meta.get("zero_stage", 0))
    if (saved_stage == 0) != (zero_stage == 0):
        raise ValueError(
            f"train.zero_stage: the checkpoint was saved with ZeRO stage {saved_stage} and "
            f"cannot be resumed with stage {zero_stage}; DeepSpeed repartitions optimizer "
            "state between stages 1-3 only (keep stage 0, or keep a stage of 1-3)"
        )
    if saved_stage == 0:
        return False
    return int(meta["world_size"]) != world or saved_stage != zero_stage


def to_universal(directory: str | os.PathLike[str], out_root: str | os.PathLike[str]) -> Path:
    """Convert the DeepSpeed part of a complete checkpoint to the universal format.

    Writes ``out_root/ds`` (and DeepSpeed's ``latest_universal``) and returns
    ``out_root``: load it with ``engine.load_checkpoint(out_root, tag="ds")`` on an
    engine whose config has ``"checkpoint": {"load_universal": true}``.
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    verify_complete(directory)
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        input_folder=str(Path(directory, DS_TAG)),
        output_folder=str(out / DS_TAG),
        num_extract_workers=1,  # in-process: no worker pool inside a training worker
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # checkpoints saved before the info was recorded
    )
    with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():  # its chatter
        ds_to_universal.main(args)
    return out


@contextmanager
def local_copy(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local directory holding the checkpoint at ``url`` (downloaded when remote)."""
    if "://" not in url or url.startswith("file://"):
        path = Path(url[len("file://") :] if url.startswith("file://") else url)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {url}: no such directory")
        yield path
        return
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError(f"checkpoint {url}: no such directory")
    tmp = tempfile.mkdtemp(prefix="st-ckpt-")
    try:
        fs.get(root.rstrip("/") + "/", tmp, recursive=True)
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def consolidated_state_dict(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a complete checkpoint (ZeRO shards are exported)."""
    d = Path(directory)
    verify_complete(d)
    if (d / MODEL_FILE).is_file():
        try:
            return torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"checkpoint {d}: {MODEL_FILE} cannot be read ({err})") from err
    return fp32_master_weights(d)


def fp32_master_weights(directory: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The fp32 weights a ZeRO checkpoint's optimizer shards hold, consolidated with
    DeepSpeed's ``zero_to_fp32`` (inside :func:`weights_only_loads`)."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = Path(directory)
    try:
        with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):  # its chatter
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(d), tag=DS_TAG))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {d}: refused to unpickle {DS_TAG}/: {first}") from err


def load_model(
    url: str, *, device: str | torch.device = "cpu", storage_options: dict[str, Any] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model in eval mode with the checkpoint's weights, meta.json) from any saved checkpoint."""
    from sparse_transformer.model import SparseTransformer, SparseTransformerConfig

    with local_copy(url, storage_options) as d:
        meta = verify_complete(d)
        verify_contents(d)
        state = consolidated_state_dict(d)
    cfg = SparseTransformerConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = SparseTransformer(cfg)
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta


def latest_checkpoint(run_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest complete checkpoint directory in a run folder (local or remote), or None."""
    found = complete_checkpoints(run_dir, storage_options)
    return found[-1][1] if found else None


# -- one rank's side of the protocol: find, restore, save --------------------------------


@dataclass(frozen=True)
class Found:
    """A complete, intact checkpoint to resume from, opened as a local folder."""

    url: str
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


class Checkpointer:
    """One rank's checkpoints of one run: :meth:`find` the newest intact one,
    :meth:`restore` an engine from it, :meth:`save` a new one.

    The run folder, not Ray Train's registry, is the record: Ray takes reports from a
    queue it polls, so a checkpoint reported just before a worker died can be in
    storage, complete, and unknown to it. Commit markers tell complete checkpoints
    apart, and a damaged one (a file changed after its marker) is skipped for the one
    before it.
    """

    def __init__(
        self,
        run_dir: str,
        storage_options: dict[str, Any] | None,
        *,
        rank: int,
        world_size: int,
        local_rank: int,
        zero_stage: int,
        log: Callable[[str], None],
    ) -> None:
        self.run_dir, self.storage_options = run_dir, storage_options
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.zero_stage = zero_stage
        self.log = log  # rank 0's console; the other ranks pass a no-op

    def find(self, stack: ExitStack, registered: str | None) -> Found | None:
        """The newest complete checkpoint whose files match its markers, its local copy
        kept open on ``stack``; None for a fresh start. ``registered``: the folder name
        of the checkpoint Ray Train handed this worker, if any."""
        for step, url in reversed(complete_checkpoints(self.run_dir, self.storage_options)):
            opened = ExitStack()
            local = opened.enter_context(local_copy(url, self.storage_options))
            try:
                verify_contents(local)
            except CheckpointError as err:
                opened.close()
                self.log(f"[train] skipping the checkpoint of step {step}: {err}")
                continue
            stack.push(opened)
            if registered != Path(url).name:
                self.log(
                    f"[train] resuming from a checkpoint Ray Train did not register (step "
                    f"{step}): its report was lost when the worker stopped, or a newer one "
                    "was skipped"
                )
            return Found(url, Path(local), verify_complete(local))
        return None

    def needs_universal(self, found: Found | None) -> bool:
        """Whether ``found`` loads through DeepSpeed's universal format here."""
        return found is not None and needs_universal(found.meta, self.world_size, self.zero_stage)

    def restore(self, stack: ExitStack, engine: Any, found: Found) -> dict[str, Any]:
        """Load ``found`` into ``engine`` (its config set ``load_universal`` when
        :meth:`needs_universal`); returns this rank's saved state."""
        load_dir = found.path
        if self.needs_universal(found):
            load_dir = self._universal_copy(stack, found)
            self.log(
                f"[train] checkpoint of world size {found.meta['world_size']} (ZeRO stage "
                f"{found.meta.get('zero_stage', 0)}) resumed on {self.world_size} worker(s) "
                f"(ZeRO stage {self.zero_stage}) through DeepSpeed's universal format"
            )
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {load_dir}")
        return load_rank_state(found.path, self.rank)

    def _universal_copy(self, stack: ExitStack, found: Found) -> Path:
        """The universal form of ``found``, converted once per node: local rank 0
        converts into a node-local folder, the node's other ranks wait at a barrier; the
        folder is removed on leaving ``stack``, after every rank has loaded."""
        from sparse_transformer.distributed import collectives

        name = hashlib.sha256(found.url.encode()).hexdigest()[:16]
        out = Path(tempfile.gettempdir(), f"st-universal-{name}")
        if self.local_rank == 0:
            shutil.rmtree(out, ignore_errors=True)
            to_universal(found.path, out)
        collectives.barrier()

        def cleanup() -> None:
            collectives.barrier()  # every rank has loaded
            if self.local_rank == 0:
                shutil.rmtree(out, ignore_errors=True)

        stack.callback(cleanup)
        return out

    @contextmanager
    def save(
        self,
        step: int,
        engine: Any,
        rank_state: dict[str, Any],
        rank0_files: Callable[[], dict[str, Any]],
    ) -> Iterator[Path]:
        """Write this rank's part of the checkpoint of ``step`` (:func:`write`) into a
        fresh local folder, yielded for the caller to report; removed afterwards.
        ``rank0_files()`` gives rank 0's ``meta``, ``config_yaml`` and ``model_state``."""
        tmp = Path(tempfile.mkdtemp(prefix=f"st-ckpt-{step:08d}-r{self.rank}-"))
        try:
            write(
                tmp,
                self.rank,
                save_engine=lambda d: engine.save_checkpoint(
                    d, tag=DS_TAG, client_state={"step": step}
                ),
                rank_state=rank_state,
                **(rank0_files() if self.rank == 0 else {}),
            )
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
