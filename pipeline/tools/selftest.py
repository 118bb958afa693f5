"""Self-test of a node: run what the visible hardware allows and print a table of checks.

    python -m pipeline.selftest [--out DIR] [--soak STEPS [--one-connection]]

Cluster users run it first on a new node. On GPUs it checks the sequential run against the CPU
reference, the pipeline (K = number of GPUs, up to 4) against the sequential run, a DDP smoke
run, K x R with links, DDP and SyncBatchNorm together against the sequential run, a bf16 wire
(module 0 unchanged, module 1 close), the streaming loader's batches against the CPU loader's,
bf16 autocast with channels_last, that a killed stage ends
the job within pipeline.timeout_s, that a stopped one (hung, not dead: only the project's
deadline can end it) is named by its neighbour, which ends the job within pipeline.timeout_s +
5 s, and that neither a bare training step nor one of every rank of a K x R job (DDP,
SyncBatchNorm, autocast, channels_last) makes a host sync beyond SyncBatchNorm's own. On a
CPU-only machine it runs the CPU subset (sequential == 2-stage pipeline over gloo, a killed and a
stopped stage) and lists what it skipped and why. ``--soak`` runs only a long K x R job, for
hang hunting. Writes selftest.json and selftest.md into --out; exits 0 when nothing failed.

Comparisons: the largest difference of two runs' weights and buffers as a fraction of the
largest change training made (|theta - theta_0|), so a broken step is about 1 off whatever the
weights' size. Every run the checks launch has TF32 off and cuDNN deterministic (``exact_train``).
Tolerances: the constants below; on the same GPU model pipeline and sequential should agree
exactly, against the CPU reference only float reordering remains. Not yet measured on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from pipeline.cli import ArgumentParser, exit_process, run_main, writable_folder
from pipeline.config.loading import load_config
from pipeline.data.loader import make_loaders
from pipeline.data.specs import dataset_spec
from pipeline.data.throughput import write_folder
from pipeline.errors import BadInput
from pipeline.model.network import build_module, make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.checkpoint import newest_module_file
from pipeline.runtime.packet import Packet
from pipeline.runtime.worker import make_worker
from pipeline.tools.sync_probe import from_sync_batchnorm
from pipeline.tools.torchrun import module_command, set_arguments, torchrun_command
from pipeline.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.name=synthetic", "model.arch=resnet8", "data.batch_size=16", "run.log_every=4",
        "train.schedule=constant", "train.lr=0.05", "train.max_steps=6", "pipeline.threads_per_stage=1",
        "pipeline.timeout_s=60", "local.context=R1"]
# Tolerances on the largest difference between two runs' weights and buffers, as a fraction of the
# largest change training made to them (|theta - theta_0|): a broken step is off by about 1.
CPU_TOLERANCE = 1e-6  # pipeline == sequential on CPU: bit for bit in practice
GPU_TOLERANCE = 1e-6  # the same on one GPU model, TF32 off and cuDNN deterministic: exact expected
GPU_VS_CPU_TOLERANCE = 1e-2  # float reordering between CPU and GPU kernels, TF32 off
K_BY_R_TOLERANCE = 1e-3  # DDP's averaged gradients and SyncBatchNorm's statistics, reordered sums
BF16_WIRE_TOLERANCE = 0.1  # module 1 trains on activations rounded to bf16
EXACT = "exact"  # first argument of a child run: pipeline.train with TF32 off and cuDNN deterministic
KILL_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10  # short: the stopped-stage check waits this + 5 s on every self-test


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skipped
    figure: str = ""
    note: str = ""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _sets(overrides: list[str]) -> list[str]:
    return set_arguments([*TINY, *overrides])


def _torchrun(nproc: int, overrides: list[str]) -> list[str]:
    return torchrun_command(nproc, "pipeline.selftest", [EXACT, *_sets(overrides)])


def _sequential(out: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    command = module_command(1, "pipeline.selftest", [EXACT, *_sets([f"run.out_dir={out}", *overrides])])
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=_env())


def exact_train(argv: list[str]) -> int:
    """pipeline.train with TF32 off and cuDNN deterministic (no benchmarking), so two runs on one GPU
    model can be compared exactly and a GPU run against the CPU reference closely."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return train_main(argv)


def _job(nproc: int, out: Path, overrides: list[str], timeout_s: float = 300,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun(nproc, [f"run.out_dir={out}", *overrides]), check=False, capture_output=True,
                          text=True, timeout=timeout_s, env={**_env(), **(env or {})})


