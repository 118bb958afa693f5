"""python -m pipeline.selftest: the CPU subset runs here; the GPU checks where GPUs are visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _selftest(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "pipeline.selftest", "--out", str(out)], capture_output=True,
                          text=True, timeout=240, env=full)


@pytest.mark.slow
def test_cpu_subset_passes_and_lists_what_it_skipped(tmp_path: Path) -> None:
    done = _selftest(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "selftest.json").read_text())
    status = {check["name"]: check for check in record["checks"]}
    assert status["pipeline K=2 (gloo) == sequential"]["status"] == "pass"
    assert status["killed stage ends the job within timeout_s (30 s)"]["status"] == "pass"
    stopped = status["stopped stage: its neighbour ends the job within timeout_s + 5 s (10 + 5 s)"]
    assert stopped["status"] == "pass" and "rank 1" in stopped["note"], stopped
    skipped = [check for check in record["checks"] if check["status"] == "skipped"]
    assert len(skipped) == 11 and all(check["note"] == "no CUDA GPU visible" for check in skipped)
    assert record["failed"] == 0 and "| no host sync in a training step | skipped |" in done.stdout
    assert (tmp_path / "selftest.md").read_text().startswith("# localpipe self-test")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["selftest.json", "selftest.md"]


@pytest.mark.slow
def test_an_unwritable_out_is_bad_input(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _selftest(blocker / "out")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --out")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_checks_pass(tmp_path: Path) -> None:
    done = _selftest(tmp_path)
    record = json.loads((tmp_path / "selftest.json").read_text())
    assert done.returncode == 0, json.dumps(record, indent=1)
    assert {check["name"]: check["status"] for check in record["checks"]}["no host sync in a training step"] == "pass"


@pytest.mark.slow
def test_the_stopped_stage_check_fails_without_the_deadline(tmp_path: Path) -> None:
    """The check proves the project's deadline, not torchrun's: with the job's pipeline.timeout_s far
    beyond what the check allows (the deadline as good as disabled) the stopped rank hangs the job
    and the check fails."""
    from pipeline.tools.selftest import stopped_stage

    check = stopped_stage(tmp_path, "cpu", timeout_s=3, deadline_s=3600)
    assert check.status == "fail" and check.note == "still running 8 s after the stop", check


def test_the_k_by_r_sync_check_fails_on_any_sync_outside_sync_batchnorm() -> None:
    from pipeline.tools.selftest import sync_verdict

    sync_bn = "/site-packages/torch/nn/modules/_functions.py:104"
    clean = [{"syncs": [sync_bn] * 3, "sync_batchnorm_layers": 3}, {"syncs": [], "sync_batchnorm_layers": 3}]
    passed = sync_verdict("k x r", clean)
    assert passed.status == "pass" and passed.figure.startswith("0 syncs outside SyncBatchNorm; 3 in its 6 layers")
    dirty = [*clean, {"syncs": ["/repo/pipeline/worker.py:88"], "sync_batchnorm_layers": 3}]
    failed = sync_verdict("k x r", dirty)
    assert failed.status == "fail" and failed.note == "/repo/pipeline/worker.py:88"


def test_differences_count_relative_to_the_update() -> None:
    """Equal runs are 0 apart; a run whose step did nothing is about 1 update away, whatever the size of
    the weights (an absolute 5e-2 would pass it when the update is that small)."""
    from pipeline.tools.selftest import relative_difference

    initial = [{"weight": torch.ones(4), "steps": torch.tensor(0)}]
    trained = [{"weight": torch.ones(4) - 0.01 * torch.arange(4.0), "steps": torch.tensor(6)}]
    assert relative_difference(trained, [{k: v.clone() for k, v in trained[0].items()}], initial) == 0.0
    untrained = [{"weight": torch.ones(4), "steps": torch.tensor(6)}]
    assert relative_difference(trained, untrained, initial) == pytest.approx(1.0)
    assert relative_difference(trained, [{**trained[0], "weight": trained[0]["weight"] + 1e-4}], initial) == \
        pytest.approx(1e-4 / 0.03, rel=1e-3)  # float32 weights


@pytest.mark.slow
def test_a_cpu_soak_runs_only_the_soak_and_passes(tmp_path: Path) -> None:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pipeline.selftest", "--out", str(tmp_path), "--soak", "8"],
                          capture_output=True, text=True, timeout=240, env=full)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (check,) = json.loads((tmp_path / "selftest.json").read_text())["checks"]
    assert check["name"] == "soak: K x R = 2 x 1 on cpu, 8 steps" and check["status"] == "pass"
    assert check["figure"].startswith("8 steps, ")


def test_one_connection_goes_with_soak(tmp_path: Path) -> None:
    from pipeline.errors import BadInput
    from pipeline.tools.selftest import main

    with pytest.raises(BadInput, match="--one-connection goes with --soak"):
        main(["--out", str(tmp_path), "--one-connection"])


def test_the_streaming_loader_check_compares_worker_batches_with_the_plain_loader(tmp_path: Path) -> None:
    """On CPU the check's own plumbing: 2 decoding workers against none, bit for bit (on a GPU the same
    check compares the pinned, asynchronous path with the CPU loader)."""
    from pipeline.tools.selftest import streaming_loader_matches

    check = streaming_loader_matches(tmp_path, "cpu")
    assert check.status == "pass" and check.figure == "6 batches, max image diff 0.0e+00 (tolerance 1e-06)", check
