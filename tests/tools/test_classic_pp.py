"""Classic pipeline parallelism: the end-to-end network split at the cuts, trained by GPipe / 1F1B."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from forked_torchrun import FORKED_TORCHRUN

from pipeline.config.loading import e2e_overrides, load_config
from pipeline.data.specs import dataset_spec
from pipeline.model.network import build_module, make_layout
from pipeline.performance.activations import module_activation_bytes
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.optim import learning_rate, make_optimizer, set_learning_rate
from pipeline.tools.classic_pp import (
    full_batches,
    in_flight,
    main,
    stage_activation_bytes,
    stage_modules,
)
from pipeline.tools.torchrun import set_arguments
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SETS = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=8", "run.device=cpu", "local.modules=2",
        "local.partition=[[1, 0]]", "train.schedule=constant", "train.lr=0.05"]


def e2e_network(sets: list[str]) -> torch.nn.Module:
    config = load_config(None, e2e_overrides(sets))
    return build_module(config, make_layout(config, dataset_spec(config.data, config.model), []), 0, CPU)


def test_the_stages_are_the_end_to_end_network_cut_at_the_local_cuts() -> None:
    config, e2e = load_config(None, SETS), load_config(None, e2e_overrides(SETS))
    spec = dataset_spec(config.data, config.model)
    stages = stage_modules(e2e, spec, resolve_cuts(config, spec, CPU))
    whole = e2e_network(SETS)
    assert [len(stage) for stage in stages] == [2, 3]  # stem + block 1 | blocks 2, 3 + classifier
    inputs = torch.randn(4, spec.channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        split = stages[1](stages[0](inputs))
        assert torch.equal(split, whole.head(whole.body(inputs)))


@pytest.mark.parametrize("arch", ["vit_tiny", "vgg11_bn", MAPS_THEN_VECTORS])
def test_any_network_is_cut_into_stages_at_its_block_index_cuts(arch: str) -> None:
    sets = ["data.name=synthetic", f"model.arch={arch}", "data.batch_size=2", "run.device=cpu", "local.modules=2"]
    config, e2e = load_config(None, sets), load_config(None, e2e_overrides(sets))
    spec = dataset_spec(config.data, config.model)
    cuts = resolve_cuts(config, spec, CPU)
    stages = stage_modules(e2e, spec, cuts)
    whole = e2e_network(sets)
    inputs = torch.randn(2, spec.channels, *spec.image_shape)
    with torch.no_grad():
        sent = stages[0](inputs)
        # what build_stage declares the link carries: the layout's shape of the cut block's output, a tuple
        assert tuple(sent.shape[1:]) == make_layout(e2e, spec, cuts).net.shape(cuts[0])
        assert torch.equal(stages[1](sent), whole.head(whole.body(inputs)))


def test_microbatches_in_flight() -> None:
    assert [in_flight("gpipe", k, 4, 8) for k in range(4)] == [8, 8, 8, 8]
    assert [in_flight("1f1b", k, 4, 8) for k in range(4)] == [4, 3, 2, 1]
    assert in_flight("1f1b", 0, 4, 2) == 2


def test_activation_memory_counts_the_microbatches_in_flight() -> None:
    config, e2e = load_config(None, SETS), load_config(None, e2e_overrides(SETS))
    spec = dataset_spec(config.data, config.model)
    cuts = resolve_cuts(config, spec, CPU)
    gpipe = stage_activation_bytes(e2e, spec, cuts, 8, "gpipe", 4)
    one_f = stage_activation_bytes(e2e, spec, cuts, 8, "1f1b", 4)
    assert one_f[0] * 2 == gpipe[0] and one_f[1] * 4 == gpipe[1]  # 2 and 1 in flight of 4
    # GPipe keeps every microbatch: at least the whole network's activations at the full batch (the
    # stages hold the tensors at the cut twice, the sender's output and the receiver's input).
    whole = module_activation_bytes(e2e, spec, [], 8)[0]
    assert whole <= sum(gpipe) < 1.5 * whole


def reference_steps(sets: list[str], microbatches: int, steps: int) -> list[torch.Tensor]:
    """End to end on one process, gradients accumulated over the same microbatches (each loss / M)."""
    config = load_config(None, sets)
    whole = e2e_network(sets).train()
    optimizer = make_optimizer(whole, config.train)
    batches = full_batches(config, CPU, config.data.batch_size)
    for step in range(1, steps + 1):
        epoch, images, labels = next(batches)
        set_learning_rate(optimizer, learning_rate(config.train, epoch, step, steps))
        optimizer.zero_grad(set_to_none=True)
        for part, target in zip(images.chunk(microbatches), labels.chunk(microbatches)):
            (F.cross_entropy(whole.head(whole.body(part)), target) / microbatches).backward()
        optimizer.step()
    return [tensor.detach() for tensor in [*whole.body.state_dict().values(), *whole.head.state_dict().values()]]


@pytest.mark.slow
def test_gpipe_steps_equal_end_to_end_with_accumulated_microbatches(tmp_path: Path) -> None:
    schedule, microbatches, steps = "gpipe", 2, 2
    sets = set_arguments(SETS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*FORKED_TORCHRUN, "--standalone", "--nproc-per-node=2",
         str(REPO / "tests" / "tools" / "classic_pp_worker.py"), str(tmp_path), schedule, str(microbatches),
         str(steps), *sets],
        capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [torch.load(tmp_path / f"stage_{rank}.pt", weights_only=True) for rank in range(2)]
    pipelined = [tensor for stage in stages for tensor in stage.values()]
    expected = reference_steps(SETS, microbatches, steps)
    assert len(pipelined) == len(expected)
    for got, want in zip(pipelined, expected):
        assert got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), atol=1e-5, rtol=0), (got - want).abs().max()
    # and the weights moved: the comparison is not between two untrained networks
    untrained = [*e2e_network(SETS).body.state_dict().values(), *e2e_network(SETS).head.state_dict().values()]
    assert any(not torch.equal(got, before) for got, before in zip(pipelined, untrained))


@pytest.mark.slow
def test_a_classic_run_writes_the_summary_and_lines_the_bench_reads(tmp_path: Path) -> None:
    """Under torchrun: summary.json with its keys and one figure per process, rank 0's rate the run's; a train
    line from the last stage every run.log_every steps (the bench times its windows from them)."""
    sets = set_arguments([*SETS, f"run.out_dir={tmp_path}", "train.max_steps=6", "run.log_every=2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*FORKED_TORCHRUN, "--standalone", "--nproc-per-node=2",
                           "-m", "pipeline.classic_pp", "--schedule", "1f1b", "--microbatches", "2", *sets],
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["mode", "world_size", "modules", "microbatches", "arch", "dataset", "batch_size", "steps",
                             "test_accuracy", "train_samples_per_s", "cut_points", "stages"]
    assert [summary[key] for key in ("mode", "world_size", "microbatches", "steps")] == ["classic-1f1b", 2, 2, 6]
    assert [(stage["rank"], stage["module"]) for stage in summary["stages"]] == [(0, 0), (1, 1)]
    assert all(set(stage) == {"rank", "module", "peak_mem_bytes", "peak_reserved_bytes", "device_used_bytes",
                              "samples_per_s"} for stage in summary["stages"])
    assert summary["train_samples_per_s"] == summary["stages"][0]["samples_per_s"] > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["event"], line["module"], line["step"]) for line in lines] == [("train", 1, 2), ("train", 1, 4),
                                                                                ("train", 1, 6)]
    assert all(set(line) == {"rank", "time", "event", "module", "epoch", "step", "loss", "lr", "samples_per_s"}
               and line["lr"] == 0.05 and line["samples_per_s"] > 0 and math.isfinite(line["loss"]) for line in lines)


def classic_pp_cli(tmp_path: Path, world: int, *args: str) -> subprocess.CompletedProcess[str]:
    sets = set_arguments([*SETS, f"run.out_dir={tmp_path}", "train.max_steps=2"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": str(world)}
    return subprocess.run([sys.executable, "-m", "pipeline.classic_pp", *args, *sets], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


@pytest.mark.slow
def test_bad_launches_exit_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    alone = classic_pp_cli(tmp_path, 1)  # the real command: exit status 2, no traceback
    assert alone.returncode == 2 and "launch it with torchrun --nproc-per-node K" in alone.stderr
    assert "Traceback" not in alone.stderr
    # the other checks come before any process group too: main() in this process says the same
    sets = set_arguments([*SETS, f"run.out_dir={tmp_path}", "train.max_steps=2"])
    segmentation = ["--set", "data.name=cityscapes", "--set", "model.arch=deeplabv3_resnet50"]
    for world, args, needle in ((2, ["--microbatches", "3"], "--microbatches = 3 must divide data.batch_size = 8"),
                                (4, [], "set local.modules=4"),
                                (2, segmentation, "classic_pp times classification networks, and cityscapes is "
                                                  "segmentation; compare a segmentation network's memory with "
                                                  "python -m pipeline.bench --memory-only")):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        capsys.readouterr()
        assert main([*sets, *args]) == 2
        error = capsys.readouterr().err
        assert needle in error and error.count("\n") == 1 and "Traceback" not in error


def test_each_rank_joins_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU node rank 1 sets cuda:1 and binds the job's group to it before anything runs on the
    group (NCCL would otherwise put every rank's object collectives on GPU 0): a mocked torch.cuda."""
    import pipeline.runtime.topology as topology
    from pipeline.tools.classic_pp import train

    calls: list[tuple[str, object]] = []

    class Joined(Exception):
        pass

    def init(backend: str, **kwargs: object) -> None:
        calls.append(("init", (backend, kwargs["device_id"])))
        raise Joined

    gpu = torch.device("cuda", 1)
    monkeypatch.setattr(topology, "resolve_device", lambda *args: gpu)  # from_env picks the device
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(torch.distributed, "init_process_group", init)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    with pytest.raises(Joined):
        train(None, [*SETS, "train.max_steps=2"], "1f1b", 2)
    assert calls == [("set_device", gpu), ("init", ("nccl", gpu))]


