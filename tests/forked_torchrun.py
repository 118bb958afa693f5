"""torchrun for the tests: torch's own launcher, each worker forked from its agent (test-only).

    python tests/forked_torchrun.py [torchrun options] (-m MODULE | SCRIPT) [arguments]

The agent is torchrun's own (``torch.distributed.run.main``: the same options, rendezvous, restarts, signals and
failure report), with one change: it starts each worker by forking itself instead of starting a new interpreter.
The agent has imported torch before it forks, so a worker skips the ~1.5 s of CPU that importing torch costs;
the slow tier starts about a hundred workers, on 2 cores. A worker then runs the module or script as ``python -u``
would, as ``__main__``, after torchrun has set its environment (RANK, WORLD_SIZE, ...), and imports this package
only then. It keeps the agent's command line, which holds the worker's (tests find workers by "pipeline.train"
in it), but not its environment as /proc shows it (psutil's ``environ()`` lacks RANK: a test that picks a worker
by its rank launches with TORCHRUN, torch's launcher unchanged).

Users, the launchers of launch/ and the package's own launches (bench, self-test) run torchrun itself.
"""

from __future__ import annotations

import os
import runpy
import sys
import threading
from pathlib import Path

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torch's launcher, as users run it
FORKED_TORCHRUN = [sys.executable, str(Path(__file__).resolve())]  # the same, its workers forked


def run_worker(*command: str) -> None:
    """What the interpreter torchrun starts would run: ``-u``, then ``-m MODULE`` or ``SCRIPT``, then arguments."""
    words = list(command)
    if words[0] == "-u":
        words.pop(0)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os._exit = _return_instead  # type: ignore[assignment]
    try:
        # sys.path[0]: this file's folder in the agent; python puts the working folder there for -m, else the script's
        if words[0] == "-m":
            sys.argv, sys.path[0] = words[1:], os.getcwd()
            runpy.run_module(words[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[0] = words, str(Path(words[0]).resolve().parent)
            runpy.run_path(words[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise  # the worker's exit code, as torch's wrapper passes it on
    finally:
        os._exit = _EXIT


def _return_instead(code: int) -> None:
    """os._exit in a forked worker's main thread. A worker that ends with os._exit (pipeline.cli.exit_process
    does, under torchrun) would leave without handing torch's wrapper a result, and the agent waits for one; so it
    raises SystemExit, which run_worker ends in: the wrapper then leaves with os._exit itself, as the worker meant.
    Unlike os._exit, it unwinds the main thread's finally blocks first (a second stop signal's exit too: no test
    here sends one to a torchrun worker). Another thread's os._exit ends the process there and then."""
    if threading.current_thread() is not threading.main_thread():
        _EXIT(code)
    raise SystemExit(code)


_EXIT = os._exit


def main() -> None:
    import torch.distributed.run as torchrun
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def forking_launch(config: LaunchConfig, entrypoint: object) -> elastic_launch:
        # torchrun passes python's path and its arguments; a function entrypoint makes the agent start each
        # worker as a process of its own start method (fork: a copy of the agent) that calls it
        config.start_method = "fork"
        return elastic_launch(config, entrypoint=run_worker)

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # no half-written buffer to fork
    torchrun.elastic_launch = forking_launch  # type: ignore[assignment]
    torchrun.main()


if __name__ == "__main__":
    main()
