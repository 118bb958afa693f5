"""pipeline.bench_accuracy: the runs compared, their bad arguments, and one short real comparison."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import BadInput
from pipeline.tools.bench_accuracy import accuracy_runs, main, overrides_list, run_accuracy

TINY = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu", "local.modules=2"]


def test_ddp_end_to_end_the_configs_pipeline_and_the_second_method() -> None:
    ddp, pipeline, second = accuracy_runs(None, TINY, None, ["local.context=R1E", "local.modules=4"])
    assert (ddp.name, ddp.mode, ddp.processes) == ("ddp_e2e", "ddp", 2)
    assert {"local.modules=1", "local.context=R0", "run.mode=ddp"} <= set(ddp.sets)
    assert (pipeline.name, pipeline.mode, pipeline.processes) == ("pipeline_R0_k2", "pipeline", 2)
    assert (second.name, second.processes) == ("pipeline_R1E_k4", 4)
    assert second.sets[:2] == ("local.context=R1E", "local.modules=4")
    assert accuracy_runs(None, TINY, 4, [])[0].processes == 4


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy_runs(None, TINY[:-1], None, []), "local.modules >= 2"),
    (lambda: overrides_list("R1E"), "--second 'R1E': give table.key=value overrides"),
    (lambda: run_accuracy(None, TINY, 0.0, 5, Path("unused")), "--minutes = 0.0 must be > 0"),
    (lambda: run_accuracy(None, TINY, 1.0, 0, Path("unused")), "--eval-every = 0 must be >= 1"),
])
def test_bad_arguments_are_refused(call: object, message: str) -> None:
    with pytest.raises(BadInput, match=re.escape(message)):
        call()  # type: ignore[operator]


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--minutes", "1", "--second", "x"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --second 'x'")


@pytest.mark.slow
def test_each_run_trains_for_the_same_wall_time_and_every_set_is_scored(tmp_path: Path) -> None:
    # 12 s from each launch, a set every 5 steps: a run on a busy machine (the suite runs on two workers) still
    # trains a few sets' worth after its start-up (at 6 s and every 10 steps, one in three had none).
    report = run_accuracy(None, TINY, 0.2, 5, tmp_path)
    assert list(report["runs"]) == ["ddp_e2e", "pipeline_R0_k2"]
    for name, run in report["runs"].items():
        points = run["points"]
        steps = [point["step"] for point in points]
        log = (tmp_path / f"{name}.log").read_text()
        stopped = {int(step) for step in re.findall(r"stopped by SIGTERM after step (\d+)", log)}
        assert stopped == {steps[-1]}, log[-2000:]  # the time was up: stopped at its last, scored set
        # a set every 5 steps and at each epoch's end (128 steps of the synthetic split), then the stop's
        assert len(points) >= 2 and steps == sorted(steps)
        assert all(step % 5 == 0 or step % 128 == 0 for step in steps[:-1])
        walls = [point["wall_s"] for point in points]
        assert walls == sorted(walls) and 0 < walls[-1] < 0.2 * 60 + 60
        assert all(0.0 <= point["test_accuracy"] <= 1.0 for point in points)
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert "| pipeline_R0_k2 | 5 |" in (tmp_path / "accuracy.md").read_text()
