"""Streaming throughput of ``StreamingDataset``: SeaweedFS on loopback vs local files, 1-2 readers.

    python -m sparse_transformer.benchmarks.data [--mb 1024] [--readers 1,2] [--write-docs]
    sparse-transformer bench data [...]

Writes ``--mb`` MiB of random bytes (incompressible: the worst case for
bandwidth) as a text dataset of ``--seq-len`` byte sequences in ``--shard-mb``
shards, once to a local directory and once to a SeaweedFS server it starts on
127.0.0.1 (or to ``--endpoint-url``). Then, for each store and each reader
count R, R processes each stream one epoch as rank r of R, batched, as int64
tensors (what the trainer consumes), and the benchmark reports sustained
samples/s and MB/s of tokens delivered, summed over readers, plus MB/s fetched
from storage (each reader fetches every shard of its windows, so R readers
fetch R times the data). ``--write-docs`` replaces the "## Data streaming"
section of docs/benchmarks.md with the results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Data streaming"


def _reader(
    url: str,
    storage_options: dict[str, Any],
    rank: int,
    world: int,
    args: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    import torch

    from sparse_transformer.data import StreamingDataset

    ds = StreamingDataset(
        url,
        global_batch_size=args["local_batch"] * world,
        rank=rank,
        world_size=world,
        seed=0,
        batched=True,
        dtype=torch.int64,
        shuffle_window=args["shuffle_window"],
        prefetch=args["prefetch"],
        num_threads=args["threads"],
        storage_options=storage_options,
    )
    barrier.wait()
    t0 = time.perf_counter()
    samples = 0
    checksum = 0
    for batch in ds:
        samples += batch.shape[0]
        checksum += int(batch[:, 0].sum())  # touch the data
    elapsed = time.perf_counter() - t0
    results.put(
        {
            "rank": rank,
            "samples": samples,
            "tokens": samples * ds.seq_len,
            "seconds": elapsed,
            "checksum": checksum,
            **ds.stats.as_dict(),
        }
    )


def run_readers(
    url: str, storage_options: dict[str, Any], world: int, args: dict[str, Any]
) -> dict:
    """Stream one epoch with ``world`` reader processes; aggregate their throughput."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(world)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(url, storage_options, r, world, args, barrier, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"reader exited with {p.exitcode}")
    wall = max(r["seconds"] for r in out)
    tokens = sum(r["tokens"] for r in out)
    fetched = sum(r["bytes_fetched"] for r in out)
    return {
        "readers": world,
        "samples": sum(r["samples"] for r in out),
        "seconds": wall,
        "samples_per_s": sum(r["samples"] for r in out) / wall,
        "delivered_mb_per_s": tokens / wall / 1e6,
        "fetched_mb_per_s": fetched / wall / 1e6,
        "max_shards_held": max(r["max_shards_held"] for r in out),
    }


