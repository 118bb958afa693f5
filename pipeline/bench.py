"""``python -m pipeline.bench``: the command is the package pipeline/tools/bench/, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.bench", run_name="__main__", alter_sys=True)