@pytest.mark.parametrize("amp", [False, True])
def test_a_classic_stage_sends_in_the_local_pipeline_s_wire_dtype(amp: bool) -> None:
    """Like the local pipeline's links: a bf16 wire leaves a middle stage as bf16, arrives as bf16 and is
    restored to float32 only where the stage computes in float32; the last stage's logits are float32."""
    from pipeline.tools.classic_pp import _Precision

    seen: list[torch.dtype] = []

    class Probe(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            seen.append(inputs.dtype)
            return torch.nn.functional.linear(inputs, torch.ones(3, 4))

    arriving = torch.randn(2, 4).to(torch.bfloat16)
    middle = _Precision(Probe(), CPU, amp, torch.bfloat16, last=False)
    assert middle(arriving).dtype == torch.bfloat16
    last = _Precision(Probe(), CPU, amp, torch.bfloat16, last=True)
    assert last(arriving).dtype == torch.float32
    assert seen == [torch.bfloat16 if amp else torch.float32] * 2


def test_a_classic_stage_sends_dense_tensors() -> None:
    """A ViT's tokens keep the transposed strides of its patch embedding through every block; the links (gloo,
    NCCL) send dense tensors only, so a middle stage's output leaves dense, the same values."""
    from pipeline.tools.classic_pp import _Precision

    sets = ["data.name=synthetic", "model.arch=vit_tiny", "data.batch_size=2", "run.device=cpu", "local.modules=2"]
    config, e2e = load_config(None, sets), load_config(None, e2e_overrides(sets))
    spec = dataset_spec(config.data, config.model)
    first = stage_modules(e2e, spec, resolve_cuts(config, spec, CPU))[0]
    inputs = torch.randn(2, spec.channels, *spec.image_shape)
    with torch.no_grad():
        tokens = first(inputs)
        sent = _Precision(first, CPU, False, torch.float32, last=False)(inputs)
    assert not tokens.is_contiguous() and sent.is_contiguous() and torch.equal(sent, tokens)
