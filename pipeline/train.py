"""python -m pipeline.train --config FILE [--set table.key=value ...] [--check]

Sequential runs in this process; pipeline and ddp runs are launched by torchrun, one process
per module (pipeline) or per data-parallel rank (ddp).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

# torch is imported by train() only: --help and --check answer without it, in a fraction of a second.
from pipeline.cli import ArgumentParser, add_set_argument, exit_process, run_main
from pipeline.config.loading import load_config
from pipeline.config.schema import Config, differing_keys, result_config
from pipeline.config.validation import ineffective_keys
from pipeline.errors import BadInput, errors_logged
from pipeline.runtime.metrics_files import metrics_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[1],
                            epilog="Every key has a default; --check prints them all for a config "
                                   "(e.g. python -m pipeline.train --check --set local.modules=8).")
    parser.add_argument("--config", help="TOML experiment file (see configs/); defaults apply without one")
    add_set_argument(parser)
    parser.add_argument("--check", action="store_true",
                        help="validate the config and --set overrides as a run would (and that the data's "
                             "folder exists), print its warnings and every resolved key as table.key = value, "
                             "and exit without training")
    parser.add_argument("--no-data-check", action="store_true",
                        help="with --check: leave the data's folder unchecked (the launchers: a node of a "
                             "multi-node job may hold no data)")
    return parser.parse_args(argv)


def parse_config(argv: list[str] | None) -> Config:
    args = parse_args(argv)
    return load_config(args.config, args.set)


def print_resolved(config: Config) -> None:
    """One line per key, each a valid --set argument (JSON scalars and lists read as TOML)."""
    for table, values in config.to_dict().items():
        for key, value in values.items():
            print(f"{table}.{key} = {json.dumps(value)}")


# what a run writes under out_dir, beside its metrics files
OUTPUTS = ("summary.json", "checkpoints", "errors", "tensorboard")


@contextlib.contextmanager
def prepare_out_dir(config: Config) -> Iterator[Config]:
    """A writable out_dir that this job alone writes to, for as long as the block runs.

    Rank 0 (or the one process) holds an flock on OUT_DIR/.lock; a folder with another run's
    outputs is refused unless this run resumes from it or run.overwrite = true (which clears them).
    Yields the config to run: on rank 0, a job started again on its own folder resumes it (``_claim``).
    """
    path = Path(config.run.out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise BadInput(f"run.out_dir = {str(path)!r} cannot be written ({err.strerror}); "
                       f"choose a writable folder") from None
    if os.environ.get("RANK", "0") != "0":  # rank 0 speaks for the job
        yield config
        return
    with open(path / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise BadInput(f"run.out_dir = {str(path)!r} is in use by another job (pid {holder}); wait for it to "
                           f"end or choose another run.out_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield _claim(config, path)


def _claim(config: Config, path: Path) -> Config:
    """Refuse (or with run.overwrite clear) another run's outputs; resuming from this folder keeps them."""
    claimed, clear = claim_verdict(config, path)
    if clear:
        for target in [*(path / name for name in OUTPUTS), *metrics_files(path)]:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    return claimed


def claim_verdict(config: Config, path: Path) -> tuple[Config, bool]:
    """What a run of ``config`` does with the folder ``path``, deciding only (--check asks it too):
    the config it runs (run.resume set where it resumes by itself) and whether to clear the
    folder's outputs first; BadInput where it must refuse them.

    Without run.resume or run.overwrite (or with either, in an attempt a launcher restarted), a
    folder whose newest complete set was written with this result-changing config (recorded in
    its marker) is this job's own, started again after a failure or a preemption: it resumes from
    that set. Only unfinished sets (a crash before the first set): it
    starts from the beginning. Another config: one line naming the keys that differ. The run drops
    what an interrupted attempt logged past its start (pipeline/runtime/metrics.py cut_metrics).
    """
    run = config.run
    found = [name for name in ("summary.json", "checkpoints", "metrics.jsonl")
             if (path / name).is_file() or ((path / name).is_dir() and any((path / name).iterdir()))]
    if not found or (run.resume and Path(run.resume).resolve() == path.resolve()):
        return config, False
    restarted = restart_count() > 0
    # A restart (torchrun's, a Slurm requeue) of a job that overwrote a folder or resumed from another
    # must go on from its own sets too, not clear them again or be refused by them.
    if restarted or not (run.overwrite or run.resume):
        own = _own_sets(config, path)
        if own == "resume":
            return dataclasses.replace(config, run=dataclasses.replace(run, resume=str(path))), False
        if own == "start":
            return config, False
    if not run.overwrite:
        if not checkpoint_sets(path) and "summary.json" not in found:  # nothing a run could continue from
            raise BadInput(
                f"run.out_dir = {str(path)!r} holds an unfinished attempt's outputs ({', '.join(found)}) and no "
                f"complete checkpoint to resume from; start over with run.overwrite = true (it clears them), or "
                f"choose another run.out_dir"
            )
        raise BadInput(
            f"run.out_dir = {str(path)!r} holds another run's outputs ({', '.join(found)}); resume it with "
            f"run.resume = {str(path)!r}, replace them with run.overwrite = true, or choose another run.out_dir"
        )
    return config, True


