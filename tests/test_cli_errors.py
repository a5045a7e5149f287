"""Bad input to the command line: one line naming the field or the file, never a traceback.

Each case runs the real ``sparse-transformer`` entry point in this process; none starts
Ray (everything here is found on the driver first). The exit codes: 2 for bad input
(config, data, checkpoint, arguments), 1 for a data preparation that cannot proceed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sparse_transformer.cli import main


def _dataset(root: Path) -> str:
    from sparse_transformer.data import prepare

    (root / "t.txt").write_bytes(bytes(range(256)) * 40)
    url = f"file://{root}/ds"
    prepare("text", url, path=str(root / "t.txt"), seq_len=64)
    return url


def _checkpoint(folder: Path, step: int, model_bytes: bytes | None = None) -> Path:
    (folder / "commit").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (folder / "commit" / "rank0.json").write_text(json.dumps({"step": step, "world_size": 1}))
    if model_bytes is not None:
        (folder / "model.pt").write_bytes(model_bytes)
    return folder


def damaged_dataset(tmp: Path) -> list[str]:
    url = _dataset(tmp)
    manifest = tmp / "ds" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    return ["train", f"data.url={url}", "data.prepare=false", f"run.storage_path={tmp}/runs"]


def another_source(tmp: Path) -> list[str]:
    url = _dataset(tmp)
    return ["train", f"data.url={url}", "data.source=wiki-sample", f"run.storage_path={tmp}"]


def run_folder(tmp: Path) -> list[str]:
    _checkpoint(tmp / "run" / "checkpoint_a", 4)
    _checkpoint(tmp / "run" / "checkpoint_b", 8)
    return ["eval", "--checkpoint", str(tmp / "run")]


def truncated_model(tmp: Path) -> list[str]:
    whole = tmp / "whole.pt"
    torch.save({"w": torch.zeros(1000)}, whole)
    data = whole.read_bytes()
    _checkpoint(tmp / "ckpt", 8, data[: len(data) // 2])
    return ["sample", "--checkpoint", str(tmp / "ckpt")]


def config_file(text: bytes) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "c.yaml").write_bytes(text)
        return ["train", "--config", str(tmp / "c.yaml")]

    return make


CASES = {
    "nan learning rate": (lambda t: ["train", "train.lr=.nan"], 2, ["train.lr", "finite"]),
    "inf grad clip": (lambda t: ["train", "train.grad_clip=.inf"], 2, ["train.grad_clip"]),
    "run name ..": (lambda t: ["train", "run.name=.."], 2, ["run.name"]),
    "malformed yaml": (config_file(b"model: [1, 2\ntrain: {"), 2, ["c.yaml", "not valid YAML"]),
    "not utf-8": (config_file("model: {d_model: 128}\n# \xe9t\xe9\n".encode("latin-1")), 2,
                  ["c.yaml", "not UTF-8"]),
    "damaged manifest": (damaged_dataset, 2, ["manifest.json"]),
    "dataset of another source": (another_source, 2, ["already holds text", "data.prepare=false"]),
    "missing checkpoint": (lambda t: ["eval", "--checkpoint", str(t / "nope")], 2, ["nope"]),
    "a run folder, its newest checkpoint damaged": (run_folder, 2, ["checkpoint_b/ds"]),
    "truncated model.pt": (truncated_model, 2, ["model.pt", "cannot be read"]),
    "negative sample length": (lambda t: ["sample", "--checkpoint", str(t), "--length", "-5"], 2,
                               ["--length", "must be >= 0"]),
    "empty input file": (
        lambda t: (t / "e.txt").write_bytes(b"")
        or ["data", "prepare", "text", "--path", str(t / "e.txt"), "--out", f"file://{t}/e"],
        1,
        ["no whole sample", "nothing was written"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_what_is_wrong(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    make, code, needles = CASES[case]
    monkeypatch.chdir(tmp_path)
    argv = make(tmp_path)
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.strip()][-1]
    for needle in needles:
        assert needle in message, message
    assert not (tmp_path / "e" / "manifest.json").exists()