def _failed(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"


def _difference(a: Any, b: Any, integers: bool = True) -> float:
    """The largest |a - b| over the floating tensors in ``a`` and ``b``; unequal integer tensors (a
    step counter) are infinitely apart unless ``integers`` is False, which leaves them out."""
    if isinstance(a, torch.Tensor):
        if not a.is_floating_point():
            return 0.0 if not integers or torch.equal(a.cpu(), b.cpu()) else float("inf")
        return float((a.double().cpu() - b.double().cpu()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        return max((_difference(a[key], b[key], integers) for key in a), default=0.0)
    if isinstance(a, (list, tuple)):
        return max((_difference(x, y, integers) for x, y in zip(a, b)), default=0.0)
    return 0.0


def _module_states(run: Path, modules: int) -> list[Any]:
    return [torch.load(newest_module_file(run, k), weights_only=True, map_location="cpu")["state"]["module"]
            for k in range(modules)]


def _initial_states(overrides: list[str], modules: int) -> list[Any]:
    """The modules' weights and buffers before training: built from the same config and seed."""
    config = load_config(None, [*TINY, *overrides])
    spec, cpu = dataset_spec(config.data, config.model), torch.device("cpu")
    layout = make_layout(config, spec, resolve_cuts(config, spec, cpu))
    return [build_module(config, layout, k, cpu).state_dict() for k in range(modules)]


def relative_difference(first: list[Any], second: list[Any], initial: list[Any]) -> float:
    """max |first - second| over every floating tensor, over the largest |first - initial|: 0 when the
    runs agree, about 1 when one of them did not train as the other did."""
    update = max(_difference(a, b, integers=False) for a, b in zip(first, initial))
    return max(_difference(a, b) for a, b in zip(first, second)) / max(update, 1e-30)


def _ran_all(runs: list[Callable[[], subprocess.CompletedProcess[str]]]) -> str:
    """Run ``runs`` in turn; the first failure's note, or "" when all exited 0."""
    for run in runs:
        done = run()
        if done.returncode != 0:
            return _failed(done)
    return ""


def _relative(outs: list[Path], overrides: list[str], modules: int, only: list[int]) -> float:
    """``relative_difference`` of two finished runs over the modules ``only``."""
    first, second = (_module_states(out, modules) for out in outs)
    initial = _initial_states(overrides, modules)
    return relative_difference(*([states[k] for k in only] for states in (first, second, initial)))


def _compare(name: str, runs: list[Callable[[], subprocess.CompletedProcess[str]]], outs: list[Path],
             overrides: list[str], modules: int, tolerance: float) -> Check:
    """Run ``runs``, then compare their modules relative to the update."""
    failed = _ran_all(runs)
    if failed:
        return Check(name, "fail", note=failed)
    difference = _relative(outs, overrides, modules, list(range(modules)))
    status = "pass" if difference <= tolerance else "fail"
    return Check(name, status, f"max diff {difference:.2e} of the update (tolerance {tolerance:g})")


def pipeline_equals_sequential(root: Path, modules: int, device: str, tolerance: float) -> Check:
    common = [f"local.modules={modules}", f"run.device={device}"]
    seq, pipe = root / f"sequential_{device}_k{modules}", root / f"pipeline_{device}_k{modules}"
    backend = "NCCL" if device == "cuda" else "gloo"
    return _compare(f"pipeline K={modules} ({backend}) == sequential", [
        lambda: _sequential(seq, common),
        lambda: _job(modules, pipe, ["run.mode=pipeline", *common]),
    ], [seq, pipe], common, modules, tolerance)


def gpu_equals_cpu(root: Path) -> Check:
    common = ["local.modules=2"]
    cpu, gpu = root / "sequential_cpu", root / "sequential_gpu"
    return _compare("sequential on GPU ~ CPU reference", [
        lambda: _sequential(cpu, [*common, "run.device=cpu"]),
        lambda: _sequential(gpu, [*common, "run.device=cuda"]),
    ], [cpu, gpu], common, 2, GPU_VS_CPU_TOLERANCE)


def k_by_r_equals_sequential(root: Path, gpus: int) -> Check:
    """Links, DDP and SyncBatchNorm together: K x R with synchronised batch statistics trains as one
    process on the whole batch does (K = 2, R = 2 on 4 GPUs; K = 1, R = 2 on 2 or 3)."""
    stages, replicas = (2, 2) if gpus >= 4 else (1, 2)
    common = [f"local.modules={stages}", "run.device=cuda"]
    seq, job = root / f"sequential_k{stages}", root / f"k{stages}_r{replicas}"
    mode = "pipeline" if stages > 1 else "ddp"
    return _compare(f"K x R = {stages} x {replicas} (links, DDP, SyncBN) ~ sequential", [
        lambda: _sequential(seq, common),
        lambda: _job(stages * replicas, job, [f"run.mode={mode}", "pipeline.sync_batchnorm=true", *common]),
    ], [seq, job], common, stages, K_BY_R_TOLERANCE)


def bf16_wire_equals_sequential(root: Path) -> Check:
    """A bf16 wire changes only what crosses it: module 0 (which receives nothing) equals the
    sequential run, module 1 stays within a tenth of its update."""
    name = "bf16 wire: module 0 == sequential, module 1 close"
    common = ["local.modules=2", "run.device=cuda"]
    seq, job = root / "sequential_bf16_reference", root / "bf16_wire"
    failed = _ran_all([lambda: _sequential(seq, common),
                       lambda: _job(2, job, ["run.mode=pipeline", "pipeline.wire_dtype=bf16", *common])])
    if failed:
        return Check(name, "fail", note=failed)
    zero, one = (_relative([seq, job], common, 2, [k]) for k in (0, 1))
    status = "pass" if zero <= GPU_TOLERANCE and one <= BF16_WIRE_TOLERANCE else "fail"
    return Check(name, status, f"of the update: module 0 {zero:.2e} (tolerance {GPU_TOLERANCE:g}), module 1 "
                               f"{one:.2e} (tolerance {BF16_WIRE_TOLERANCE:g})")


def ddp_smoke(root: Path, gpus: int) -> Check:
    out = root / "ddp"
    done = _job(gpus, out, ["run.mode=ddp", "local.modules=1", "run.device=cuda"])
    if done.returncode != 0:
        return Check(f"DDP smoke (R={gpus})", "fail", note=_failed(done))
    summary = json.loads((out / "summary.json").read_text())
    return Check(f"DDP smoke (R={gpus})", "pass", f"{summary['train_samples_per_s']:.0f} samples/s")


def bf16_smoke(root: Path, gpus: int) -> Check:
    precise = ["precision.amp=bf16", "precision.channels_last=true", "run.device=cuda"]
    if gpus >= 2:
        done = _job(2, root / "bf16", ["run.mode=pipeline", "local.modules=2", "pipeline.wire_dtype=bf16", *precise])
        name = "bf16 autocast + channels_last + bf16 wire"
    else:
        done = _sequential(root / "bf16", ["local.modules=2", *precise])
        name = "bf16 autocast + channels_last (1 GPU: no wire)"
    if done.returncode != 0:
        return Check(name, "fail", note=_failed(done))
    return Check(name, "pass", "trained 6 steps, finite losses")


def _training_job(out: Path, device: str, timeout_s: float, log: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """A 2-stage pipeline job that trains until stopped, and its rank 1 once both ranks train
    (None if the job never got there)."""
    command = _torchrun(2, [f"run.out_dir={out}", "run.mode=pipeline", "local.modules=2", f"run.device={device}",
                            "train.max_steps=100000", "train.epochs=1000", "run.log_every=2",
                            f"pipeline.timeout_s={timeout_s:g}"])
    with log.open("wb") as sink:
        job = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=_env())
    metrics, started = out / "metrics.jsonl", time.monotonic()
    while not (metrics.exists() and "\"rank\": 1" in metrics.read_text()):
        if time.monotonic() - started > 120 or job.poll() is not None:
            return job, None
        time.sleep(0.2)
    return job, next(p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1")


def _seconds_to_end(job: subprocess.Popen[bytes], victim: Any, act: str, limit_s: float) -> float | str:
    """Kill or stop (SIGSTOP) ``victim``: the seconds until the job ended, or why the check fails."""
    try:
        if victim is None:
            return "the job never started training"
        if act == "kill":
            victim.kill()
        else:
            victim.suspend()
        acted = time.monotonic()
        try:
            job.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            return f"still running {limit_s:g} s after the {act}"
        return time.monotonic() - acted
    finally:
        _end(job)


def _end(job: subprocess.Popen[bytes]) -> None:
    """Kill what is left of a job: its processes first (a stopped one included), then torchrun."""
    if job.poll() is None:
        for process in psutil.Process(job.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                process.kill()
        job.kill()
        job.wait()


def killed_stage(root: Path, device: str) -> Check:
    """SIGKILL stage 1 mid-run: the job must end, non-zero, within pipeline.timeout_s.

    torchrun's agent sees the dead process and ends the others itself, so this proves the
    launcher's part only; ``stopped_stage`` proves the project's own deadline."""
    name = f"killed stage ends the job within timeout_s ({KILL_TIMEOUT_S} s)"
    name += " on GPUs (NCCL)" if device == "cuda" else ""
    job, victim = _training_job(root / "killed", device, KILL_TIMEOUT_S, root / "killed.log")
    took = _seconds_to_end(job, victim, "kill", KILL_TIMEOUT_S + 15)
    if isinstance(took, str):
        return Check(name, "fail", note=took)
    status = "pass" if job.returncode != 0 and took <= KILL_TIMEOUT_S else "fail"
    return Check(name, status, f"ended {took:.1f} s after the kill, exit {job.returncode}")


def stopped_stage(root: Path, device: str, timeout_s: float = STOP_TIMEOUT_S, deadline_s: float | None = None) -> Check:
    """SIGSTOP stage 1 mid-run: it hangs without dying, so torchrun's agent sees nothing wrong and
    only the project's deadline can end the job. Rank 0 must end it, non-zero, within
    ``timeout_s`` + 5 s, its failure line naming rank 1. ``deadline_s`` is the job's own
    pipeline.timeout_s (``timeout_s`` unless a test disables the deadline with a far one)."""
    name = f"stopped stage: its neighbour ends the job within timeout_s + 5 s ({timeout_s:g} + 5 s)"
    name += " on GPUs (NCCL)" if device == "cuda" else ""
    log = root / f"stopped_{device}.log"
    job, victim = _training_job(root / f"stopped_{device}", device, deadline_s or timeout_s, log)
    took = _seconds_to_end(job, victim, "stop", timeout_s + 5)
    if isinstance(took, str):
        return Check(name, "fail", note=took)
    lines = log.read_text(errors="replace").splitlines()
    named = [line for line in lines if "stage on rank 0 (module 0) failed" in line
             and "rank 1" in line.split("failed", 1)[1]]
    figure = f"ended {took:.1f} s after the stop, exit {job.returncode}"
    if job.returncode == 0 or not named:
        return Check(name, "fail", figure, "no failure line of rank 0 names rank 1")
    return Check(name, "pass", figure, named[0].split("failed: ", 1)[1][:160])


def no_host_sync(root: Path) -> Check:
    """One training step (batch, forward, backward, SGD step) under set_sync_debug_mode("error")."""
    name = "no host sync in a training step"
    config = load_config(None, [*TINY, "local.modules=1", "run.device=cuda", f"run.out_dir={root / 'sync'}"])
    device = torch.device("cuda", 0)
    train, _ = make_loaders(config.data, config.model, config.run.seed, device)
    layout = make_layout(config, train.spec, resolve_cuts(config, train.spec, device))
    worker = make_worker(config, layout, 0, device)
    batches = train.batches(1)
    images, labels = next(batches)
    worker.train_step(Packet.from_batch(images, labels))  # warm-up: allocator, cuDNN algorithm choice
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, labels = next(batches)
        worker.train_step(Packet.from_batch(images, labels))
    except RuntimeError as err:
        return Check(name, "fail", note=str(err).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Check(name, "pass", "set_sync_debug_mode('error') raised nothing")


def streaming_loader_matches(root: Path, device: str) -> Check:
    """The streaming loader on ``device`` (2 worker processes; on a GPU pinned memory, an
    asynchronous copy and normalisation on the device) yields the batches the CPU loader with no
    workers does: an image folder of 48 small JPEG and PNG files, written here."""
    name = "streaming loader (image folder, 2 workers)" + (" on GPU == CPU" if device == "cuda" else " == 0 workers")
    folder = root / "images"
    write_folder(folder, 48, 3, size=(40, 32), png_every=3)

    def epoch(on: str, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        config = load_config(None, ["data.name=image_folder", f"data.root='{folder}'", "data.image_size=16",
                                    "data.eval_resize=20", "data.batch_size=8", f"data.workers={workers}",
                                    f"run.device={on}", "model.arch=resnet18"])
        train, _ = make_loaders(config.data, config.model, config.run.seed, torch.device(on))
        return [(images.cpu(), labels.cpu()) for images, labels in train.batches(1)]

    streamed, reference = epoch(device, 2), epoch("cpu", 0)
    if len(streamed) != len(reference) or any(not torch.equal(a[1], b[1]) for a, b in zip(streamed, reference)):
        return Check(name, "fail", note="the batches' labels or count differ")
    difference = max(float((a[0] - b[0]).abs().max()) for a, b in zip(streamed, reference))
    status = "pass" if difference <= 1e-6 else "fail"
    return Check(name, status, f"{len(streamed)} batches, max image diff {difference:.1e} (tolerance 1e-06)")


def visible_gpus() -> int:
    """The CUDA GPUs this process sees (0 without a usable CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def soak(root: Path, steps: int, one_connection: bool) -> Check:
    """A long pipeline job for hang hunting: K = 4, R = 2 where 8 GPUs allow (K = min(GPUs, 4), R = 2
    where there are 2K, else 1; 2 x 1 over gloo on CPU), ``steps`` steps with an evaluation and a
    checkpoint at every epoch end. It must finish; a hang ends at pipeline.timeout_s naming the rank.
    ``one_connection``: CUDA_DEVICE_MAX_CONNECTIONS=1, one hardware queue for every stream, where
    a missing dependency between the compute and link streams is likelier to deadlock."""
    gpus = visible_gpus()
    stages = min(4, gpus) if gpus >= 2 else 2
    replicas = 2 if gpus >= 2 * stages else 1
    device = "cuda" if gpus >= 2 else "cpu"
    name = f"soak: K x R = {stages} x {replicas} on {device}, {steps} steps"
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if one_connection else {}
    name += ", CUDA_DEVICE_MAX_CONNECTIONS=1" if one_connection else ""
    out = root / "soak"
    done = _job(stages * replicas, out, ["run.mode=pipeline", f"local.modules={stages}", f"run.device={device}",
                                         f"train.max_steps={steps}", "train.epochs=100000", "run.log_every=50"],
                timeout_s=600 + steps, env=env)
    if done.returncode != 0:
        return Check(name, "fail", note=_failed(done))
    summary = json.loads((out / "summary.json").read_text())
    return Check(name, "pass", f"{summary['steps']} steps, {summary['train_samples_per_s']:.0f} samples/s, "
                               f"{summary['wall_s']:.0f} s")


def sync_verdict(name: str, records: list[dict[str, Any]]) -> Check:
    """The K x R step passes when every host sync it made came from torch's SyncBatchNorm, whose
    count mask syncs in each layer's forward (docs/gpu.md): those are counted, not failed."""
    sites = [site for record in records for site in record["syncs"]]
    other = [site for site in sites if not from_sync_batchnorm(site)]
    layers = sum(record["sync_batchnorm_layers"] for record in records)
    figure = (f"{len(other)} syncs outside SyncBatchNorm; {len(sites) - len(other)} in its {layers} layers "
              f"over {len(records)} ranks")
    return Check(name, "fail" if other else "pass", figure, ", ".join(sorted(set(other))[:3]))


def no_host_sync_k_by_r(root: Path, gpus: int) -> Check:
    """One step of every rank of a K x R job (pipeline/tools/sync_probe.py): DDP, SyncBatchNorm, bf16
    autocast (where the GPUs have bf16) and channels_last together."""
    stages, replicas = (2, 2) if gpus >= 4 else (1, 2)
    amp = "bf16" if torch.cuda.is_bf16_supported() else "none"
    name = f"no host sync in a K x R step ({stages} x {replicas}: DDP, SyncBN, amp {amp}, channels_last)"
    out = root / "sync_k_by_r"
    out.mkdir()
    overrides = [f"run.out_dir={out}", f"local.modules={stages}", "run.device=cuda", "pipeline.sync_batchnorm=true",
                 f"precision.amp={amp}", "precision.channels_last=true"]
    command = torchrun_command(stages * replicas, "pipeline.sync_probe", ["--out", str(out), *_sets(overrides)])
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, env=_env())
    if done.returncode != 0:
        return Check(name, "fail", note=_failed(done))
    return sync_verdict(name, [json.loads(path.read_text()) for path in sorted(out.glob("sync_rank*.json"))])


def run_checks(root: Path) -> list[Check]:
    gpus = visible_gpus()
    checks: list[Check] = []

    def skip(name: str, why: str) -> None:
        checks.append(Check(name, "skipped", note=why))

    checks.append(pipeline_equals_sequential(root, 2, "cpu", CPU_TOLERANCE))
    checks.append(killed_stage(root, "cpu"))
    checks.append(stopped_stage(root, "cpu"))
    if gpus == 0:
        why = "no CUDA GPU visible"
        for name in ("sequential on GPU ~ CPU reference", "pipeline on the GPUs == sequential", "DDP smoke",
                     "streaming loader (image folder, 2 workers) on GPU == CPU",
                     "K x R (links, DDP, SyncBN) ~ sequential", "bf16 wire: module 0 == sequential, module 1 close",
                     "bf16 autocast + channels_last + bf16 wire", "killed stage on GPUs (NCCL)",
                     "stopped stage on GPUs (NCCL)", "no host sync in a K x R step",
                     "no host sync in a training step"):
            skip(name, why)
        return checks
    checks.append(gpu_equals_cpu(root))
    if gpus >= 2:
        checks.append(pipeline_equals_sequential(root, min(gpus, 4), "cuda", GPU_TOLERANCE))
        checks.append(ddp_smoke(root, min(gpus, 4)))
        checks.append(k_by_r_equals_sequential(root, gpus))
        checks.append(bf16_wire_equals_sequential(root))
    else:
        for name in ("pipeline on the GPUs == sequential", "DDP smoke", "K x R (links, DDP, SyncBN) ~ sequential",
                     "bf16 wire: module 0 == sequential, module 1 close"):
            skip(name, "needs 2 GPUs, 1 visible")
    checks.append(streaming_loader_matches(root, "cuda"))
    checks.append(bf16_smoke(root, gpus))
    if gpus >= 2:
        checks.append(killed_stage(root, "cuda"))
        checks.append(stopped_stage(root, "cuda"))
    else:
        skip("killed stage on GPUs (NCCL)", "needs 2 GPUs, 1 visible")
        skip("stopped stage on GPUs (NCCL)", "needs 2 GPUs, 1 visible")
    checks.append(no_host_sync(root))
    if gpus >= 2:
        checks.append(no_host_sync_k_by_r(root, gpus))
    else:
        skip("no host sync in a K x R step", "needs 2 GPUs, 1 visible")
    return checks


def table(checks: list[Check]) -> str:
    rows = ["| check | result | figures | note |", "|---|---|---|---|"]
    rows += [f"| {c.name} | {c.status} | {c.figure} | {c.note} |" for c in checks]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipeline.selftest", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/selftest", help="where selftest.json and selftest.md go")
    parser.add_argument("--soak", type=int, default=0, metavar="STEPS",
                        help="run only a long K x R pipeline job of STEPS steps (hang hunting; docs/gpu.md)")
    parser.add_argument("--one-connection", action="store_true",
                        help="with --soak: CUDA_DEVICE_MAX_CONNECTIONS=1 (one hardware queue for every stream)")
    args = parser.parse_args(argv)
    if args.soak < 0 or (args.one_connection and not args.soak):
        raise BadInput("--soak takes a number of steps > 0, and --one-connection goes with --soak")
    out = writable_folder(args.out)
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    with tempfile.TemporaryDirectory(prefix="selftest_", dir=out) as scratch:
        checks = [soak(Path(scratch), args.soak, args.one_connection)] if args.soak else run_checks(Path(scratch))
    failed = sum(c.status == "fail" for c in checks)
    text = table(checks)
    print(text, flush=True)
    header = (f"# localpipe self-test\n\ntorch {torch.__version__}, {device}, "
              f"{visible_gpus()} GPU(s), "
              f"{time.perf_counter() - started:.0f} s; {failed} failed\n\n")
    (out / "selftest.md").write_text(header + text + "\n")
    record = {"torch": torch.__version__, "device": device, "failed": failed, "checks": [asdict(c) for c in checks]}
    (out / "selftest.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"self-test: {failed} failed; wrote {out / 'selftest.md'} and {out / 'selftest.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:2] == [EXACT]:  # a run one of the checks launched
        exit_process(exact_train(sys.argv[2:]))
    returned: list[int] = []  # main's count of failed checks as an exit code; run_main's for what it raised
    sys.exit(run_main(lambda: returned.append(main())) or (returned[0] if returned else 0))
