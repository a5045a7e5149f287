"""``sparse-transformer train | eval | sample``: training and using checkpoints.

``train [--config NAME_OR_PATH] [key=value ...]`` validates the config (failing on
the driver, naming the field), checks the run storage, prepares the data, starts
or joins Ray and runs the TorchTrainer; with no arguments it is the embedded
default (``tiny`` on 2 CPU workers, wiki-sample in ``./runs``).
``eval --checkpoint URL`` reports validation bits per dim/byte and ``sample
--checkpoint URL [--out DIR]`` writes samples in the form of the run's data (text, a
PNG grid of image completions, WAV audio; ``distributed/sample_files.py``) and prints
text, from any saved checkpoint (ZeRO shards are consolidated) or a run folder's newest
complete one. Heavy imports stay inside the handlers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparse_transformer.distributed.sample_files import DataFormat, SampleFile


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``eval`` and ``sample`` sub-commands."""
    p = subparsers.add_parser(
        "train",
        help="train with Ray Train + DeepSpeed (no arguments: the embedded default run)",
        description="Train the Sparse Transformer: Ray Train orchestrates DeepSpeed workers. "
        "Overrides are dotted key=value pairs typed by the config, e.g. train.steps=100 "
        "scaling.num_workers=2 run.storage_path=s3://bucket/runs.",
    )
    p.add_argument("--config", default="tiny", help="config name (configs/NAME.yaml) or path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.set_defaults(func=_train)

    for name, helptext in (
        ("eval", "validation bits per dim/byte of a saved checkpoint"),
        (
            "sample",
            "generate from a saved checkpoint: text, PNG image grids or WAV audio, by "
            "the run's data",
        ),
    ):
        q = subparsers.add_parser(name, help=helptext, description=helptext)
        q.add_argument(
            "--checkpoint",
            required=True,
            help="checkpoint directory, or a run folder for its newest complete checkpoint "
            "(path, file:// or s3://)",
        )
        q.add_argument(
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="fsspec option for s3:// checkpoints/data (e.g. endpoint_url=...)",
        )
        q.add_argument("--device", default="auto", help="cpu, cuda or auto")
        if name == "eval":
            q.add_argument("--data", default="", help="dataset URL (default: the run's)")
            q.add_argument("--split", default="validation")
            q.add_argument("--batches", type=int, default=0, help="0: the whole split")
            q.add_argument("--batch-size", type=int, default=4)
            q.set_defaults(func=_eval)
        else:
            _sample_arguments(q)
            q.set_defaults(func=_sample)


def _train(args: argparse.Namespace) -> int:
    from sparse_transformer.distributed.config import ConfigError, dump_yaml, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"sparse-transformer train: invalid config: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from sparse_transformer.distributed.trainer import (
        DataSetupError,
        StorageError,
        TrainingError,
        run_dir,
        run_training,
    )

    start = time.time()
    try:
        summary = run_training(cfg)
    except KeyboardInterrupt:  # before training started, or a second signal
        print(
            f"sparse-transformer train: stopped at once; a relaunch resumes from the newest "
            f"complete checkpoint in {run_dir(cfg)}",
            file=sys.stderr,
        )
        return 130
    except (ConfigError, DataSetupError) as err:  # found on the driver before training
        print(f"sparse-transformer train: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"sparse-transformer train: {err}", file=sys.stderr)
        return 3
    except TrainingError as err:
        print(f"sparse-transformer train: {err}", file=sys.stderr)
        return 1
    m = summary.metrics
    if summary.stopped:
        print(
            f"[train] stopped by {summary.stopped} at step {m.get('step')} after "
            f"{time.time() - start:.0f} s; checkpoint {summary.checkpoint}. "
            "Run the same command again to resume from it.",
            file=sys.stderr,
        )
        return 143 if summary.stopped == "SIGTERM" else 130
    print(f"[train] finished in {time.time() - start:.0f} s; run folder {summary.run_dir}")
    if summary.checkpoint:
        print(f"[train] last checkpoint: {summary.checkpoint}")
    if "val_loss_bits" in m:
        print(f"[train] validation: {m['val_loss_bits']:.4f} bits per byte")
    if m.get("sample"):
        print("[train] sample:\n" + str(m["sample"]))
    return 0


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _load(args: argparse.Namespace, device: str, options: dict[str, Any] | None) -> Any:
    """(model, meta.json) of ``--checkpoint``; None, after one line naming the folder and
    the file, when it cannot be used (missing, incomplete, unreadable).

    A run folder stands for its newest complete checkpoint, named on stderr."""
    from sparse_transformer.distributed.checkpoint import (
        CheckpointError,
        complete_checkpoints,
        load_model,
    )

    url = args.checkpoint
    try:
        # a checkpoint's own sub-folders hold no meta.json, so this lists only a run folder's
        if found := complete_checkpoints(url, options):
            step, url = found[-1]
            print(
                f"[{args.command}] {args.checkpoint} is a run folder: "
                f"reading its newest complete checkpoint, step {step}: {url}",
                file=sys.stderr,
            )
        return load_model(url, device=device, storage_options=options)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"sparse-transformer {args.command}: {err}", file=sys.stderr)
        return None


