"""Test-only, on PYTHONPATH of a torchrun job in test_restarts.py: while the file SLOW_SAVE_WHILE names exists,
each torch.save holds its temporary file 0.3 s before the rename, so the test can kill a process in the middle
of writing a checkpoint set (the rest of the job saves at full speed)."""

import os
import time

import torch

_save = torch.save
_WHILE = os.environ.get("SLOW_SAVE_WHILE", "")


def _slow_save(*args: object, **kwargs: object) -> None:
    _save(*args, **kwargs)  # type: ignore[arg-type]
    if _WHILE and os.path.exists(_WHILE):
        time.sleep(0.3)


torch.save = _slow_save
