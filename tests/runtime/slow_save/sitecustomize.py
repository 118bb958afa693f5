"""Test-only, on PYTHONPATH of a torchrun job in test_restarts.py: each torch.save holds its temporary file
0.3 s before the rename, so the test can kill a process in the middle of writing a checkpoint set."""

import time

import torch

_save = torch.save


def _slow_save(*args: object, **kwargs: object) -> None:
    _save(*args, **kwargs)  # type: ignore[arg-type]
    time.sleep(0.3)


torch.save = _slow_save