def _options(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = value
    return out


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _eval(args: argparse.Namespace) -> int:
    from sparse_transformer.data import StreamingDataset
    from sparse_transformer.distributed import evaluation

    opts = _options(args.storage_option)
    device = _device(args.device)
    loaded = _load(args, device, opts or None)
    if loaded is None:
        return 2
    model, meta = loaded
    url = args.data or meta["data_url"]
    ds = StreamingDataset(
        url,
        split=args.split,
        global_batch_size=args.batch_size,
        shuffle=False,
        rank=0,
        world_size=1,
        batched=True,
        storage_options=opts or None,
    )
    batches = (
        itertools.islice(ds.loader(), args.batches)
        if args.batches
        else _whole_split(ds, args.batch_size)
    )
    sums = evaluation.loss_sums(model, batches, device)
    bits, count = evaluation.bits_per_token(sums), int(sums[1])
    print(
        json.dumps(
            {
                "step": meta["step"],
                "split": args.split,
                "tokens": count,
                "loss_bits": round(bits, 6),
            }
        )
    )
    return 0


def _whole_split(ds: Any, batch_size: int) -> Iterator[Any]:
    """Every sample of the dataset's split once, in storage order, in batches of
    ``batch_size`` with a shorter last one (the loader drops the remainder)."""
    import numpy as np
    import torch

    pending = np.empty((0, ds.seq_len), dtype=np.uint8)
    for index in range(ds.num_shards):
        pending = np.concatenate([pending, ds.load_shard(index)])
        while len(pending) >= batch_size:
            yield torch.from_numpy(pending[:batch_size].astype(np.int64))
            pending = pending[batch_size:]
    if len(pending):
        yield torch.from_numpy(pending.astype(np.int64))


def _sample_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument(
        "--out",
        default="",
        metavar="DIR",
        help="folder for the sample files (default: RUN/samples/stepN beside a local "
        "checkpoint, ./samples/NAME/stepN for a remote one)",
    )
    q.add_argument("--data", default="", help="dataset URL (default: the run's)")
    q.add_argument(
        "--split",
        default="validation",
        help="images/audio: the split whose first examples are the prompts (default validation)",
    )
    q.add_argument("--prompt", default=None, help='text: the bytes to continue (default "The ")')
    q.add_argument(
        "--length",
        type=_count,
        default=None,
        help="text: bytes to generate (default 200); audio: samples generated after each "
        "prompt (default half the window)",
    )
    q.add_argument(
        "--held-out",
        type=_positive,
        default=None,
        help="images/audio: held-out examples to complete (default 4 images, 2 windows)",
    )
    q.add_argument(
        "--completions",
        type=_count,
        default=None,
        help="images/audio: samples per held-out example (default 3 images, 2 windows)",
    )
    q.add_argument(
        "--unconditional",
        type=_count,
        default=0,
        help="images/audio: unconditional samples besides the completions (default 0)",
    )
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument(
        "--top-p", type=float, default=None, help="nucleus mass (default 0.9 text, 1 otherwise)"
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--fast",
        nargs="?",
        const="auto",
        default=None,
        metavar="MODE",
        help="decode with a static cache and a compiled step (model/fast_decode.py; the same "
        "samples): MODE static, compile, graph or compile-blocks (default: compile on a GPU, "
        "static on the CPU)",
    )


def _fast(value: str | None) -> bool | str:
    """``generate``'s ``fast`` argument for ``--fast [MODE]``."""
    if value is None:
        return False
    return True if value == "auto" else value


# sample's defaults per kind of data: (held-out examples, completions of each)
_SAMPLE_COUNTS = {"image": (4, 3), "audio": (2, 2)}


def _sample(args: argparse.Namespace) -> int:
    from sparse_transformer.data import DataError, load_manifest
    from sparse_transformer.distributed import evaluation, sample_files

    opts = _options(args.storage_option) or None
    device = _device(args.device)
    loaded = _load(args, device, opts)
    if loaded is None:
        return 2
    model, meta = loaded
    url = args.data or meta.get("data_url", "")
    try:
        if not url:
            raise ValueError("its checkpoint names no dataset")
        fmt = sample_files.data_format(load_manifest(url, opts))
    except (DataError, OSError, ValueError) as err:
        if args.data:
            print(f"sparse-transformer sample: --data {url}: {err}", file=sys.stderr)
            return 2
        print(
            f"[sample] the run's dataset cannot be read ({err}); sampling text "
            "(--data URL names another copy)",
            file=sys.stderr,
        )
        fmt = sample_files.DataFormat("text", model.config.n_ctx)
    if args.out:
        out_dir = Path(args.out)
    else:
        out_dir = sample_files.default_out_dir(args.checkpoint, int(meta["step"]))
    top_p = args.top_p if args.top_p is not None else (0.9 if fmt.kind == "text" else 1.0)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if fmt.kind == "text":
            data = evaluation.sample_bytes(
                model, (args.prompt if args.prompt is not None else "The ").encode("utf-8"),
                200 if args.length is None else args.length, seed=args.seed,
                device=device, temperature=args.temperature, top_p=top_p, fast=_fast(args.fast),
            )  # fmt: skip
            sys.stdout.write(data.decode("utf-8", errors="replace") + "\n")
            path = sample_files.write_text(out_dir / f"text-seed{args.seed}.txt", data)
            written = [sample_files.SampleFile(path, f"{len(data)} bytes")]
        else:
            written = _sample_media(args, model, fmt, url, opts, out_dir, top_p)
    except (DataError, ValueError) as err:
        print(f"sparse-transformer sample: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"sparse-transformer sample: cannot write the samples: {err}", file=sys.stderr)
        return 1
    for f in written:
        print(f"[sample] wrote {f.path}: {f.what}")
    return 0


def _sample_media(
    args: argparse.Namespace,
    model: Any,
    fmt: DataFormat,
    url: str,
    opts: dict[str, Any] | None,
    out_dir: Path,
    top_p: float,
) -> list[SampleFile]:
    """The image or audio files of ``sample`` (``sample_files``), prompted by the first
    held-out examples of ``args.split``."""
    from sparse_transformer.distributed import sample_files

    unused = [("--prompt", args.prompt)] + (
        [("--length", args.length)] if fmt.kind == "image" else []
    )
    if names := [flag for flag, value in unused if value is not None]:
        print(f"[sample] {' and '.join(names)}: not used for {fmt.kind} data", file=sys.stderr)
    count, per_example = _SAMPLE_COUNTS[fmt.kind]
    count = count if args.held_out is None else args.held_out
    per_example = per_example if args.completions is None else args.completions
    held = sample_files.held_out(url, count, split=args.split, storage_options=opts)
    common = {
        "completions": per_example,
        "unconditional": args.unconditional,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": top_p,
        "fast": _fast(args.fast),
    }
    if fmt.kind == "image":
        return sample_files.write_image_samples(model, fmt, held, out_dir, **common)
    return sample_files.write_audio_samples(
        model, fmt, held, out_dir, length=args.length, split=args.split, **common
    )
