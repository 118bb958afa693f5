"""Each module's optimizer and learning-rate schedule (docs/reference.md's recipe by default)."""

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


def learning_rate(train: TrainConfig, epoch: int, step: int = 1, total_steps: int = 1) -> float:
    """The rate for 1-based ``epoch`` and 1-based ``step`` of a run of ``total_steps``.

    cosine: per epoch, 0.5 * lr * (1 + cos(pi * e / epochs)), the first warmup_epochs blending
    linearly from 0.01 into it, exactly as the published runs; cosine-step: per step from lr
    down towards 0 over the whole run, no warm-up (short runs, where the per-epoch rate would
    not decay, and batch-norm statistics would lag the weights); poly: per step from lr down to
    min_lr, (lr - min_lr) * (1 - (step - 1) / total_steps) ** poly_power + min_lr, the
    segmentation recipe (MMSegmentation's PolyLR, whose iteration count starts at 0); constant: lr
    throughout.
    """
    if train.schedule == "constant":
        return train.lr
    if train.schedule == "poly":
        left = max(0.0, 1 - (step - 1) / max(total_steps, 1))
        return float((train.lr - train.min_lr) * left**train.poly_power + train.min_lr)
    if train.schedule == "cosine-step":
        return 0.5 * train.lr * (1 + math.cos(math.pi * (step - 1) / max(total_steps, 1)))
    cosine = 0.5 * train.lr * (1 + math.cos(math.pi * epoch / train.epochs))
    warmup = train.warmup_epochs
    if epoch <= warmup:
        return cosine * (epoch - 1) / warmup + 0.01 * (warmup + 1 - epoch) / warmup
    return cosine


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate
