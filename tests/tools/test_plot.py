"""python -m pipeline.plot: curves from metrics.jsonl, several runs overlaid, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import BadInput
from pipeline.tools.plot import draw, main, read_curves, run_names

REPO = Path(__file__).resolve().parents[2]


def write_metrics(run_dir: Path, modules: int, steps: int = 4) -> None:
    """metrics.jsonl as the runners write it: a train line per module per logged step, eval lines."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        for module in range(modules):
            lines.append({"rank": 0, "time": 1.0, "event": "train", "module": module, "epoch": 1, "step": step,
                          "loss": 2.0 - 0.1 * step + module, "lr": 0.1 / step, "samples_per_s": 100.0 + step,
                          "window_compute_s": 0.5})
        if step % 2 == 0:
            lines.append({"rank": 0, "event": "eval", "module": modules - 1, "epoch": 1, "step": step,
                          "test_accuracy": 0.2 * step})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_read_curves_takes_every_module_and_the_last_modules_rate(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", modules=3)
    curves = read_curves(tmp_path / "run", "run")
    assert sorted(curves.loss) == [0, 1, 2]
    assert curves.loss[2] == [(1, 3.9), (2, 3.8), (3, 3.7), (4, 3.6)]
    assert curves.lr == [(1, 0.1), (2, 0.05), (3, 0.1 / 3), (4, 0.025)]
    assert curves.samples_per_s[0] == (1, 101.0) and len(curves.samples_per_s) == 4
    assert curves.test_accuracy == [(2, 0.4), (4, 0.8)]


def test_a_job_over_two_hosts_is_read_from_both_files(tmp_path: Path) -> None:
    """The last module ran on the second host: its lines (and the accuracy) are in metrics.node1.jsonl."""
    write_metrics(tmp_path / "run", modules=2)
    path = tmp_path / "run" / "metrics.jsonl"
    items = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(item) + "\n" for item in items if item["module"] == 0))
    (tmp_path / "run" / "metrics.node1.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in items if item["module"] == 1))
    curves = read_curves(tmp_path / "run", "run")
    assert sorted(curves.loss) == [0, 1] and curves.loss[1] == [(1, 2.9), (2, 2.8), (3, 2.7), (4, 2.6)]
    assert curves.test_accuracy == [(2, 0.4), (4, 0.8)]


def test_run_names_are_folders_unless_two_share_one() -> None:
    assert run_names(["runs/fm/e2e", "runs/fm/greedy_sl/"]) == ["e2e", "greedy_sl"]
    assert run_names(["a/x", "b/x", "c/y"]) == ["a/x", "b/x", "y"]


def test_several_runs_share_the_axes_with_their_names_as_legend(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "e2e", modules=1)
    write_metrics(tmp_path / "contsup_r1e", modules=16)
    figure = draw([read_curves(tmp_path / name, name) for name in ("e2e", "contsup_r1e")])
    loss, lr, rate, accuracy = figure.axes
    assert [ax.get_title() for ax in (lr, rate, accuracy)] == ["learning rate", "samples / s", "test accuracy (%)"]
    assert len(loss.get_lines()) == 1 + 16
    for ax in figure.axes:
        assert [text.get_text() for text in ax.get_legend().get_texts()] == ["e2e", "contsup_r1e"]
    assert list(accuracy.get_lines()[1].get_ydata()) == pytest.approx([40.0, 80.0])  # %, as the terminal says
    earlier = [line for line in loss.get_lines() if line.get_linestyle() == "--"]  # contsup_r1e's modules 0-14
    assert len(earlier) == 15 and all(line.get_alpha() >= 0.7 for line in earlier)


def test_a_one_epoch_runs_single_evaluation_sits_at_the_end_of_the_run(tmp_path: Path) -> None:
    """It was one dot on an axis of its own (445 to 495 for a 469-step run)."""
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "one_epoch"
    run_dir.mkdir()
    lines = [{"event": "train", "module": 0, "epoch": 1, "step": step, "loss": 1.0, "lr": 0.1, "samples_per_s": 9.0}
             for step in range(10, 470, 10)]
    lines.append({"event": "eval", "module": 0, "epoch": 1, "step": 469, "test_accuracy": 0.8529})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    figure = draw([read_curves(run_dir, "one_epoch")])
    accuracy = figure.axes[3]
    low, high = accuracy.get_xlim()
    assert low <= 0 and 469 <= high < 520
    assert list(accuracy.get_lines()[0].get_ydata()) == pytest.approx([85.29])


def test_one_run_gets_a_line_per_module_and_a_default_output(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "quick", modules=4)
    assert main([str(tmp_path / "quick")]) == 0
    out = tmp_path / "quick" / "curves.png"
    assert out.stat().st_size > 10_000 and capsys.readouterr().out == f"wrote {out}\n"
    figure = draw([read_curves(tmp_path / "quick", "quick")])
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["module 0", "module 1", "module 2", "module 3"]


def test_out_path_is_created(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path / "a", modules=2)
    write_metrics(tmp_path / "b", modules=2)
    out = tmp_path / "pictures" / "k2.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.is_file()


def plot_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.plot", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line


def test_a_folder_without_metrics_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(plot_cli(str(tmp_path / "empty"), cwd=tmp_path), "metrics.jsonl", "run.out_dir")
    assert_one_line_error(plot_cli(cwd=tmp_path), "RUN_DIR")


def test_a_cut_line_is_bad_input(tmp_path: Path) -> None:
    write_metrics(tmp_path / "run", modules=1)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
        handle.write('{"event": "tra')
    with pytest.raises(BadInput, match=r"metrics.jsonl:7 is not a JSON object line"):
        read_curves(tmp_path / "run", "run")


def test_missing_matplotlib_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path / "run", modules=1)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(BadInput, match=r"needs matplotlib: pip install -e '\.\[plot\]'"):
        draw([read_curves(tmp_path / "run", "run")])
