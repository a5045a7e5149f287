"""The named configurations (``configs/NAME.yaml``) and the one rule for naming them.

A ``--config`` argument, a ``load_model_config`` argument or ``submit --config`` is a
path when it is a ``Path``, contains ``/`` or ends in ``.yaml`` / ``.yml``; otherwise it
is the name of a file here. :mod:`sparse_transformer.configs.schema` is the one validator
of the configuration dataclasses (the model's and the run's sections). Standard library
only; below ``model`` and ``distributed``, which both import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def configs_dir() -> Path:
    """This folder: the packaged configurations."""
    return Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the packaged configurations, sorted."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def resolve(name_or_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(file, name) of a packaged name or a YAML path; the name of a path is its stem.

    Raises ``FileNotFoundError`` for a path that is not a file and ``ValueError`` for an
    unknown name (listing the known ones).
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"no file at {path}")
        return path, path.stem
    path = configs_dir() / f"{text}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown name {text!r}; available: {', '.join(names())}")
    return path, text
