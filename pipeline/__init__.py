"""Greedy local learning (greedy SL, DGL heads, InfoPro, ContSup) trained sequentially or as an
asynchronous pipeline with one process per module, plus the end-to-end DDP baseline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the package imports no torch: a config is read without it
    from torch import nn

__version__ = "0.1.0"


def load_model(path: str | Path) -> nn.Module:
    """A model file written by python -m pipeline.export as an nn.Module in eval mode, on the CPU."""
    from pipeline.model_file import load_model as load

    return load(path)
