"""``python -m pipeline.reproduce``: the command is pipeline/tools/reproduce.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.reproduce", run_name="__main__", alter_sys=True)
