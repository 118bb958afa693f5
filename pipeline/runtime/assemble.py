"""Every mode's bootstrap: set the process up, build its modules and links, run the stage loop.

sequential: one process hosts every module and reads the data; nothing is sent.
pipeline:   torchrun, one process per module; the first reads the data, the others their inbox.
ddp:        torchrun, the whole network (K = 1) on every rank, each training its batch shard.
All three run the same ``StageLoop`` over the same ``ModuleStage``s (pipeline/runtime/stage_loop.py).
The buffered schedule puts a replay buffer in front of each pipeline stage (buffered_inbox.py);
in sequential mode the ``ModuleStage``s take their steps from a schedule: lockstep, seeded or recorded (replay.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pipeline.config.cuts import describe_cuts
from pipeline.config.schema import Config, PipelineConfig, result_config
from pipeline.data.contract import Loader
from pipeline.data.loader import make_loaders
from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput, Preempted, StageFailure, StuckPeer
from pipeline.model.local_module import Layout
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.runtime.buffered_inbox import BufferedInbox
from pipeline.runtime.codec import MessageCodec
from pipeline.runtime.data_parallel import DataParallel
from pipeline.runtime.links import Inbox, Outbox
from pipeline.runtime.metrics import cut_metrics, say
from pipeline.runtime.optim import check_schedule, schedule_change, schedule_settings
from pipeline.runtime.preemption import SaveRequests, StopFlag, stop_signal
from pipeline.runtime.replay import Replay, one_process_schedule
from pipeline.runtime.report import RunReport
from pipeline.runtime.run_order import Position, RunLength, total_steps
from pipeline.runtime.schedule_trace import StepTrace
from pipeline.runtime.scoring import score_line
from pipeline.runtime.source import BatchSource
from pipeline.runtime.stage_loop import Handler, ModuleStage, StageLoop
from pipeline.runtime.straggler import slowed
from pipeline.runtime.topology import Topology, from_env, process_groups, single_process
from pipeline.runtime.transport import Courier, Receiver, Sender
from pipeline.runtime.worker import ModuleWorker, make_worker

Loaders = tuple[Loader, Loader]
Links = Callable[[Layout], tuple[Inbox | None, Outbox | None]]


def run(config: Config) -> dict[str, Any] | None:
    """Run ``config`` in its mode; rank 0 (or the one process) returns the summary."""
    started = time.perf_counter()
    mode, modules = config.run.mode, config.local.modules
    if mode == "sequential":
        topology = single_process(config.run, modules, config.precision.amp)
    else:
        topology = from_env(mode, config.run, config.pipeline, modules, config.precision.amp)
    if topology.replicas > 1 and config.data.batch_size < 2 * topology.replicas:
        raise BadInput(
            f"data.batch_size = {config.data.batch_size} leaves some of the {topology.replicas} DDP ranks fewer than "
            f"2 samples (batch norm needs 2); use data.batch_size >= {2 * topology.replicas}"
        )
    if config.pipeline.schedule == "buffered" and topology.replicas > 1:
        raise BadInput(
            f"pipeline.schedule = 'buffered' runs one chain, but there are {topology.replicas} replicas (the "
            f"replicas of a module would train on different batches); set pipeline.replicas = 1 and WORLD_SIZE = "
            f"local.modules, or use the lockstep schedule"
        )
    # The first stage reads the data before joining the job, so a bad data path exits 2 at once.
    loaders = (make_loaders(config.data, config.model, config.run.seed, topology.device, processes=topology.replicas)
               if topology.first else None)
    if loaders is not None:  # the epoch's length is known now: refuse a schedule that would train at rate 0
        check_schedule(config.train, len(loaders[0]))
    with (stop_signal(config.run.stop_signal) as stop, process_groups(topology, config.pipeline.timeout_s),
          failures_named(topology)):
        links = functools.partial(wire, config.pipeline, topology, channels_last=config.precision.channels_last,
                                  amp=config.precision.amp)
        try:
            loop, report, cuts = assemble(config, topology, loaders, started, links, stop)
        except NothingToTrain as done:  # every process sees it at the same point
            if topology.rank == 0:
                say(str(done))
            return None
        report.stats.memory.start()  # peaks of the training loop, not of the data set or profiling
        loop.run()
        summary = None if report.preempted else report.summary(config, cuts)
    if report.preempted:  # every process got the preempted stop after the set's save point
        report.log.close()
        sets = checkpoint.complete_sets(config.run.out_dir)
        newest = f"its newest complete checkpoint set is {sets[-1][1]}" if sets else "no checkpoint set yet"
        raise Preempted(f"[{loop_label(config.run.mode, topology)}] stopped by {config.run.stop_signal} after step "
                        f"{report.steps}; {newest}: start the same command again to continue from it")
    if summary is not None:
        scored = f"{score_line(summary)}, " if summary["test_accuracy"] is not None else ""
        say(f"[{loop_label(config.run.mode, topology)}] done: {summary['steps']} steps, {scored}"
            f"{summary['train_samples_per_s']:.0f} samples/s, {summary['wall_s']:.0f} s; outputs in "
            f"{config.run.out_dir} (summary.json, metrics.jsonl, checkpoints/)")
    return summary


def assemble(config: Config, topology: Topology, loaders: Loaders | None, started: float,
             links: Links, stop: StopFlag | None = None) -> tuple[StageLoop, RunReport, list[int]]:
    """This process's modules, resumed, with their report, inbox and outbox: a loop ready to run.

    ``stop``: set by run.stop_signal; the first stage then ends the run at a checkpoint set.
    """
    spec, cuts, batches = _agreed_facts(config, topology, loaders)
    layout = make_layout(config, spec, cuts)
    parallel = DataParallel(topology, config.pipeline.sync_batchnorm)
    workers = [make_worker(config, layout, index, topology.device, wrap=parallel.wrap) for index in topology.hosted]
    length = RunLength(config.train.epochs, batches, config.train.max_steps)
    run_steps = total_steps(Position(), *length)  # per-step schedules span the whole run, resumed or not
    for worker in workers:
        worker.total_steps = run_steps
    identity = checkpoint.identity_of(config, cuts)
    # Rank 0 alone decides whether a job started again on its own out_dir resumes it (train.py _claim).
    resume_dir = topology.comm.broadcast(config.run.resume, 0)
    position = resume(resume_dir, config.run.resume_step, workers, identity, topology)
    if resume_dir and total_steps(position, *length) <= position.step:
        raise NothingToTrain(
            f"run.resume: {resume_dir} is at step {position.step}, where this run ends (train.epochs = "
            f"{config.train.epochs}, train.max_steps = {config.train.max_steps}): nothing to train, no output "
            f"written; to train further, add --set run.resume={resume_dir} with a larger train.epochs or "
            f"train.max_steps (the same command alone refuses another length)"
        )
    pipe = config.pipeline
    # Sequential mode's schedule, before anything is cleared: a refused replay leaves the out_dir as it found it
    # (and a record kept in run.out_dir is read before its metrics are cut).
    schedule = None
    if config.run.mode == "sequential":
        if pipe.replay and position.step > 0:  # validation: pipeline.replay is set with a buffered schedule only
            raise BadInput(f"pipeline.replay replays a record from its first step, but this run resumes at step "
                           f"{position.step} ({resume_dir}); replay into a fresh run.out_dir")
        schedule = one_process_schedule(pipe, position, length, len(workers), config.run.seed)
    label = loop_label(config.run.mode, topology)
    if topology.rank == 0:
        _clear_for_start(config, position, batches, label)
    report = RunReport(label, config.run, topology, workers, position, length, parallel.total, started)
    handlers = _handlers(config, topology, workers, report, parallel, identity, position)
    inbox, outbox = links(layout)
    if pipe.schedule == "buffered" and inbox is not None:
        inbox = BufferedInbox(inbox, topology.stage, pipe.buffer_batches, pipe.max_reuse, pipe.timeout_s,
                              topology.device)
    if topology.first:
        assert loaders is not None
        agree = topology.comm.sum_over_replicas if topology.replicas > 1 else None
        requests = SaveRequests(stop if stop is not None else StopFlag(), config.run.checkpoint_minutes, agree,
                                topology.device)
        inbox = BatchSource(*loaders, position, length, parallel.part, config.run.checkpoint_every, requests)
    assert inbox is not None
    if topology.writer:
        hosted = topology.hosted
        which = f"module {hosted[0]}" if len(hosted) == 1 else f"modules {hosted[0]}-{hosted[-1]}"
        say(f"[{label}] {which} of {config.local.modules}, cut points {describe_cuts(cuts, config.arch)}, "
            f"{batches} batches/epoch on {topology.device} x {topology.replicas}, "
            f"{torch.get_num_threads()} thread(s)")
        if resume_dir:
            say(f"[{label}] resumed from {checkpoint.find_set(resume_dir, config.run.resume_step)} at epoch "
                f"{position.epoch}, batch {position.batch} (step {position.step})")
    if schedule is not None:  # sequential: one handler deals every module its steps from the schedule
        handlers = [Replay(handlers, schedule)]
    return StageLoop(inbox, handlers, outbox, report, _commit(config, topology, identity)), report, cuts


def _agreed_facts(config: Config, topology: Topology,
                  loaders: Loaders | None) -> tuple[DatasetSpec, list[int], int]:
    """The data's spec, the cuts and the batches per epoch. Only the first stage can know them (it reads the
    data; balanced cuts are profiled there), so it broadcasts them and all agree: the other stages never read
    the data (an image folder may not even be mounted there)."""
    facts = None
    if topology.rank == 0:
        assert loaders is not None
        spec = loaders[0].spec
        facts = (spec, resolve_cuts(config, spec, topology.device), len(loaders[0]))
    spec, cuts, batches = topology.comm.broadcast(facts, 0)
    return spec, cuts, batches


def _clear_for_start(config: Config, position: Position, batches: int, label: str) -> None:
    """Rank 0, before anything is written: a changed learning-rate schedule is warned of, and what a crash
    or a replaced history left after ``position`` goes."""
    if config.run.resume:
        saved = checkpoint.read_marker(checkpoint.find_set(config.run.resume, position.step))
        change = schedule_change((saved or {}).get("schedule", {}), config.train, position, batches)
        if change is not None:
            print(f"warning: {change}", file=sys.stderr, flush=True)
    for gone in checkpoint.clear_for_start(config.run.out_dir, position.step):
        say(f"[{label}] removed {gone}: unfinished, or newer than step {position.step} where this run starts")
    lines = cut_metrics(config.run.out_dir, position.step)
    if lines:
        say(f"[{label}] removed {lines} metrics.jsonl line(s) after step {position.step}, where this run starts: "
            f"an interrupted attempt's")


def _handlers(config: Config, topology: Topology, workers: list[ModuleWorker], report: RunReport,
              parallel: DataParallel, identity: dict[str, Any], position: Position) -> list[Handler]:
    """One stage per hosted module: it trains, saves (the writer) and, under the buffered schedule,
    records what it trained on; a pipeline's stragglers slowed."""
    save = functools.partial(checkpoint.save, config.run.out_dir, identity=identity) if topology.writer else None
    adopt = parallel.adopt_replica_0_buffers if topology.replicas > 1 else None
    buffered = config.pipeline.schedule == "buffered"
    log = report.log if topology.writer else None
    handlers: list[Handler] = [ModuleStage(worker, slot, report, save, adopt,
                                           StepTrace(worker.index, position.step, log) if buffered else None)
                               for slot, worker in enumerate(workers)]
    if config.run.mode == "pipeline":  # in one process the factors are the seeded schedule's speed ratios
        handlers = slowed(handlers, config.pipeline.slowdown, topology.hosted, topology.device)
    return handlers


