"""Each module's optimizer and learning-rate schedule (REFERENCE.md's recipe by default)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import TrainConfig


def make_optimizer(module: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(
        module.parameters(), lr=train.lr, momentum=train.momentum,
        nesterov=train.nesterov, weight_decay=train.weight_decay,
    )


def learning_rate(train: TrainConfig, epoch: int) -> float:
    """The rate for 1-based ``epoch``.

    cosine: 0.5 * lr * (1 + cos(pi * e / epochs)), the first warmup_epochs blending linearly
    from 0.01 into it, exactly as the published runs; constant: lr throughout.
    """
    if train.schedule == "constant":
        return train.lr
    cosine = 0.5 * train.lr * (1 + math.cos(math.pi * epoch / train.epochs))
    warmup = train.warmup_epochs
    if epoch <= warmup:
        return cosine * (epoch - 1) / warmup + 0.01 * (warmup + 1 - epoch) / warmup
    return cosine


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate
