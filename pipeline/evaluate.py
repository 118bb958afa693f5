"""``python -m pipeline.evaluate``: the command is pipeline/tools/evaluate.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.evaluate", run_name="__main__", alter_sys=True)
