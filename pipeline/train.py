"""python -m pipeline.train --config FILE [--set table.key=value ...] [--check]

Sequential runs in this process; pipeline and ddp runs are launched by torchrun, one process
per module (pipeline) or per data-parallel rank (ddp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# torch is imported by train() only: --help and --check answer without it, in a fraction of a second.
from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config import Config, load_config
from pipeline.errors import BadInput


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[1],
                            epilog="Every key has a default; --check prints them all for a config "
                                   "(e.g. python -m pipeline.train --check --set local.modules=8).")
    parser.add_argument("--config", help="TOML experiment file (see configs/); defaults apply without one")
    add_set_argument(parser)
    parser.add_argument("--check", action="store_true",
                        help="validate the config and --set overrides, print every resolved key as "
                             "table.key = value and exit without training")
    return parser.parse_args(argv)


def parse_config(argv: list[str] | None) -> Config:
    args = parse_args(argv)
    return load_config(args.config, args.set)


def print_resolved(config: Config) -> None:
    """One line per key, each a valid --set argument (JSON scalars and lists read as TOML)."""
    for table, values in config.to_dict().items():
        for key, value in values.items():
            print(f"{table}.{key} = {json.dumps(value)}")


def prepare_out_dir(config: Config) -> None:
    path = Path(config.run.out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise BadInput(f"run.out_dir = {str(path)!r} cannot be written ({err.strerror}); choose a writable folder") from None


def train(config: Config) -> None:
    from pipeline.distributed import keep_freed_host_memory

    prepare_out_dir(config)
    keep_freed_host_memory()
    if config.run.mode == "sequential":
        from pipeline.runners.sequential import run_sequential

        run_sequential(config)
    elif config.run.mode == "pipeline":
        from pipeline.runners.stage import run_stage

        run_stage(config)
    else:
        from pipeline.runners.ddp import run_ddp

        run_ddp(config)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        config = load_config(args.config, args.set)
        if args.check:
            print_resolved(config)
        else:
            train(config)

    return run_main(body)


def exit_process(code: int) -> None:
    """Leave without C++ static teardown when torch.distributed threads may still exist.

    After a finished run, gloo's teardown at interpreter exit can abort the process
    ("terminate called without an active exception", seen here on 1 run in 3 under DDP),
    turning a successful run into a failed torchrun job.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
