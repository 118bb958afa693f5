"""python -m pipeline.bench --config FILE --nproc N [--steps S] [--window W] [--rounds R] [--out DIR]
                          [--classic-microbatches 2,4,8] [--checkpoint-segments 3,4]
   python -m pipeline.bench --config FILE --memory-only [--batch B] [--out DIR]

Runs on this machine and the same data: E2E in one process (all cores), DDP over N processes,
sequential local learning (one process, K = N), the pipeline over N processes (K = N), DDP with
activation checkpointing (pipeline/model/recompute.py; one row per --checkpoint-segments count,
by default the counts whose activation memory per process brackets the pipeline's largest
stage's) and the classic pipeline (the E2E network at the pipeline's cuts under torch.distributed.pipelining's
GPipe and 1F1B, one row per --classic-microbatches count; pipeline/tools/classic_pp.py). The
local runs share one set of cuts (balanced-time unless the config gives an explicit list or
balanced-memory). The runs alternate: each of --rounds rounds runs every mode once, in that
order, so that whatever else the machine does hits every mode alike. A run's throughput is the
median of its timed windows of --window steps after the first (warm-up) window; a mode's figure
is the median over rounds, reported with its min and max. The 1-minute load average is recorded
before and during the runs, with a warning when the machine was busy before starting.
Activation memory is what autograd keeps for backward, counted exactly (with checkpointing, or
what is alive while a segment is recomputed, whichever is more); bytes on the wire per
step are computed from the layout (pipeline/performance/traffic.py). Writes DIR/bench.json,
DIR/bench.md and, with matplotlib, DIR/bench.png.

--memory-only runs nothing timed: it counts the activation memory of E2E and of each module at
the config's cuts, at B samples per device (default data.batch_size), in one process — what a
network too large to time on this machine (DeepLab-V3 at 512 x 1024) is compared by.
"""

from __future__ import annotations

from pipeline.cli import ArgumentParser, add_set_argument, run_main, writable_folder
from pipeline.errors import BadInput
from pipeline.tools.bench.runs import CLASSIC_MICROBATCHES


def whole_numbers(flag: str, text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise BadInput(f"{flag} {text!r}: give whole numbers separated by commas, e.g. 2,4,8") from None


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[1])
        parser.add_argument("--config", help="TOML experiment file; the built-in defaults without one")
        parser.add_argument("--nproc", type=int, help="processes for DDP and the pipeline (K = N); required unless "
                                                      "--memory-only")
        parser.add_argument("--memory-only", action="store_true",
                            help="count activation memory only (E2E and each module at the config's cuts), no runs")
        parser.add_argument("--batch", type=int, help="--memory-only: samples per device (default data.batch_size)")
        parser.add_argument("--steps", type=int, default=60, help="training steps per run")
        parser.add_argument("--window", type=int, default=10, help="steps per timed window")
        parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once")
        parser.add_argument("--out", default="runs/bench", help="output folder")
        parser.add_argument("--checkpoint-segments",
                            help="segment counts of the DDP rows with activation checkpointing, comma-separated; "
                                 "default: the counts that bracket the pipeline's largest stage's activation memory")
        parser.add_argument("--classic-microbatches", default=",".join(map(str, CLASSIC_MICROBATCHES)),
                            help="microbatch counts of the classic pipeline rows (GPipe and 1F1B each), "
                                 "comma-separated; empty for none")
        add_set_argument(parser)
        args = parser.parse_args(argv)
        # torch and the model load with these: after the arguments, so that --help answers at once
        from pipeline.tools.bench.memory_only import memory_report
        from pipeline.tools.bench.timed import run_bench

        if args.memory_only:
            memory_report(args.config, args.set, args.batch, writable_folder(args.out))
            return
        if args.nproc is None:
            raise BadInput("--nproc is required: the processes for DDP and the pipeline (or --memory-only)")
        if args.window < 1:
            raise BadInput(f"--window = {args.window} must be >= 1")
        run_bench(args.config, args.set, args.nproc, args.steps, args.window, writable_folder(args.out), args.rounds,
                  classic_microbatches=whole_numbers("--classic-microbatches", args.classic_microbatches),
                  checkpoint_segments=(None if args.checkpoint_segments is None
                                       else whole_numbers("--checkpoint-segments", args.checkpoint_segments)))

    return run_main(body)
