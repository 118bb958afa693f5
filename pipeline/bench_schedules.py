"""``python -m pipeline.bench_schedules``: the command is pipeline/tools/bench_schedules.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.bench_schedules", run_name="__main__", alter_sys=True)
