"""python -m pipeline.train --config FILE [--set table.key=value ...]

Sequential runs in this process; pipeline and ddp runs are launched by torchrun, one process
per module (pipeline) or per data-parallel rank (ddp).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.cli import ArgumentParser, run_main
from pipeline.config import Config, ineffective_keys, load_config
from pipeline.distributed import keep_freed_host_memory
from pipeline.errors import BadInput, errors_logged


def parse_config(argv: list[str] | None) -> Config:
    parser = ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", help="TOML experiment file (see configs/); defaults apply without one")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="override one config key; repeatable")
    args = parser.parse_args(argv)
    return load_config(args.config, args.set)


def prepare_out_dir(config: Config) -> None:
    path = Path(config.run.out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise BadInput(f"run.out_dir = {str(path)!r} cannot be written ({err.strerror}); choose a writable "
                       "folder") from None


def train(config: Config) -> None:
    prepare_out_dir(config)
    keep_freed_host_memory()
    from pipeline.runners.run import run

    if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
        for note in ineffective_keys(config):
            print(f"warning: {note}", file=sys.stderr, flush=True)
    with errors_logged(config.run.out_dir):
        run(config)


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: train(parse_config(argv)))


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
