"""What the performance model says of every benchmark row: activation memory (counted exactly), each pipeline
stage's step seconds (predicted from the bench's one profile), bytes on the wire per step and the idle share.

The local runs of K modules share one set of cuts, chosen here once (the config's explicit list or
balanced-memory / balanced; balanced-time otherwise) and written into their command lines, so what is
counted and predicted is what ran. Torch and the model load with this module: the command line imports
it only once its arguments are checked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config.cuts import Cut, written_cuts
from pipeline.config.loading import e2e_overrides, load_config
from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.model.network import build_module, make_layout, make_net
from pipeline.performance.activations import checkpointed_activation_bytes, module_activation_bytes
from pipeline.performance.cost import NetworkProfile, partition_cuts, predicted_stage_seconds
from pipeline.performance.profile import profile_as_a_stage, resolve_cuts
from pipeline.performance.traffic import (
    bubble_fraction,
    classic_pp_bytes,
    ddp_bytes,
    local_pipeline_bytes,
    measured_idle_fraction,
)
from pipeline.tools.bench.runs import BenchRun, Request, bracketing_segments, plan_runs
from pipeline.tools.classic_pp import stage_activation_bytes

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Estimates:
    """The bench's configs, profile and cuts, and the activation memory the run plan depends on."""

    request: Request
    base: Config  # E2E: one module, equal partition, no context
    local: Config  # K = N at the bench's cuts
    spec: DatasetSpec
    profile: NetworkProfile
    device: torch.device  # where the profile ran: where the runs train
    cuts: dict[int, list[int]]  # K -> the flat cuts of the runs of K modules
    plans: dict[int, ContextPlan]  # K -> their ContextPlan
    e2e_activation: int
    ddp_activation: int  # E2E at a process's share of the batch
    local_activation: list[int]  # each of the K = N modules at the whole batch
    checkpointed: dict[int, int]  # segments -> E2E's activation memory recomputing them, at a process's share
    segments: list[int]  # the checkpointed DDP rows'

    @property
    def batch(self) -> int:
        return self.base.data.batch_size

    @property
    def machine(self) -> str:
        cores = f"{os.cpu_count()} CPU cores"
        return cores if self.device.type != "cuda" else f"{cores}, {torch.cuda.get_device_name(0)}"

    @property
    def written_cuts(self) -> dict[int, str]:
        """K -> its cuts as local.partition takes them, for the runs' command lines."""
        return {k: json.dumps(written_cuts(flat, self.local.arch)) for k, flat in self.cuts.items()}

    def config(self, *overrides: str) -> Config:
        return load_config(self.request.config_path, [*self.request.sets, *overrides])

    def share(self, run: BenchRun) -> int:
        """Samples per process of one replica: the batch split over the run's replicas."""
        return -(-self.batch // run.replicas)

    def row(self, run: BenchRun) -> dict[str, Any]:
        """The figures of ``run`` bench.json adds to what the run measured."""
        memory = self.activation(run)
        if run.mode != "pipeline":
            return memory
        predicted = {"predicted_stage_s": [round(seconds, 4) for seconds in predicted_stage_seconds(
            self.profile, self.plans[run.modules], self.cuts[run.modules], self.share(run))]}
        # bench.json has always listed a K x R row's prediction before its memory, the K = N row's after
        return {**memory, **predicted} if run.modules == run.processes else {**predicted, **memory}

    def activation(self, run: BenchRun) -> dict[str, Any]:
        """Activation memory: the largest process's, and each module's (or stage's) where there are several."""
        if run.modules == 1:
            single = (self.checkpointed[run.segments] if run.segments
                      else self.e2e_activation if run.processes == 1 else self.ddp_activation)
            return {"activation_mem_bytes": single}
        if run.mode == "classic_pp":
            per_module = stage_activation_bytes(self.base, self.spec, self.cuts[run.modules],
                                                self.batch, run.schedule, run.microbatches)  # type: ignore[arg-type]
        elif run.modules == self.request.nproc:
            per_module = self.local_activation
        else:  # a K x R layout: each replica holds its share of the batch
            per_module = module_activation_bytes(self.config(f"local.modules={run.modules}", "local.partition=equal"),
                                                 self.spec, self.cuts[run.modules], self.share(run))
        return {"activation_mem_bytes": max(per_module), "module_activation_mem_bytes": per_module}

    def wire_bytes(self, run: BenchRun) -> int:
        """Bytes the run's processes send per step (pipeline/performance/traffic.py's model of each mode)."""
        element = self.profile.wire_element_bytes
        e2e = self.base
        if run.mode == "classic_pp":
            net = make_net(e2e.arch, self.spec, e2e.model.deep_stem)
            return classic_pp_bytes(net, self.cuts[run.modules], self.batch, element)
        if run.processes == 1:
            return 0
        if run.modules == 1:
            return ddp_bytes(build_module(e2e, make_layout(e2e, self.spec, []), 0, CPU), run.processes)
        config = self.config(f"local.modules={run.modules}", "local.partition=equal")
        layout = make_layout(config, self.spec, self.cuts[run.modules])
        return local_pipeline_bytes(
            layout.plan, [layout.input_shape(k) for k in range(run.modules)],
            [build_module(config, layout, k, CPU) for k in range(run.modules)], self.batch, element, run.replicas)


def idle_fraction(run: BenchRun, figures: dict[str, Any]) -> float:
    """Measured for the runs that time compute and waits (1 - mean busy fraction; 0 for one process);
    the schedule's bubble, (K - 1) / (M + K - 1), for the classic rows, which cannot time them."""
    if run.mode == "classic_pp":
        return round(bubble_fraction(run.modules, run.microbatches), 4)
    return measured_idle_fraction(figures["busy_fraction"]) if run.processes > 1 else 0.0


def estimate(request: Request, classic_microbatches: Sequence[int],
             checkpoint_segments: Sequence[int] | None) -> Estimates:
    """Check the config against the run plan, profile it once and choose every K's cuts; count the activation
    memory the checkpointed rows are chosen by."""
    config_path, sets, nproc = request.config_path, request.sets, request.nproc
    base = load_config(config_path, e2e_overrides(sets))
    chosen = load_config(config_path, sets).local.partition
    if isinstance(chosen, list) and len(chosen) + 1 != nproc:
        raise BadInput(f"--nproc = {nproc} but the config's local.partition cuts the network into "
                       f"{len(chosen) + 1} modules; use --nproc {len(chosen) + 1}")
    local = load_config(config_path, [*sets, f"local.modules={nproc}", *_partition(chosen)])
    spec = dataset_spec(local.data, local.model)
    spec.refuse_segmentation("the timed benchmark compares", "count its activation memory with --memory-only")
    for count in classic_microbatches:
        if count < 1 or base.data.batch_size % count:
            raise BadInput(f"--classic-microbatches: {count} does not divide data.batch_size = "
                           f"{base.data.batch_size}; give counts that do (e.g. 2,4,8)")
    units = base.arch.units
    for count in checkpoint_segments or ():
        if not 2 <= count <= units:
            raise BadInput(f"--checkpoint-segments: {count} segments of {base.model.arch}'s {units} blocks; give "
                           f"counts between 2 and {units}")
    profile, device, _ = profile_as_a_stage(local, spec, nproc)
    cuts, plans = {nproc: _cuts(local, spec, profile)}, {nproc: ContextPlan.of(local.local)}
    for run in plan_runs(nproc):  # every other K of the K x R layouts, at balanced-time cuts
        if run.modules not in cuts and run.modules > 1:
            fewer = load_config(config_path, [*sets, f"local.modules={run.modules}", "local.partition=balanced-time"])
            cuts[run.modules], plans[run.modules] = _cuts(fewer, spec, profile), ContextPlan.of(fewer.local)
    batch = base.data.batch_size
    share = -(-batch // nproc)
    local_activation = module_activation_bytes(local, spec, cuts[nproc], batch)
    # Checkpointed DDP holds a process's share of the batch, as DDP does; by default the counts that
    # bracket the pipeline's largest stage, the memory it is compared at.
    candidates = range(2, units + 1) if checkpoint_segments is None else checkpoint_segments
    checkpointed = {count: checkpointed_activation_bytes(base, spec, share, count) for count in candidates}
    segments = (bracketing_segments(checkpointed, max(local_activation)) if checkpoint_segments is None
                else list(checkpoint_segments))
    return Estimates(request, base, local, spec, profile, device, cuts, plans,
                     e2e_activation=module_activation_bytes(base, spec, [], batch)[0],
                     ddp_activation=module_activation_bytes(base, spec, [], share)[0],
                     local_activation=local_activation, checkpointed=checkpointed, segments=segments)


def _partition(chosen: str | list[Cut]) -> list[str]:
    """The cuts the local runs use: the config's explicit list, balanced-memory or balanced, else balanced-time."""
    keep = isinstance(chosen, list) or chosen in ("balanced-memory", "balanced")
    return [] if keep else ["local.partition=balanced-time"]


def _cuts(config: Config, spec: DatasetSpec, profile: NetworkProfile) -> list[int]:
    """An explicit list as given; balanced ones from the bench's one profile."""
    if isinstance(config.local.partition, list) or config.local.partition == "equal":
        return resolve_cuts(config, spec, CPU)
    return partition_cuts(config, profile)
