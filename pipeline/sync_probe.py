"""``python -m pipeline.sync_probe``: the command is pipeline/tools/sync_probe.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.sync_probe", run_name="__main__", alter_sys=True)
