"""torchrun --nproc-per-node K -m pipeline.classic_pp --config FILE --schedule gpipe|1f1b --microbatches M

Classic pipeline parallelism, what users who cannot fit a network on one device pick: the
end-to-end network (local.modules = 1's, with its weights from the same seed) cut at the local
pipeline's cut points (local.partition with local.modules = K = WORLD_SIZE) and trained end to
end by torch.distributed.pipelining's GPipe or 1F1B schedule over M microbatches per batch,
with the config's SGD recipe. Gradients flow back over the links, so every stage waits for the
ones after it: the benchmark runs this beside the local pipeline on the same cores and cuts.

Rank 0 reads the data and sends each batch's labels to the last rank, where the loss is. Writes
OUT_DIR/summary.json and OUT_DIR/metrics.jsonl in the shape the benchmark reads (one train line
per run.log_every steps with that window's samples/s, per-process peak memory); no evaluation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.cli import ArgumentParser, add_set_argument, exit_process, run_main
from pipeline.config.cuts import describe_cuts, written_cuts
from pipeline.config.loading import e2e_overrides, load_config
from pipeline.config.schema import Config
from pipeline.data.loader import make_loaders
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.errors import BadInput, StageFailure, errors_logged
from pipeline.model.network import build_module, make_layout
from pipeline.model.partition import module_ranges
from pipeline.performance.activations import microbatched_activation_bytes
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.host import keep_freed_host_memory
from pipeline.runtime.metrics import DeviceMemory, MetricsLog, save_summary, say
from pipeline.runtime.optim import LearningRate, make_optimizer
from pipeline.runtime.topology import from_env, joined

Schedule = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[Schedule, ...] = ("gpipe", "1f1b")
LABELS_TAG = 7  # the labels' send from rank 0 to the last rank, apart from the schedule's own traffic


def stage_modules(e2e: Config, spec: DatasetSpec, cuts: list[int]) -> list[nn.Sequential]:
    """The end-to-end network's blocks split at ``cuts``; the last stage ends with the classifier.

    The whole network is built from its seed and then split, so the stages hold exactly the
    weights the end-to-end run starts from.
    """
    whole = build_module(e2e, make_layout(e2e, spec, []), 0, torch.device("cpu"))
    stages = [nn.Sequential(*list(whole.body)[start:end]) for start, end in module_ranges(cuts, len(whole.body))]
    stages[-1].append(whole.head)
    return stages


def in_flight(schedule: Schedule, stage: int, stages: int, microbatches: int) -> int:
    """Microbatches whose activations stage ``stage`` holds at once: GPipe runs every forward
    before any backward; 1F1B starts backward once the pipe is full (stages - stage deep)."""
    return microbatches if schedule == "gpipe" else min(microbatches, stages - stage)


def stage_activation_bytes(e2e: Config, spec: DatasetSpec, cuts: list[int], batch: int, schedule: Schedule,
                           microbatches: int) -> list[int]:
    """Each stage's activation memory: one microbatch's saved tensors x the microbatches in flight
    (pipeline/performance/activations.py counts them)."""
    stages = stage_modules(e2e, spec, cuts)
    held = [in_flight(schedule, index, len(stages), microbatches) for index in range(len(stages))]
    return microbatched_activation_bytes(stages, spec, batch // microbatches, held)


class _Precision(nn.Module):
    """A stage computing and sending as the local pipeline's stages do: under bf16 autocast with
    precision.amp = bf16, its activations on the wire in pipeline.wire_dtype, dense.

    A bf16 wire arrives as bf16 and is restored to float32 only where the stage computes in
    float32 (pipeline/runtime/transport.py does the same); the last stage's logits are float32 for the loss.
    A feature may leave its blocks strided (a ViT's tokens keep the transposed strides of its patch
    embedding), and the links send dense tensors only.
    """

    def __init__(self, inner: nn.Module, device: torch.device, amp: bool, wire: torch.dtype, last: bool) -> None:
        super().__init__()
        self.inner, self.device_type, self.amp, self.wire, self.last = inner, device.type, amp, wire, last

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.amp:
            inputs = inputs.float()
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            output: torch.Tensor = self.inner(inputs)
        return output.float() if self.last else output.to(self.wire).contiguous()


class ClassicStage:
    """This rank's stage: its blocks, the schedule that drives them, its optimizer."""

    def __init__(self, config: Config, stage: nn.Sequential, index: int, stages: int, input_shape: tuple[int, ...],
                 output_shape: tuple[int, ...], schedule: Schedule, microbatches: int,
                 device: torch.device) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.index, self.stages, self.device = index, stages, device
        self.memory_format = torch.channels_last if config.precision.channels_last else torch.contiguous_format
        # Module.to takes memory_format at run time; torch's stubs leave it out
        stage = stage.to(device, memory_format=self.memory_format).train()  # type: ignore[call-overload]
        self.module = stage
        self.optimizer = make_optimizer(stage, config.train)
        self.rate = LearningRate(self.optimizer, config.train)
        amp = config.precision.amp == "bf16"
        wire = torch.bfloat16 if config.pipeline.wire_dtype == "bf16" else torch.float32
        last = index == stages - 1
        runs = _Precision(stage, device, amp, wire, last)
        # Shapes and dtypes of one microbatch on the meta device: the stage needs no exchange at the
        # start. requires_grad marks what carries a gradient back: every received input, every output.
        meta = torch.device("meta")
        received = torch.empty(input_shape, device=meta, dtype=wire if index > 0 else torch.float32,
                               requires_grad=index > 0)
        pipe_stage = PipelineStage(runs, index, stages, device, input_args=received,
                                   output_args=torch.empty(output_shape, device=meta, requires_grad=True,
                                                           dtype=torch.float32 if last else wire))
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        # scale_grads: each microbatch's mean loss, gradients divided by M = the batch's mean loss.
        self.schedule = kind(pipe_stage, microbatches, loss_fn=F.cross_entropy, scale_grads=True)
        self.batch = input_shape[0] * microbatches
        self.labels = torch.empty(self.batch, dtype=torch.int64, device=device)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1

    def step(self, epoch: int, step: int, total_steps: int, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """One training step; rank 0 passes the batch. The last stage returns the batch's mean loss."""
        self.rate.at_step(epoch, step, total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        if self.first:
            assert images is not None and labels is not None
            if not self.last:
                dist.send(labels.contiguous(), self.stages - 1, tag=LABELS_TAG)
            inputs = images.contiguous(memory_format=self.memory_format)
        if self.last and not self.first:
            dist.recv(self.labels, 0, tag=LABELS_TAG)
            labels = self.labels
        losses: list[torch.Tensor] = []
        if self.first:
            self.schedule.step(inputs, target=labels if self.last else None, losses=losses)
        elif self.last:
            self.schedule.step(target=labels, losses=losses)
        else:
            self.schedule.step()
        self.optimizer.step()
        return torch.stack(losses).mean().detach() if losses else None


def build_stage(config: Config, e2e: Config, spec: DatasetSpec, cuts: list[int], rank: int, size: int,
                schedule: Schedule, microbatches: int, device: torch.device) -> ClassicStage:
    """Stage ``rank`` of ``size`` (an initialised process group), its microbatch shapes from the layout."""
    net = make_layout(e2e, spec, cuts).net
    start, end = module_ranges(cuts, len(net))[rank]
    micro = config.data.batch_size // microbatches
    shape_in, shape_out = net.shape(start - 1), net.shape(end - 1)
    output = (micro, spec.classes) if rank == size - 1 else (micro, *shape_out)
    return ClassicStage(config, stage_modules(e2e, spec, cuts)[rank], rank, size,
                        (micro, *shape_in), output, schedule, microbatches,
                        device)


def full_batches(config: Config, device: torch.device, batch: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(epoch, images, labels) of every full batch, epoch after epoch (a short last batch cannot be
    split into equal microbatches, so it is left out). The data is read at once, so a bad path
    ends the run before any process group exists."""
    train, _ = make_loaders(config.data, config.model, config.run.seed, device)

    def walk() -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        epoch = 1
        while True:
            for images, labels in train.batches(epoch):
                if len(labels) == batch:
                    yield epoch, images, labels
            epoch += 1

    return walk()


def refuse_launch(config: Config, spec: DatasetSpec, microbatches: int, size: int) -> None:
    """What a classic pipeline of ``size`` processes cannot run, in one line, before any process group exists."""
    if size < 2:
        raise BadInput(f"pipeline.classic_pp runs one stage per process: launch it with torchrun --nproc-per-node K "
                       f"(K >= 2), not {size} process")
    if config.local.modules != size:
        raise BadInput(f"local.modules = {config.local.modules} but torchrun started {size} processes; the classic "
                       f"pipeline runs one stage per process: set local.modules={size}")
    batch = config.data.batch_size
    if microbatches < 1 or batch % microbatches:
        raise BadInput(f"--microbatches = {microbatches} must divide data.batch_size = {batch} (equal microbatches)")
    spec.refuse_segmentation("pipeline.classic_pp times", "compare a segmentation network's memory with "
                             "python -m pipeline.bench --memory-only")
    if config.train.max_steps < 1:
        raise BadInput("pipeline.classic_pp measures throughput over train.max_steps steps; set train.max_steps > 0")


def train(config_path: str | None, sets: list[str], schedule: Schedule, microbatches: int) -> None:
    config, e2e = load_config(config_path, sets), load_config(config_path, e2e_overrides(sets))
    spec = dataset_spec(config.data, config.model)
    refuse_launch(config, spec, microbatches, int(os.environ.get("WORLD_SIZE", "1")))
    topology = from_env("pipeline", config.run, config.pipeline, config.local.modules, config.precision.amp)
    device, first = topology.device, topology.rank == 0
    keep_freed_host_memory()
    batches = full_batches(config, device, config.data.batch_size) if first else None
    with joined(topology, config.pipeline.timeout_s):
        cuts = topology.comm.broadcast(resolve_cuts(config, spec, device) if first else None, 0)
        stage = build_stage(config, e2e, spec, cuts, topology.rank, topology.size, schedule, microbatches, device)
        if first:
            say(f"[classic {schedule}] {topology.size} stages, cut points {describe_cuts(cuts, config.arch)}, "
                f"{microbatches} microbatches of {config.data.batch_size // microbatches}, {config.train.max_steps} "
                f"steps on {device}, {torch.get_num_threads()} thread(s) per stage")
        every = topology.comm.gather(timed_steps(stage, batches, config, f"classic {schedule}"))
        if first:
            save_summary(config.run.out_dir, classic_summary(config, schedule, microbatches, cuts, every))


def timed_steps(stage: ClassicStage, batches: Iterator[tuple[int, torch.Tensor, torch.Tensor]] | None,
                config: Config, label: str) -> dict[str, Any]:
    """train.max_steps steps, the last stage logging every run.log_every; this process's figures."""
    steps, window, batch = config.train.max_steps, config.run.log_every, config.data.batch_size
    log = MetricsLog(config.run.out_dir, stage.index)
    memory = DeviceMemory(stage.device)
    memory.start()
    losses: list[torch.Tensor] = []
    started = mark = time.perf_counter()
    for step in range(1, steps + 1):
        epoch, images, labels = next(batches) if batches is not None else (1, None, None)
        loss = stage.step(epoch, step, steps, images, labels)
        if loss is not None:
            losses.append(loss)
        if step % window == 0 and stage.last:
            if stage.device.type == "cuda":
                torch.cuda.synchronize(stage.device)
            now = time.perf_counter()
            mean, rate = float(torch.stack(losses).mean()), batch * window / (now - mark)
            log.write(event="train", module=stage.index, epoch=epoch, step=step, loss=mean, lr=stage.rate.value,
                      samples_per_s=round(rate, 2))
            say(f"[{label}] step {step}/{steps} | loss {mean:.3f} | {rate:.0f} samples/s")
            mark, losses = now, []
    train_s = time.perf_counter() - started
    return {"rank": stage.index, "module": stage.index, **memory.figures(),
            "samples_per_s": round(steps * batch / max(train_s, 1e-9), 2)}


def classic_summary(config: Config, schedule: Schedule, microbatches: int, cuts: list[int],
                    stages: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a classic run: ``stages``, every process's figures in rank order (rank 0's rate is the run's)."""
    return {
        "mode": f"classic-{schedule}", "world_size": len(stages), "modules": len(stages),
        "microbatches": microbatches, "arch": config.model.arch, "dataset": config.data.name,
        "batch_size": config.data.batch_size, "steps": config.train.max_steps, "test_accuracy": None,
        "train_samples_per_s": stages[0]["samples_per_s"],
        "cut_points": written_cuts(cuts, config.arch), "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.classic_pp", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b",
                            help="the torch.distributed.pipelining schedule")
        parser.add_argument("--microbatches", type=int, default=4, help="microbatches per batch (M)")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        config = load_config(args.config, args.set)
        Path(config.run.out_dir).mkdir(parents=True, exist_ok=True)
        with errors_logged(config.run.out_dir):
            try:
                train(args.config, args.set, args.schedule, args.microbatches)
            except (BadInput, StageFailure):
                raise
            except Exception as err:  # the job must end with this rank named, as the other modes do
                raise StageFailure(f"classic pipeline rank {os.environ.get('RANK', '0')} failed: "
                                   f"{type(err).__name__}: {err}") from err

    return run_main(body)


if __name__ == "__main__":
    exit_process(main())
