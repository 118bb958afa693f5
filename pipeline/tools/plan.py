"""python -m pipeline.plan --config FILE --devices N [--memory-gib M] [--link-gbps B] [--checkpoint-segments S]

Profiles the config's network on this device (each piece's step seconds, activation bytes,
parameter bytes; pipeline/performance/profile.py, pipeline/performance/cost.py) and predicts, for every
layout K x R = N the network allows (K modules in a pipeline, R replicas of it; DDP is K = 1 x R = N), the cuts,
the largest batch per device that fits M GiB, samples/s, memory per device and the bytes each
step moves over the links and in all-reduces, then recommends one. Where DDP does not fit M,
DDP with activation checkpointing (the fewest segments of blocks that fit; pipeline/model/recompute.py)
is one more layout, priced with the forward it recomputes; the recommendation weighs it against
the pipelines and says why it picked one; --checkpoint-segments S adds it over S segments whether
or not DDP fits (the row to hold against the benchmark's ddp_checkpointed_s{S}). On a CPU each of the N
processes gets its share of the cores, so the profile runs with that many threads.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config.cuts import cut_notation, written_cuts
from pipeline.config.loading import load_config
from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.partition import NoPartitionBuilds, NoPartitionFits, min_max_partition, module_ranges
from pipeline.performance.cost import (
    END_TO_END,
    NetworkProfile,
    Starts,
    buildable,
    recompute_seconds,
    sent_bytes,
    stage_parameter_bytes,
)
from pipeline.performance.device import (
    allreduce_bytes,
    checkpointed_memory_bytes,
    checkpointed_seconds,
    device_memory_bytes,
    device_seconds,
    largest_batch,
)

GIB = 1 << 30
MIB = 1 << 20
BATCH_BOUND = 1 << 26  # the largest batch per replica a layout reports


@dataclass(frozen=True)
class Cluster:
    devices: int
    memory_bytes: float  # per device; inf: not given
    link_bytes_per_s: float
    queue_depth: int  # packets each end of a link may hold


@dataclass(frozen=True)
class Layout:
    modules: int  # K
    replicas: int  # R
    cuts: list[int]
    batch_per_replica: int
    stage_seconds: list[float]  # one step of each stage, all-reduce included
    memory_bytes: list[int]  # each stage's device
    link_bytes: int  # per step over the K - 1 links of one replica
    allreduce_bytes: int  # per step, sent by the device of the stage with the most parameters
    max_batch_per_replica: int | None  # largest batch every stage's device holds in M; None: no M
    fits: bool  # the cuts keep every device under M at this batch
    checkpoint_segments: int = 0  # DDP with activation checkpointing over S segments (pipeline/model/recompute.py)
    recompute_s: float = 0.0  # of stage_seconds: recomputing the checkpointed segments' forward

    @property
    def samples_per_s(self) -> float:
        return self.replicas * self.batch_per_replica / max(self.stage_seconds)

    @property
    def name(self) -> str:
        if self.checkpoint_segments:
            return f"DDP checkpointed over {self.checkpoint_segments} segments"
        return "DDP" if self.modules == 1 else f"{self.modules} x {self.replicas}"


def largest_batch_per_replica(profile: NetworkProfile, plan: ContextPlan, ranges: list[tuple[int, int]],
                              replicas: int, cluster: Cluster) -> int | None:
    """The largest batch per replica every stage's device holds; None where memory is unbounded."""
    if math.isinf(cluster.memory_bytes):
        return None
    starts = [start for start, _ in ranges]

    def stage(index: int, start: int, end: int) -> int:
        return largest_batch(lambda batch: device_memory_bytes(profile, plan, index, start, end, batch, replicas,
                                                               cluster.queue_depth, starts), cluster.memory_bytes)

    return min([BATCH_BOUND, *(stage(index, start, end) for index, (start, end) in enumerate(ranges))])