def _commit(config: Config, topology: Topology, identity: dict[str, Any]) -> Callable[[Position], object] | None:
    """The last module of replica 0 marks each set complete, with no collective: every stage saves before it
    passes the epoch end on, so all have saved when it arrives here (a collective would hold rank 0 at the
    epoch end while a middle rank's courier may be waiting for rank 0)."""
    if not (topology.writer and topology.last):
        return None
    return functools.partial(checkpoint.commit, config.run.out_dir, modules=topology.stages, identity=identity,
                             keep=config.run.keep_checkpoints, config=result_config(config),
                             schedule=schedule_settings(config.train),
                             wait_s=config.pipeline.timeout_s if topology.distributed else 0.0)


def wire(pipe: PipelineConfig, topology: Topology, layout: Layout, channels_last: bool = False,
         amp: str = "none") -> tuple[Inbox | None, Outbox | None]:
    """The ends of the two links this stage sits between, served by one courier thread (started)."""
    if len(topology.hosted) != 1:
        return None, None
    module, stages = topology.stage, topology.stages
    wire_dtype = torch.bfloat16 if pipe.wire_dtype == "bf16" else None
    inbox = outbox = None
    if module > 0:
        codec = MessageCodec(layout.plan, module, layout.input_shape(module), layout.spec.dense)
        inbox = Receiver(topology.rank, topology.rank_of(module - 1, topology.replica), topology.links[module - 1],
                         codec, topology.device, pipe.queue_depth, pipe.timeout_s, wire_dtype, channels_last,
                         keep_wire_dtype=amp == "bf16")
    if module < stages - 1:
        codec = MessageCodec(layout.plan, module + 1, layout.input_shape(module + 1), layout.spec.dense)
        outbox = Sender(topology.rank, topology.rank_of(module + 1, topology.replica), topology.links[module],
                        codec, topology.device, pipe.queue_depth, pipe.timeout_s, wire_dtype, channels_last)
    if inbox is not None or outbox is not None:
        Courier(inbox, outbox).start()  # one thread drives both links: never two communicators at once
    return inbox, outbox


