"""The ``sparse-transformer`` command line: one sub-command per module.

Each sub-command lives beside the code it drives and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). The
modules keep their heavy imports (torch, Ray, DeepSpeed) inside the handlers so
that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module that registers it; the order is the order of --help.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "sparse_transformer.benchmarks.cli",
    "sparse_transformer.data.cli",
    "sparse_transformer.distributed.cli",
    "sparse_transformer.distributed.submit",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="sparse-transformer",
        description="Train the Sparse Transformer (Child et al., 2019) with Ray Train and "
        "DeepSpeed.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m sparse_transformer``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
