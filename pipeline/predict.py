"""``python -m pipeline.predict``: the command is pipeline/tools/predict.py, run as the main module."""

import runpy

if __name__ == "__main__":
    runpy.run_module("pipeline.tools.predict", run_name="__main__", alter_sys=True)