class NothingToTrain(Exception):
    """A run resumed at or past its end: it trains nothing and leaves every output as it is."""


def resume(resume_dir: str, step: int, workers: list[ModuleWorker], identity: dict[str, Any],
           topology: Topology) -> Position:
    """Where the run starts; every module of every process must resume from the same step."""
    positions = {Position()}
    if resume_dir:
        found = checkpoint.find_set(resume_dir, step)  # the newest complete set, or the one at step
        positions = {checkpoint.load(found, worker, identity) for worker in workers}
    every: set[Position] = set().union(*topology.comm.gather(positions))
    if len(every) != 1:
        raise BadInput(
            f"run.resume: the module checkpoints in {resume_dir} were written at different "
            f"steps ({sorted(p.step for p in every)}); resume from a run that finished cleanly"
        )
    return every.pop()


def loop_label(mode: str, topology: Topology) -> str:
    """How this process's console lines start."""
    if mode == "pipeline":
        return f"stage {topology.stage}" + (f" replica {topology.replica}" if topology.replicas > 1 else "")
    return mode


def stop_stuck_peer(topology: Topology, err: BaseException) -> str:
    """SIGKILL a neighbour that let a deadline pass, where it runs on this host.

    A stopped or wedged process cannot handle the SIGTERM torchrun sends when this rank fails,
    and torchrun waits 30 s before its SIGKILL; killing the stuck peer here ends the job within
    a second of the deadline instead. A peer on another host is left to its own launcher.
    """
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, StuckPeer):
        cause = cause.__cause__
    if cause is None or not 0 <= cause.peer < len(topology.processes):
        return ""
    host, pid = topology.processes[cause.peer]
    if host != socket.gethostname():
        return ""
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        return ""
    return f"; stopped rank {cause.peer}'s process (pid {pid})"


@contextlib.contextmanager
def failures_named(topology: Topology) -> Iterator[None]:
    """In a job of several processes, any failure becomes one line that names this process.

    Bad input stays bad input (exit 2). The entry point then leaves at once, without tearing the
    group down, since peers may be blocked talking to this process.
    """
    if not topology.distributed:
        yield
        return
    who = topology.describe()
    try:
        yield
    except BadInput:
        raise
    except StageFailure as err:
        raise StageFailure(f"{who} failed: {err}{stop_stuck_peer(topology, err)}") from err
    except Exception as err:  # whatever broke, the job must end with this rank named
        raise StageFailure(f"{who} failed: {type(err).__name__}: {err}") from err
