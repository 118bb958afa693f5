"""Launching real multi-process jobs (torchrun, gloo on CPU) and comparing their checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from forked_torchrun import FORKED_TORCHRUN
from torch import nn

from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.runtime import checkpoint
from pipeline.tools.torchrun import set_arguments

# Small enough for 2 cores: resnet8 has 4 blocks, so K can be 1..4.
TINY = [
    "data.name=synthetic", "model.arch=resnet8", "data.batch_size=16", "run.log_every=4",
    "train.schedule=constant", "train.lr=0.05", "pipeline.timeout_s=60", "pipeline.threads_per_stage=1",
]

# The pipeline == sequential cases, run both under torchrun and as stage loops on threads.
EQUIVALENCE_CASES = [
    (2, ["local.context=R0"]),
    (2, ["local.context=E", "local.reconstruct=true", "local.ixx_1=2.0", "local.ixy_1=0.5"]),
    (4, ["local.context=R1", "local.reconstruct=true", "local.loss=contrast"]),
    (4, ["local.context=R1E", "train.schedule=cosine-step"]),
    (4, ["local.context=R2E", "local.reconstruct=true", "local.ixx_2=0.0", "local.ixy_2=2.0"]),
]
EQUIVALENCE_IDS = ["K2-R0", "K2-E-decoder", "K4-R1-decoder-contrast", "K4-R1E-cosine-step", "K4-R2E-decoder"]
EQUIVALENCE_STEPS = 12

# A network of the user's own, named by model.arch in every process (each imports this module).
FACTORY = "distributed_helpers:small_convnet"


def small_convnet(in_channels: int, classes: int, image_size: tuple[int, int]) -> nn.Sequential:
    """Five conv units and a pooled linear classifier: six blocks, cut anywhere."""
    def unit(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(unit(in_channels, 8, 1), unit(8, 8, 1), unit(8, 16, 2), unit(16, 16, 1), unit(16, 32, 2),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes)))


def equivalence_overrides(modules: int, extra: list[str]) -> list[str]:
    """One equivalence case's run: the sequential reference, the threaded and the torchrun pipeline
    all take these, so the session fixtures (runtime/conftest.py) run each reference and job once."""
    return [f"local.modules={modules}", f"train.max_steps={EQUIVALENCE_STEPS}", "train.epochs=2", *extra]


# The job torchrun SIGKILLs in test_restarts.py: a set every 4 steps, 80 steps across an epoch end (64 batches).
RESTARTED_JOB = ["run.mode=pipeline", "local.modules=2", "train.epochs=2", "train.max_steps=80",
                 "run.checkpoint_every=4", "run.log_every=1", "pipeline.timeout_s=30"]
REPLICA_STEPS, DDP_STEPS = 5, 6

# (processes, overrides) of every torchrun job that tests read through the session fixture pipeline_job
# (runtime/conftest.py), by name. The jobs of one world size run in one launch, one after another, at the
# first request for any of them: torchrun's start-up (an agent and a torch import per process) is paid
# once per world size, not once per job.
SHARED_JOBS: dict[str, tuple[int, list[str]]] = {
    **{f"equivalence {name}": (modules, equivalence_overrides(modules, extra))
       for name, (modules, extra) in zip(EQUIVALENCE_IDS, EQUIVALENCE_CASES)},
    "K2xR2-E-decoder": (4, ["local.modules=2", f"train.max_steps={REPLICA_STEPS}", "pipeline.placement=chain",
                            "local.context=E", "local.reconstruct=true"]),
    "K2xR2-stage-placement-R1-contrast": (4, ["local.modules=2", f"train.max_steps={REPLICA_STEPS}",
                                              "pipeline.placement=stage", "local.context=R1", "local.loss=contrast"]),
    "K2xR2 straight, as the killed one": (4, [*RESTARTED_JOB, "train.max_steps=40"]),
    "factory K2xR2": (4, [f"model.arch={FACTORY}", "local.modules=2", "local.context=E", "train.max_steps=4",
                          "train.epochs=1"]),
    "bf16 wire": (2, ["local.modules=2", "local.context=R1E", "train.max_steps=6", "pipeline.wire_dtype=bf16"]),
    "vgg11_bn ddp": (2, ["model.arch=vgg11_bn", "local.modules=1", "train.max_steps=3", "train.epochs=1",
                         "run.mode=ddp"]),
    "ddp": (2, ["run.mode=ddp", f"train.max_steps={DDP_STEPS}", "run.checkpoint_every=3"]),
}


def tiny_config(tmp: Path, name: str, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"run.out_dir={tmp / name}", *overrides])


def torchrun(nproc: int, overrides: list[str], timeout: float = 120.0,
             **popen: object) -> subprocess.CompletedProcess[str]:
    """Run python -m pipeline.train under torchrun; returns the finished process."""
    command = torchrun_command(nproc, overrides)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), **popen)  # type: ignore[call-overload]


def torchrun_jobs(nproc: int, jobs: list[list[str]], folder: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run each job's python -m pipeline.train, in order, in the processes of one torchrun launch (one_launch.py);
    the launch's exit code is the first failing job's."""
    listing = folder / "jobs.json"
    listing.write_text(json.dumps([set_arguments([*TINY, *job]) for job in jobs]))
    command = [*FORKED_TORCHRUN, "--standalone", f"--nproc-per-node={nproc}",
               str(Path(__file__).resolve().parent / "one_launch.py"), str(listing)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def torchrun_command(nproc: int, overrides: list[str], launcher: list[str] = FORKED_TORCHRUN,
                     options: tuple[str, ...] = ()) -> list[str]:
    """python -m pipeline.train on TINY and ``overrides`` under ``launcher`` (tests/forked_torchrun.py: torchrun,
    its workers forked) with its ``options`` besides --standalone and --nproc-per-node."""
    return [*launcher, "--standalone", f"--nproc-per-node={nproc}", *options, "-m", "pipeline.train",
            *set_arguments([*TINY, *overrides])]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the repository, and this folder: configs name small_convnet below as distributed_helpers:small_convnet
    # (which imports tests/forked_torchrun.py: its folder too)
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[1]), str(here), str(here.parent), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def load_module_state(run_dir: Path, module: int) -> dict[str, object]:
    """Module ``module``'s file in run_dir's newest complete checkpoint set."""
    return torch.load(checkpoint.newest_module_file(run_dir, module), weights_only=True)


def assert_same_checkpoints(first: Path, second: Path, modules: int) -> None:
    """Every module's newest complete checkpoint of two runs: the same position, bit-for-bit the same state."""
    for module in range(modules):
        a, b = load_module_state(first, module), load_module_state(second, module)
        assert a["position"] == b["position"], f"module {module} stopped elsewhere"
        assert max_state_difference(a["state"], b["state"]) == 0.0, f"module {module} differs"


def max_state_difference(a: object, b: object) -> float:
    """Largest |a - b| over every tensor of two nested states (module + optimizer)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, "states differ in structure"
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), "states differ in keys"
        return max((max_state_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), "states differ in length"
        return max((max_state_difference(x, y) for x, y in zip(a, b)), default=0.0)
    assert a == b, f"states differ: {a!r} != {b!r}"
    return 0.0