def restart_count() -> int:
    """How many times the launcher started this job before (torchrun's restarts, Slurm's requeues)."""
    counts = [os.environ.get(name, "") for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")]
    return sum(int(count) for count in counts if count.isdigit())


def _own_sets(config: Config, path: Path) -> Literal["resume", "start", ""]:
    """"resume" where the newest complete set is this config's, "start" where there is none and the folder
    holds no finished run, "" where it cannot tell (a set without a recorded config); BadInput for another
    config."""
    from pipeline.runtime import checkpoint

    sets = checkpoint.complete_sets(path)
    if not sets:
        return "" if (path / "summary.json").is_file() else "start"
    marker = checkpoint.read_marker(sets[-1][1]) or {}
    saved = marker.get("config")
    if not isinstance(saved, dict):
        return ""
    differ = differing_keys(saved, result_config(config))
    if not differ:
        return "resume"
    mine = result_config(config)
    shown = "; ".join(f"{key} = {json.dumps(saved.get(key))} there, {json.dumps(mine.get(key))} here"
                      for key in differ[:4]) + ("; ..." if len(differ) > 4 else "")
    raise BadInput(
        f"run.out_dir = {str(path)!r} holds the checkpoints of a run with another config ({shown}); run its "
        f"config to continue it, resume from it with run.resume = {str(path)!r}, replace it with "
        f"run.overwrite = true, or choose another run.out_dir"
    )


def train(config: Config) -> dict[str, Any] | None:
    """Claim config.run.out_dir and train: this process's part of the job (every mode; under torchrun,
    each process runs its stage or replica). The run's summary where this process writes it (rank 0)."""
    from pipeline.runtime.host import keep_freed_host_memory

    with prepare_out_dir(config) as claimed:
        keep_freed_host_memory()
        from pipeline.runtime.assemble import run

        if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
            warn_ineffective(config)  # the keys as given: a restart resuming by itself set none of them
        try:
            with errors_logged(claimed.run.out_dir):
                return run(claimed)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") != "0":  # rank 0 speaks for the job
                raise
            raise KeyboardInterrupt(what_is_saved(claimed)) from None


def what_is_saved(config: Config) -> str:
    """After an interrupt: what the out_dir holds to continue from, and the command's next step."""
    out = config.run.out_dir
    sets = checkpoint_sets(out)
    elsewhere = bool(config.run.resume) and Path(config.run.resume).resolve() != Path(out).resolve()
    if sets:
        step, folder = sets[-1]
        how = f"by adding --set run.resume={out} to the same command" if elsewhere else "by running the same command"
        return f"the last complete checkpoint is step {step} ({folder}); continue from it {how}"
    if elsewhere:
        return (f"no checkpoint written in {out} yet; resume from {config.run.resume} again by adding --set "
                f"run.overwrite=true to the same command")
    return ("no checkpoint written yet (one is written at each epoch end, every run.checkpoint_every steps and "
            "when the run is stopped by run.stop_signal); the same command starts over")


def checkpoint_sets(out_dir: str | Path) -> list[tuple[int, Path]]:
    from pipeline.runtime.checkpoint import complete_sets  # torch: a run's failure paths only

    return complete_sets(out_dir)


def warn_ineffective(config: Config) -> None:
    for note in ineffective_keys(config):
        print(f"warning: {note}", file=sys.stderr, flush=True)


def check(config: Config, data: bool = True) -> None:
    """--check: what a run would say before it trains, short of reading the data: the config's
    problems (load_config found them), a missing data folder (``data``), an out_dir it would refuse
    (so a launcher stops before torchrun, which would retry it), the warnings; then every key."""
    from pipeline.data.specs import require_data_root

    if data:
        require_data_root(config.data, config.model)
    if Path(config.run.out_dir).is_dir():
        claim_verdict(config, Path(config.run.out_dir))
    warn_ineffective(config)
    print_resolved(config)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        config = load_config(args.config, args.set)
        if args.check:
            check(config, data=not args.no_data_check)
        else:
            train(config)

    return run_main(body)


if __name__ == "__main__":
    exit_process(main())
