"""The dependency rule, checked on the sources: distributed -> model -> ops, distributed ->
data; ops knows no models, model and data import no Ray or DeepSpeed, and nothing below
distributed imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "ops": ("ray", "deepspeed", "sparse_transformer.model", "sparse_transformer.data",
            "sparse_transformer.distributed"),
    "model": ("ray", "deepspeed", "sparse_transformer.data", "sparse_transformer.distributed"),
    "data": ("ray", "deepspeed", "sparse_transformer.model", "sparse_transformer.ops",
             "sparse_transformer.distributed"),
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in the file names (any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_upper_ones(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(imported_modules(path))
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package])
    ]
    assert not bad, bad
