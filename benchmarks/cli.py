"""``sparse-transformer bench``: run the benchmarks from the command line."""

from __future__ import annotations

import argparse

BENCHMARKS = {
    "layouts": "sparse_transformer.benchmarks.layouts",
    "attention-cpu": "sparse_transformer.benchmarks.attention_cpu",
    "attention": "sparse_transformer.benchmarks.attention",
    "attention-host": "sparse_transformer.benchmarks.attention_host",
    "data": "sparse_transformer.benchmarks.data",
    "train-step": "sparse_transformer.benchmarks.train_step",
    "sampling": "sparse_transformer.benchmarks.sampling",
    "reproduce": "sparse_transformer.benchmarks.reproduce",
    "scaling": "sparse_transformer.benchmarks.scaling",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench NAME [ARGS...]``."""
    p = sub.add_parser(
        "bench",
        help="run a benchmark (layouts, attention-cpu, attention, data, train-step, sampling, "
        "reproduce, scaling)",
        description="Run one of the benchmarks in benchmarks/; arguments after the name go to it "
        "(try `sparse-transformer bench NAME --help`).",
    )
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHMARKS[args.name]).main(args.args) or 0)
