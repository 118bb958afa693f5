"""Each module's optimizer and learning-rate schedule (docs/reference.md's recipe by default)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from pipeline.config.schema import TrainConfig
from pipeline.errors import BadInput
from pipeline.runtime.run_order import Position, total_steps

# The share of a run's steps that may train at rate 0 before the run is refused. The published
# per-epoch cosine trains its last epoch at rate 0 (1/160 of a CIFAR run, 1/90 of ImageNet's);
# a short run loses far more (all of a 1-epoch run, half of a 2-epoch one) and learns nothing then.
ZERO_RATE_SHARE = 0.05

if TYPE_CHECKING:  # a config's validation reads the schedule below: importing this module loads no torch
    import torch
    from torch import nn


def make_optimizer(module: nn.Module, train: TrainConfig) -> torch.optim.SGD:
    import torch

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


def steps_at_rate_zero(train: TrainConfig, batches: int) -> tuple[int, int]:
    """(steps that train at rate 0, steps in all) of a run of ``batches`` steps an epoch.

    Only the per-epoch cosine reaches 0, in its last epoch; the per-step schedules end above it.
    """
    total = train.epochs * batches
    total = min(total, train.max_steps) if train.max_steps else total
    if train.schedule != "cosine":
        return 0, total
    zero = 0
    for epoch in range(1, train.epochs + 1):
        steps = min(batches, total - (epoch - 1) * batches)
        if steps <= 0:
            break
        if learning_rate(train, epoch) == 0.0:
            zero += steps
    return zero, total


def check_schedule(train: TrainConfig, batches: int | None = None) -> None:
    """Refuse a run that would spend more than ZERO_RATE_SHARE of its steps at rate 0.

    ``batches``: the steps of an epoch; None where they are not known yet (a config on its own,
    whose every epoch runs in full: the share is counted in epochs then).
    """
    zero, total = steps_at_rate_zero(train, batches or 1)
    if zero > ZERO_RATE_SHARE * total:
        unit = "steps" if batches else "epochs"
        raise BadInput(
            f"train.schedule = 'cosine' trains the last of train.epochs = {train.epochs} epoch(s) at rate 0 (the "
            f"published per-epoch rate): {zero} of this run's {total} {unit} would learn nothing; for a short run "
            f"set train.schedule = 'cosine-step' (per step, never 0), or raise train.epochs"
        )


# The train.* keys a step's rate depends on; a checkpoint set records them (checkpoint.commit).
SCHEDULE_KEYS = ("schedule", "lr", "epochs", "max_steps", "warmup_epochs", "poly_power", "min_lr")


def schedule_settings(train: TrainConfig) -> dict[str, Any]:
    return {key: getattr(train, key) for key in SCHEDULE_KEYS}


def schedule_change(saved: dict[str, Any], train: TrainConfig, resume_at: Position, batches: int) -> str | None:
    """What resuming with ``train`` does to the rates of the run that recorded ``saved``; None: nothing.

    Any other schedule setting changes the rates to come. A new train.max_steps alone does where
    the new settings would have trained the last step at another rate: a per-step schedule spans
    the whole run, so a larger one sends its rate back up (the per-epoch cosine is left as it was).
    """
    changed = {key: value for key, value in saved.items() if key in SCHEDULE_KEYS and getattr(train, key) != value}
    if not changed or resume_at.step == 0:
        return None
    old = dataclasses.replace(train, **changed)
    last_epoch = resume_at.epoch if resume_at.batch else resume_at.epoch - 1

    def span(settings: TrainConfig) -> int:
        return total_steps(Position(), settings.epochs, batches, settings.max_steps)

    step = resume_at.step
    trained = learning_rate(old, last_epoch, step, span(old))
    if set(changed) == {"max_steps"} and learning_rate(train, last_epoch, step, span(train)) == trained:
        return None
    after = learning_rate(train, resume_at.epoch, step + 1, span(train))
    keys = ", ".join(f"train.{key} = {getattr(train, key)!r} (was {value!r})" for key, value in changed.items())
    return (f"run.resume changes the learning-rate schedule ({keys}): step {step} trained at {trained:.4g}, "
            f"step {step + 1} will train at {after:.4g}; keep the run's train settings to continue its schedule")


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


class LearningRate:
    """The rate ``optimizer`` trains at under ``train``'s schedule: epoch 1's from the start (an
    optimizer asked before the first step already holds it), then each step's."""

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig) -> None:
        self.optimizer, self.train = optimizer, train
        self.value = learning_rate(train, 1)
        set_learning_rate(optimizer, self.value)

    def restore(self) -> None:
        """After an optimizer state is loaded (a resume): it brought the rate it was saved at; the parameter
        groups go back to the one this object holds, so a step whose rate equals it trains at it."""
        set_learning_rate(self.optimizer, self.value)

    def at_step(self, epoch: int, step: int, total_steps: int) -> None:
        """Set the rate of 1-based ``step`` in 1-based ``epoch`` of a run of ``total_steps``."""
        rate = learning_rate(self.train, epoch, step, total_steps)
        if rate != self.value:  # the parameter groups are written on a change only
            self.value = rate
            set_learning_rate(self.optimizer, rate)
