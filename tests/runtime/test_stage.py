"""The pipeline under torchrun equals the sequential reference and fails fast.

A stage SIGKILLed or SIGSTOPped under one torchrun agent ending the job in time is what the self-test's CPU
checks prove (tests/tools/test_selftest.py asserts they pass, and that the stopped-stage one can fail).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from distributed_helpers import (
    EQUIVALENCE_CASES,
    EQUIVALENCE_IDS,
    EQUIVALENCE_STEPS,
    SHARED_JOBS,
    _env,
    equivalence_overrides,
    load_module_state,
    max_state_difference,
    tiny_config,
    torchrun,
    torchrun_command,
)
from forked_torchrun import TORCHRUN

from pipeline.runtime.assemble import run

STEPS = EQUIVALENCE_STEPS


def _assert_same_modules(first: Path, second: Path, modules: int) -> None:
    for module in range(modules):
        a, b = load_module_state(first, module), load_module_state(second, module)
        assert a["position"] == b["position"]
        assert max_state_difference(a["state"], b["state"]) <= 1e-5, f"module {module} differs"


@pytest.mark.slow
@pytest.mark.parametrize("modules, extra", EQUIVALENCE_CASES, ids=EQUIVALENCE_IDS)
def test_pipeline_equals_sequential(single_thread: None, pipeline_job: Callable[[int, list[str]], Path],
                                    sequential_reference: Callable[[list[str]], tuple[Path, dict[str, Any]]],
                                    modules: int, extra: list[str]) -> None:
    overrides = equivalence_overrides(modules, extra)
    reference_dir, reference = sequential_reference(overrides)  # test_stage_loop's reference too
    out = pipeline_job(modules, overrides)  # test_replicas reads the K = 4 R2E job too
    _assert_same_modules(reference_dir, out, modules)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS == reference["steps"]
    assert summary["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=1e-9)
    assert [stage["rank"] for stage in summary["stages"]] == list(range(modules))
    for stage in summary["stages"]:
        assert 0 < stage["busy_fraction"] <= 1 and stage["peak_mem_bytes"] > 0 and stage["samples_per_s"] > 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {line["rank"] for line in logged if line["event"] == "train"} == set(range(modules))


@pytest.mark.slow
def test_bf16_wire_trains_close_to_the_reference(
        tmp_path: Path, single_thread: None, pipeline_job: Callable[[int, list[str]], Path]) -> None:
    """bf16 on the wire rounds activations: not equal to sequential, but close after a few steps."""
    processes, overrides = SHARED_JOBS["bf16 wire"]
    sequential = tmp_path / "sequential"
    run(tiny_config(tmp_path, "sequential", *[item for item in overrides if item != "pipeline.wire_dtype=bf16"]))
    out = pipeline_job(processes, overrides)
    module_1 = [load_module_state(path, 1)["state"]["module"] for path in (sequential, out)]
    difference = max_state_difference(*module_1)
    assert 0 < difference < 0.05
    assert max_state_difference(load_module_state(sequential, 0)["state"],
                                load_module_state(out, 0)["state"]) <= 1e-5  # module 0 receives nothing


@pytest.mark.slow
def test_two_nodes_through_c10d_rendezvous(tmp_path: Path, single_thread: None) -> None:
    """Two torchrun agents (one process each) meet at a c10d endpoint: the same result as one node.
    The links carry channels_last tensors as they are (no layout copy at either end): still equal."""
    overrides = ["local.modules=2", "local.context=R1E", f"train.max_steps={STEPS}", "precision.channels_last=true"]
    run(tiny_config(tmp_path, "sequential", *overrides))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two_nodes"
    command = torchrun_command(1, [f"run.out_dir={out}", "run.mode=pipeline", *overrides])
    launcher = command.index("--standalone")
    agents = []
    for node in range(2):
        argv = command[:launcher] + ["--nnodes=2", f"--node-rank={node}", "--rdzv-backend=c10d",
                                     f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                                     *command[launcher + 1:]]
        agents.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()))
    outputs = [agent.communicate(timeout=120)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    _assert_same_modules(tmp_path / "sequential", out, 2)


@pytest.mark.slow
def test_world_size_must_be_k_times_r(tmp_path: Path) -> None:
    done = torchrun(2, [f"run.out_dir={tmp_path}", "run.mode=pipeline", "local.modules=3"], timeout=60)
    assert done.returncode != 0
    assert "error: WORLD_SIZE is 2, not a multiple of local.modules = 3" in done.stderr
    # torchrun prints its own report of failed workers; no traceback may come from our code.
    assert "/pipeline/" not in done.stderr


@pytest.mark.slow
def test_raising_stage_ends_the_job(tmp_path: Path) -> None:
    """A diverging loss on a stage: the job ends non-zero, in time, with the stage named."""
    started = time.monotonic()
    done = torchrun(2, [f"run.out_dir={tmp_path}", "run.mode=pipeline", "local.modules=2", "train.lr=1e30",
                        "run.log_every=1", "train.max_steps=200"], timeout=90)
    assert done.returncode != 0
    assert time.monotonic() - started < 60
    assert "error: stage on rank" in done.stderr and "failed: module" in done.stderr and "loss is nan" in done.stderr


@pytest.mark.slow
def test_a_killed_peer_is_named_by_the_survivor(tmp_path: Path) -> None:
    """Each rank under its own torchrun agent, so no launcher tears the survivor down: rank 0 itself
    must notice that rank 1 died and say so in its one error line."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = torchrun_command(1, [f"run.out_dir={tmp_path}", "run.mode=pipeline", "local.modules=2",
                                   "train.max_steps=100000", "train.epochs=1000", "run.log_every=2"],
                               TORCHRUN)  # workers of their own, RANK in their environment as /proc shows it
    launcher = command.index("--standalone")
    agents = []
    for node in range(2):
        argv = [*command[:launcher], "--nnodes=2", f"--node-rank={node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=killed", *command[launcher + 1:]]
        agents.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()))
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 90
        while not (metrics.exists() and "\"rank\": 1" in metrics.read_text()):
            assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "the job never trained"
            time.sleep(0.2)
        victim = next(p for p in psutil.Process(agents[1].pid).children(recursive=True)
                      if p.environ().get("RANK") == "1")
        victim.kill()
        survivor, _ = agents[0].communicate(timeout=60)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert agents[0].returncode != 0
    ours = [line for line in survivor.splitlines() if line.startswith("error: stage on rank 0 (module 0) failed")]
    assert len(ours) == 1 and "rank 1" in ours[0].split("failed", 1)[1], survivor[-3000:]
    # named as what happened, at once, not as a deadline that passed; and short
    assert "rank 1 closed the connection" in ours[0] and "did not complete" not in ours[0], ours[0]
    assert len(ours[0]) < 300, ours[0]
    assert (tmp_path / "errors" / "rank_0.log").read_text().count("Traceback") >= 1
