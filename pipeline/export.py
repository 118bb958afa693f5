"""``python -m pipeline.export``: the command is pipeline/tools/export.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.export", run_name="__main__", alter_sys=True)
