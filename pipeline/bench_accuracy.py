"""``python -m pipeline.bench_accuracy``: the command is pipeline/tools/bench_accuracy.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.bench_accuracy", run_name="__main__", alter_sys=True)
