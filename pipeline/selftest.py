"""``python -m pipeline.selftest``: the command is pipeline/tools/selftest.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.selftest", run_name="__main__", alter_sys=True)
