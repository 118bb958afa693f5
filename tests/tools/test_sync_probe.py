"""The K x R host-sync probe of the self-test: on CPU its plumbing (no sync can be counted there)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from forked_torchrun import FORKED_TORCHRUN

from pipeline.tools.sync_probe import from_sync_batchnorm
from pipeline.tools.torchrun import set_arguments

REPO = Path(__file__).resolve().parents[2]
SETS = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=16", "local.modules=2", "run.device=cpu",
        "pipeline.threads_per_stage=1", "local.context=R1", "precision.channels_last=true"]


@pytest.mark.slow
def test_every_rank_of_a_2_x_2_job_trains_its_module_under_ddp(tmp_path: Path) -> None:
    sets = set_arguments([*SETS, f"run.out_dir={tmp_path}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*FORKED_TORCHRUN, "--standalone", "--nproc-per-node=4",
                           "-m", "pipeline.sync_probe", "--out", str(tmp_path), *sets],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"sync_rank{rank}.json").read_text()) for rank in range(4)]
    assert [(r["stage"], r["replica"]) for r in records] == [(0, 0), (1, 0), (0, 1), (1, 1)]  # chain placement
    assert all(math.isfinite(r["loss"]) and r["syncs"] is None for r in records)


def test_syncs_are_attributed_to_sync_batchnorm_by_the_file_that_asked() -> None:
    assert from_sync_batchnorm("/usr/lib/python3/site-packages/torch/nn/modules/_functions.py:104")
    assert not from_sync_batchnorm("/usr/lib/python3/site-packages/torch/optim/sgd.py:80")
    assert not from_sync_batchnorm("/repo/pipeline/worker.py:88")
