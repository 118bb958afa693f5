"""An image folder in the pipeline: K = 2 stage loops on threads end with the sequential run's
parameters, the first stage streaming the folder through decoding workers, the sequential run
decoding in its own process (the batches may not depend on the number of workers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_helpers import load_module_state, max_state_difference, tiny_config
from threaded import run_threaded

from pipeline.data.throughput import write_folder
from pipeline.runners.run import run

STEPS = 6


@pytest.mark.parametrize("extra", [["local.context=R0"], ["local.context=E", "local.reconstruct=true"]],
                         ids=["K2-R0", "K2-E-decoder"])
def test_threaded_pipeline_on_an_image_folder_equals_sequential(tmp_path: Path, single_thread: None,
                                                                extra: list[str]) -> None:
    root = tmp_path / "images"
    write_folder(root, 24, 3, size=(40, 32), png_every=4)
    overrides = ["data.name=image_folder", f"data.root='{root}'", "data.image_size=32", "data.eval_resize=36",
                 "data.batch_size=8", "local.modules=2", f"train.max_steps={STEPS}", "train.epochs=3", *extra]
    reference = run(tiny_config(tmp_path, "sequential", *overrides, "data.workers=0"))
    assert reference is not None
    summaries, errors = run_threaded(tiny_config(tmp_path, "threads", *overrides, "data.workers=2",
                                                 "run.mode=pipeline"))
    assert errors == [None, None]
    for module in range(2):
        a, b = load_module_state(tmp_path / "sequential", module), load_module_state(tmp_path / "threads", module)
        assert a["position"] == b["position"]
        assert max_state_difference(a["state"], b["state"]) == 0.0, f"module {module} differs"
    summary = summaries[0]
    assert summary is not None and summary["steps"] == STEPS == reference["steps"]
    assert summary["epochs"] == 2  # 3 batches an epoch: two whole epochs, each evaluated on the folder's val split
    assert summary["test_accuracy"] == reference["test_accuracy"]
