"""Several pipeline.train jobs, one after another, in the processes of one torchrun launch (test-only):

    python tests/forked_torchrun.py --standalone --nproc-per-node=N one_launch.py JOBS.json

JOBS.json lists each job's arguments of python -m pipeline.train. Every process runs them in order, each to its
end (its process group joined and left), so a launch pays torchrun's start-up once for all of them. Each job's
keys in the agent's store go under their own attempt number, as a restarted attempt's do
(pipeline/runtime/topology.py, attempt_store): a job never reads what the one before it left there. The first
job that fails ends the launch with its exit code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.cli import exit_process
from pipeline.train import main


def run_jobs(jobs: list[list[str]]) -> int:
    for number, argv in enumerate(jobs):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(number)
        code = main(argv)
        if code:
            return code
    return 0


if __name__ == "__main__":
    exit_process(run_jobs(json.loads(Path(sys.argv[1]).read_text())))
