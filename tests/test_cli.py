"""The command line: every sub-command answers --help, through both entry points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sparse_transformer.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_known_subcommands_are_registered() -> None:
    names = _subcommands()
    assert {"bench", "data"} <= set(names), names


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert name in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_transformer", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "sparse-transformer" in proc.stdout


def test_bench_layouts_runs(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "layouts"]) == 0
    out = capsys.readouterr().out
    assert "enwik8" in out and "music-1m" in out