def plan_layout(profile: NetworkProfile, plan: ContextPlan, replicas: int, batch: int, cluster: Cluster) -> Layout:
    """K = plan.modules x R = replicas at a global ``batch``: the fastest cuts that fit M, and their figures."""
    modules, link = plan.modules, cluster.link_bytes_per_s
    per_replica = -(-batch // replicas)

    def seconds(index: int, start: int, end: int, starts: Starts = None) -> float:
        return device_seconds(profile, plan, index, start, end, per_replica, replicas, link, starts)

    def memory(index: int, start: int, end: int, starts: Starts = None) -> float:
        return float(device_memory_bytes(profile, plan, index, start, end, per_replica, replicas,
                                         cluster.queue_depth, starts))

    fastest, smallest = buildable(profile, plan, seconds), buildable(profile, plan, memory)
    try:
        cuts, fits = min_max_partition(len(profile), modules, fastest, smallest, cluster.memory_bytes), True
    except NoPartitionFits:
        cuts, fits = min_max_partition(len(profile), modules, smallest), False  # the least memory it can take
    ranges = module_ranges(cuts, len(profile))
    starts = [start for start, _ in ranges]  # the cuts known: the register's true sources
    return Layout(
        modules=modules, replicas=replicas, cuts=cuts, batch_per_replica=per_replica,
        stage_seconds=[seconds(index, start, end, starts) for index, (start, end) in enumerate(ranges)],
        memory_bytes=[round(memory(index, start, end, starts)) for index, (start, end) in enumerate(ranges)],
        link_bytes=sum(sent_bytes(profile, plan, index, end, per_replica, starts)
                       for index, (_, end) in enumerate(ranges)),
        allreduce_bytes=max(allreduce_bytes(stage_parameter_bytes(profile, plan, index, start, end, starts), replicas)
                            for index, (start, end) in enumerate(ranges)),
        max_batch_per_replica=largest_batch_per_replica(profile, plan, ranges, replicas, cluster),
        fits=fits,
    )


def plan_checkpointed(profile: NetworkProfile, replicas: int, batch: int, cluster: Cluster,
                      segments: int = 0) -> Layout:
    """DDP over ``replicas`` devices with activation checkpointing over ``segments`` segments, by default the
    fewest that fit M (each more recomputes more), or where none does, the count that takes the least memory."""
    per_replica = -(-batch // replicas)

    def memory(count: int, at: int = per_replica) -> int:
        return checkpointed_memory_bytes(profile, count, at, replicas)

    counts = range(2, len(profile) + 1) if not segments else [segments]
    fitting = [count for count in counts if memory(count) <= cluster.memory_bytes]
    segments = fitting[0] if fitting else min(counts, key=memory)
    largest = None if math.isinf(cluster.memory_bytes) else largest_batch(
        lambda at: memory(segments, at), cluster.memory_bytes)
    return Layout(
        modules=1, replicas=replicas, cuts=[], batch_per_replica=per_replica,
        stage_seconds=[checkpointed_seconds(profile, segments, per_replica, replicas, cluster.link_bytes_per_s)],
        memory_bytes=[memory(segments)], link_bytes=0,
        allreduce_bytes=allreduce_bytes(stage_parameter_bytes(profile, END_TO_END, 0, 0, len(profile)), replicas),
        max_batch_per_replica=largest, fits=bool(fitting), checkpoint_segments=segments,
        recompute_s=recompute_seconds(profile, segments, per_replica))


def plan_layouts(profile: NetworkProfile, depth: int, image: bool, reconstruct: bool, batch: int,
                 cluster: Cluster, checkpoint_segments: int = 0) -> list[Layout]:
    """Every K x R = N the network allows (K divides N, K <= its blocks, Rn looks back fewer than K, some cut
    builds every module), and where DDP does not fit M (or ``checkpoint_segments`` is given), DDP with
    activation checkpointing."""
    layouts = []
    for modules in range(1, cluster.devices + 1):
        if cluster.devices % modules or modules > len(profile) or (modules > 1 and depth >= modules):
            continue
        plan = END_TO_END if modules == 1 else ContextPlan(modules, depth, image, reconstruct)
        try:
            layouts.append(plan_layout(profile, plan, cluster.devices // modules, batch, cluster))
        except NoPartitionBuilds:  # the context or decoder does not fit wherever K modules could be cut
            continue
        if modules == 1 and (checkpoint_segments or (not layouts[0].fits and len(profile) >= 2)):
            # what saves memory before local learning does
            layouts.append(plan_checkpointed(profile, cluster.devices, batch, cluster, checkpoint_segments))
    return layouts


def recommend(layouts: list[Layout], batch: int, cluster: Cluster) -> tuple[Layout, str]:
    """The fastest layout that fits M at this batch, and why; with none fitting, the roomiest."""
    fitting = [layout for layout in layouts if layout.fits]
    ddp = next(layout for layout in layouts if layout.modules == 1 and not layout.checkpoint_segments)
    if not fitting:
        roomiest = max(layouts, key=lambda layout: layout.max_batch_per_replica or 0)
        return roomiest, (
            f"no layout holds batch {batch} in {cluster.memory_bytes / GIB:g} GiB per device; {roomiest.name} holds "
            f"the largest batch per replica ({roomiest.max_batch_per_replica}): lower data.batch_size to "
            f"{(roomiest.max_batch_per_replica or 0) * roomiest.replicas} or use devices with more memory")
    best = max(fitting, key=lambda layout: layout.samples_per_s)
    speed = f"{best.samples_per_s:.0f} samples/s"
    if best is ddp:
        return best, f"DDP is the fastest layout that fits ({speed}); local learning would trade accuracy for nothing"
    if best.checkpoint_segments:
        return best, (f"DDP does not fit, and with activation checkpointing it does: {speed}, "
                      f"{_against_pipelines(best, layouts)}; it recomputes {best.recompute_s * 1e3:.1f} ms of "
                      f"forward per step ({best.recompute_s / best.stage_seconds[0]:.0%} of the step) and trains "
                      "end to end, so no accuracy is traded")
    versus = (f"{best.samples_per_s / ddp.samples_per_s:.2f}x DDP" if ddp.fits
              else "DDP does not fit (each device would hold the whole network: weights, optimizer state, "
                   "activations)" + _checkpointed_clause(best, layouts))
    return best, (f"fastest layout that fits: {speed}, {versus}; its slowest stage takes "
                  f"{max(best.stage_seconds) * 1e3:.1f} ms per step. Local learning trains K modules on local "
                  "losses: check the accuracy cost for this K (docs/measurements.md)")


def _against_pipelines(best: Layout, layouts: list[Layout]) -> str:
    pipelines = [layout for layout in layouts if layout.modules > 1 and layout.fits]
    if not pipelines:
        return "and no pipeline fits"
    fastest = max(pipelines, key=lambda layout: layout.samples_per_s)
    return f"{best.samples_per_s / fastest.samples_per_s:.2f}x the fastest pipeline that fits ({fastest.name})"


def _checkpointed_clause(best: Layout, layouts: list[Layout]) -> str:
    checkpointed = next((layout for layout in layouts if layout.checkpoint_segments), None)
    if checkpointed is None:
        return ""
    if not checkpointed.fits:
        return (f", not even with activation checkpointing (at best {max(checkpointed.memory_bytes) / GIB:.2f} GiB "
                f"over {checkpointed.checkpoint_segments} segments)")
    return (f", and {checkpointed.name} fits but is slower: {checkpointed.samples_per_s:.0f} samples/s "
            f"({best.samples_per_s / checkpointed.samples_per_s:.2f}x less than this), recomputing "
            f"{checkpointed.recompute_s * 1e3:.1f} ms of forward per step")


def table(layouts: list[Layout], arch: NetworkSpec) -> str:
    lines = [f"| layout K x R | cuts ({cut_notation(arch)}) | batch / device (max in M) | samples/s "
             "| memory / device (GiB) | link MiB / step | all-reduce MiB / step / device | recompute ms / step |",
             "|---|---|---|---|---|---|---|---|"]
    for layout in layouts:
        cuts = " ".join(map(str, written_cuts(layout.cuts, arch))) or "-"
        largest = "-" if layout.max_batch_per_replica is None else str(layout.max_batch_per_replica)
        memory = f"{max(layout.memory_bytes) / GIB:.2f}" + ("" if layout.fits else " (does not fit)")
        kind = (f" (DDP, checkpointed over {layout.checkpoint_segments} segments)" if layout.checkpoint_segments
                else " (DDP)" if layout.modules == 1 else "")
        recompute = f"{layout.recompute_s * 1e3:.1f}" if layout.checkpoint_segments else "-"
        lines.append(f"| {layout.modules} x {layout.replicas}{kind} | {cuts} | "
                     f"{layout.batch_per_replica} ({largest}) | {layout.samples_per_s:.0f} | {memory} | "
                     f"{layout.link_bytes / MIB:.1f} | {layout.allreduce_bytes / MIB:.2f} | {recompute} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--devices", type=int, required=True, help="devices (processes) to plan for: N")
        parser.add_argument("--memory-gib", type=float, help="memory per device in GiB; without it memory is unbounded")
        parser.add_argument("--link-gbps", type=float,
                            help="link bandwidth in Gbit/s; without it, this device's measured memory copy bandwidth")
        parser.add_argument("--checkpoint-segments", type=int, default=0,
                            help="also plan DDP with activation checkpointing over this many segments of blocks")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        if args.devices < 1:
            raise BadInput(f"--devices = {args.devices} must be >= 1")
        if args.memory_gib is not None and not args.memory_gib > 0:
            raise BadInput(f"--memory-gib = {args.memory_gib} must be > 0")
        if args.link_gbps is not None and not args.link_gbps > 0:
            raise BadInput(f"--link-gbps = {args.link_gbps} must be > 0")
        config = load_config(args.config, args.set)  # its local.modules plays no part: every K is planned
        local = config.local
        units = config.arch.units
        if args.checkpoint_segments and not 2 <= args.checkpoint_segments <= units:
            raise BadInput(f"--checkpoint-segments = {args.checkpoint_segments} must be between 2 and the {units} "
                           f"blocks of {config.model.arch}")
        from pipeline.data.specs import dataset_spec  # torch: after the arguments are checked
        from pipeline.performance.profile import profile_as_a_stage

        profile, device, threads = profile_as_a_stage(config, dataset_spec(config.data, config.model), args.devices)
        cluster = Cluster(
            devices=args.devices,
            memory_bytes=math.inf if args.memory_gib is None else args.memory_gib * GIB,
            link_bytes_per_s=profile.copy_bytes_per_s if args.link_gbps is None else args.link_gbps * 1e9 / 8,
            queue_depth=config.pipeline.queue_depth,
        )
        batch = config.data.batch_size
        layouts = plan_layouts(profile, local.context_depth, local.context_image, local.reconstruct, batch, cluster,
                               args.checkpoint_segments)
        best, why = recommend(layouts, batch, cluster)
        link = f"{cluster.link_bytes_per_s * 8 / 1e9:.0f} Gbit/s" + ("" if args.link_gbps else " (measured copy)")
        memory = "unbounded memory" if args.memory_gib is None else f"{args.memory_gib:g} GiB"
        print(f"{config.model.arch} on {config.data.name}, {local.context} context, batch {batch}, "
              f"{args.devices} devices of {memory}, links {link}; profiled on {device.type} "
              f"({threads} thread{'s' if threads > 1 else ''})\n")
        print(table(layouts, config.arch))
        print(f"\nrecommended: {best.name}: {why}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
