"""``sparse-transformer data``: prepare datasets into shards, inspect and verify them.

    sparse-transformer data sources
    sparse-transformer data prepare SOURCE --out URL [--path LOCAL] [--seq-len N] ...
    sparse-transformer data inspect URL [--verify]

Heavy imports (pyarrow, torch) happen inside the handlers so that ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in args.storage_option or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--storage-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    if args.endpoint_url:
        options["endpoint_url"] = args.endpoint_url
    return options


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (else AWS_ENDPOINT_URL); credentials come from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --storage-option key=... secret=...",
    )
    p.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="an fsspec storage option (repeatable; VALUE parsed as JSON when it is JSON)",
    )


def _prepare(args: argparse.Namespace) -> int:
    from sparse_transformer.data.errors import DataError
    from sparse_transformer.data.preparation import prepare

    options: dict[str, Any] = {}
    if args.validation_size is not None:
        options["validation_size"] = args.validation_size
    if args.fractions:
        options["fractions"] = tuple(float(x) for x in args.fractions.split(","))
    if args.sample_rate is not None:
        options["sample_rate"] = args.sample_rate
    if args.no_verify:
        options["verify"] = False
    if args.checksum:
        options["checksums"] = dict(c.split("=", 1) for c in args.checksum)
    path: Any = args.path[0] if args.path and len(args.path) == 1 else args.path
    try:
        manifest = prepare(
            args.source,
            args.out,
            path=path,
            seq_len=args.seq_len,
            shard_bytes=int(args.shard_mb * (1 << 20)),
            compression=args.compression,
            splits=tuple(args.splits.split(",")),
            storage_options=_storage_options(args),
            cache_dir=args.cache_dir,
            download=not args.no_download,
            overwrite=not args.reuse_existing,
            **options,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_summary(manifest)
    return 0


def _print_summary(manifest: Any) -> None:
    print(f"dataset   {manifest.url}")
    print(f"source    {manifest.source.get('name')}")
    print(f"tokenizer {manifest.tokenizer.get('description')}")
    print(f"seq_len   {manifest.seq_len}")
    for name, split in manifest.splits.items():
        print(
            f"  {name:<10} {split.num_samples:>9,} samples  {len(split.shards):>4} shards  "
            f"{split.num_bytes / 2**20:>9.1f} MiB  (dropped {split.dropped_tokens:,} tokens)"
        )


def _inspect(args: argparse.Namespace) -> int:
    from sparse_transformer.data.errors import DataError
    from sparse_transformer.data.manifest import load_manifest

    try:
        manifest = load_manifest(args.url, _storage_options(args))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(manifest.to_json(), end="")
    else:
        _print_summary(manifest)
    if not args.verify:
        return 0
    from sparse_transformer.data.stream import StreamingDataset

    failures = 0
    for name in manifest.splits:
        if args.split and name != args.split:
            continue
        ds = StreamingDataset(
            args.url,
            split=name,
            global_batch_size=1,
            rank=0,
            world_size=1,
            storage_options=_storage_options(args),
        )
        for i, shard in enumerate(manifest.splits[name].shards):
            try:
                ds.load_shard(i)
            except (DataError, OSError) as e:
                failures += 1
                print(f"BAD {name}/{i}: {e}")
            else:
                print(f"ok  {shard.path} sha256 {shard.sha256[:16]}... {shard.num_samples} samples")
    print("verified: all shards match the manifest" if not failures else f"{failures} bad shards")
    return 1 if failures else 0


def _sources(args: argparse.Namespace) -> int:
    from sparse_transformer.data.sources import SOURCES

    for name, (_, _, description) in SOURCES.items():
        print(f"{name:<14} {description}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its actions to the top-level command's sub-parsers."""
    data = subparsers.add_parser(
        "data",
        help="prepare raw data into Parquet shards; inspect and verify datasets",
        description="Prepare raw sources into sharded datasets in object storage; inspect them.",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    p = actions.add_parser(
        "prepare",
        help="write a source as Parquet shards plus manifest.json",
        description="Write SOURCE as fixed-length uint8 sequences in Parquet shards plus a "
        "manifest, to any fsspec URL (file://, s3://, gs://, memory://, or a path).",
    )
    p.add_argument(
        "source", help="enwik8, wiki-sample, text, cifar10, imagenet64, fashion-mnist, audio"
    )
    p.add_argument("--out", required=True, help="dataset directory URL")
    p.add_argument("--path", nargs="+", help="local copy of the source (file(s) or directory)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (text 12288, audio 65536)")
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MiB (default 64)")
    p.add_argument("--compression", default="zstd", help="zstd (default), snappy, gzip, none")
    p.add_argument("--splits", default="train,validation,test", help="comma-separated splits")
    p.add_argument("--validation-size", type=int, help="images held out from train")
    p.add_argument("--fractions", help="text/audio split fractions, e.g. 0.9,0.05,0.05")
    p.add_argument("--sample-rate", type=int, help="audio sample rate (default 12000)")
    p.add_argument("--cache-dir", help="download cache (default ~/.cache/sparse-transformer)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.add_argument("--no-verify", action="store_true", help="enwik8: skip the md5 check")
    p.add_argument(
        "--reuse-existing",
        action="store_true",
        help="keep a complete dataset already at --out made from the same source",
    )
    p.add_argument(
        "--checksum", action="append", metavar="FILE=SHA256", help="imagenet64 download checksums"
    )
    _add_storage_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_run(_prepare))

    p = actions.add_parser(
        "inspect", help="print a dataset's manifest; --verify checks every shard"
    )
    p.add_argument("url", help="dataset directory or manifest.json URL")
    p.add_argument("--verify", action="store_true", help="download and check every shard")
    p.add_argument("--split", help="only verify this split")
    p.add_argument("--json", action="store_true", help="print the manifest JSON")
    _add_storage_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    p.set_defaults(func=_run(_inspect))

    p = actions.add_parser("sources", help="list the sources prepare knows")
    p.set_defaults(func=_run(_sources))


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return handler(args)

    return run
