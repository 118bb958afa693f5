"""pipeline/cli.py: a tool's output folder that cannot be created is one line and exit 2, before anything runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.tools.bench.cli import main as bench
from pipeline.tools.bench_accuracy import main as bench_accuracy
from pipeline.tools.bench_schedules import main as bench_schedules

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.toml")


@pytest.mark.parametrize("tool, argv", [
    (bench, ["--config", QUICKSTART, "--nproc", "2"]),
    (bench, ["--config", QUICKSTART, "--memory-only"]),
    (bench_accuracy, ["--minutes", "1"]),
    (bench_schedules, ["--slow", "1", "--factor", "2"]),
])
def test_an_out_that_cannot_be_a_folder_is_one_line_and_exit_2(tool: Callable[[list[str]], int], argv: list[str],
                                                             tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert tool([*argv, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out '{blocker / 'out'}' cannot be created (Not a directory); choose a writable folder\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]