def _prepare(raw: Path, url: str, options: dict[str, Any], a: argparse.Namespace) -> None:
    from sparse_transformer.data import prepare

    prepare(
        "text",
        url,
        path=str(raw),
        seq_len=a.seq_len,
        shard_bytes=int(a.shard_mb * (1 << 20)),
        fractions=(1.0, 0.0, 0.0),
        storage_options=options,
        splits=("train",),
    )


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| store | readers | samples/s | MB/s delivered | MB/s fetched | epoch s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['readers']} | {r['samples_per_s']:,.0f} | "
            f"{r['delivered_mb_per_s']:,.0f} | {r['fetched_mb_per_s']:,.0f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def write_docs(text: str, path: Path = REPO / "docs" / "benchmarks.md") -> None:
    """Replace (or append) the "## Data streaming" section of ``path``, leaving the rest."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(SECTION + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        rest = old[nxt + 1 :] if nxt >= 0 else ""
        new = old[:start] + text.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a Markdown table."""
    p = argparse.ArgumentParser(prog="sparse-transformer bench data", description=__doc__)
    p.add_argument("--mb", type=int, default=1024, help="dataset size in MiB (default 1024)")
    p.add_argument("--seq-len", type=int, default=12_288, help="bytes per sample (enwik8's)")
    p.add_argument("--shard-mb", type=float, default=64, help="shard size in MiB")
    p.add_argument("--local-batch", type=int, default=8, help="samples per reader per batch")
    p.add_argument("--readers", default="1,2", help="reader counts to run, e.g. 1,2")
    p.add_argument("--shuffle-window", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stores", default="s3,local", help="which of s3,local to run")
    p.add_argument("--endpoint-url", help="use this S3 endpoint instead of starting SeaweedFS")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    a = p.parse_args(argv)
    readers = [int(x) for x in a.readers.split(",")]
    stores = a.stores.split(",")
    import numpy as np

    cfg = {
        "local_batch": a.local_batch,
        "shuffle_window": a.shuffle_window,
        "prefetch": a.prefetch,
        "threads": a.threads,
    }
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        raw = Path(tmp) / "random.bin"
        rng = np.random.default_rng(0)
        with open(raw, "wb") as f:
            for _ in range(a.mb):
                f.write(rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())
        server = None
        try:
            targets: list[tuple[str, str, dict[str, Any]]] = []
            if "s3" in stores:
                if a.endpoint_url:
                    options = {"endpoint_url": a.endpoint_url}
                    bucket = "s3://sparse-bench"
                else:
                    if str(REPO.parent) not in sys.path:
                        sys.path.insert(0, str(REPO))
                    from tests.s3server import SeaweedS3  # the test suite's server manager

                    server = SeaweedS3(Path(tmp) / "seaweedfs")
                    server.start()
                    options = dict(server.storage_options)
                    bucket = server.make_bucket("sparse-bench")
                targets.append(("SeaweedFS S3 (loopback)", f"{bucket}/random", options))
            if "local" in stores:
                targets.append(("local files", f"file://{tmp}/local", {}))
            for store, url, options in targets:
                t0 = time.perf_counter()
                _prepare(raw, url, options, a)
                print(f"prepared {a.mb} MiB to {store} in {time.perf_counter() - t0:.1f} s")
                for world in readers:
                    r = run_readers(url, options, world, cfg)
                    r["store"] = store
                    rows.append(r)
                    print(_table([r]).splitlines()[-1], flush=True)
        finally:
            if server is not None:
                server.stop()
    table = _table(rows)
    print()
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if a.write_docs:
        cmd = "python -m sparse_transformer.benchmarks.data " + " ".join(argv or sys.argv[1:])
        text = "\n".join(
            [
                SECTION,
                "",
                f"Command: `{cmd.strip()}` (also `sparse-transformer bench data`).",
                "",
                f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python "
                f"{platform.python_version()}; SeaweedFS and the readers share the cores. Data: "
                f"{a.mb} MiB of random bytes (incompressible), {a.seq_len}-byte samples "
                f"(enwik8's context) in {a.shard_mb:g} MiB zstd Parquet shards; each reader is one "
                f"process = one rank, local batch {a.local_batch}, int64 tensors out, shuffle "
                f"window {a.shuffle_window} shards, prefetch {a.prefetch} shards, "
                f"{a.threads} fetch threads, sha256 verified. Rates are summed over readers; "
                "'fetched' counts shard bytes read from storage (each rank reads every shard "
                "of its windows: the order is world-size independent).",
                "",
                table,
                "",
                "Goal: at least 50 MB/s from SeaweedFS. One GPU training the enwik8 model "
                "(95M parameters, 12,288-token samples) takes on the order of 1e5 tokens/s, "
                "about 0.1 MB/s of uint8 tokens (0.8 MB/s as int64): the loader is never the "
                "bottleneck.",
            ]
        )
        write_docs(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
