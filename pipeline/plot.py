"""``python -m pipeline.plot``: the command is pipeline/tools/plot.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.plot", run_name="__main__", alter_sys=True)
