"""``python -m pipeline.classic_pp``: the command is pipeline/tools/classic_pp.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.classic_pp", run_name="__main__", alter_sys=True)
