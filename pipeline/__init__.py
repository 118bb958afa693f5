"""Greedy local learning (greedy SL, DGL heads, InfoPro, ContSup) trained sequentially or as an
asynchronous pipeline with one process per module, plus the end-to-end DDP baseline."""

__version__ = "0.1.0"
