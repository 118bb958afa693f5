"""``python -m pipeline.plan``: the command is pipeline/tools/plan.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.plan", run_name="__main__", alter_sys=True)
