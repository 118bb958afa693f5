"""pipeline.optim: SGD as published and the per-epoch learning-rate schedule of docs/reference.md."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import TrainConfig, load_config
from pipeline.optim import learning_rate, make_optimizer, set_learning_rate


def reference_lr(lr0: float, e: int, epochs: int = 160, warmup: int = 10) -> float:
    """docs/reference.md: lr = 0.5 lr0 (1 + cos(pi e / 160)); epochs 1..10: cos_e (e-1)/10 + 0.01 (11-e)/10."""
    cos_e = 0.5 * lr0 * (1 + math.cos(math.pi * e / epochs))
    if e <= warmup:
        return cos_e * (e - 1) / warmup + 0.01 * (warmup + 1 - e) / warmup
    return cos_e


@pytest.mark.parametrize("epoch", [1, 2, 5, 10, 11, 12, 80, 159, 160])
@pytest.mark.parametrize("lr0", [0.8, 0.1])
def test_published_cosine_with_warmup(epoch, lr0):
    train = TrainConfig(epochs=160, lr=lr0, warmup_epochs=10, schedule="cosine")
    assert learning_rate(train, epoch) == pytest.approx(reference_lr(lr0, epoch), rel=1e-12, abs=1e-15)


def test_schedule_landmarks():
    train = TrainConfig(epochs=160, lr=0.8, warmup_epochs=10, schedule="cosine")
    assert learning_rate(train, 1) == pytest.approx(0.01)  # warm-up starts at 0.01
    assert learning_rate(train, 11) == pytest.approx(0.4 * (1 + math.cos(math.pi * 11 / 160)))
    assert learning_rate(train, 160) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(train, e) for e in range(1, 161)]
    assert rates.index(max(rates)) in range(9, 12)  # rises through warm-up, then decays
    assert all(a >= b for a, b in zip(rates[11:], rates[12:]))


def test_cosine_without_warmup_and_constant():
    train = TrainConfig(epochs=4, lr=0.2, warmup_epochs=0, schedule="cosine")
    assert [learning_rate(train, e) for e in range(1, 5)] == pytest.approx(
        [0.1 * (1 + math.cos(math.pi * e / 4)) for e in range(1, 5)])
    constant = TrainConfig(epochs=4, lr=0.2, warmup_epochs=3, schedule="constant")
    assert [learning_rate(constant, e) for e in range(1, 5)] == [0.2] * 4


def test_optimizer_is_nesterov_sgd_with_decay():
    module = nn.Linear(3, 2)
    train = TrainConfig(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    optimizer = make_optimizer(module, train)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.3, 0.9, True, 1e-4)
    assert {id(p) for p in group["params"]} == {id(p) for p in module.parameters()}
    set_learning_rate(optimizer, 0.05)
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)


def test_cosine_step_decays_per_step_over_the_whole_run():
    train = load_config(None, ["train.schedule=cosine-step", "train.lr=0.2"]).train
    total = 40
    rates = [learning_rate(train, epoch=1 + (step - 1) // 10, step=step, total_steps=total)
             for step in range(1, total + 1)]
    assert rates[0] == pytest.approx(0.2)
    assert rates[20] == pytest.approx(0.1)  # half way: cos(pi / 2) = 0
    assert rates[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_poly_decays_per_step_to_min_lr_as_mmsegmentation():
    """PolyLR: (lr - min) * (1 - iter / max_iters) ** power + min, iter counted from 0."""
    train = TrainConfig(lr=0.01, schedule="poly", poly_power=0.9, min_lr=1e-4)
    total = 40_000
    for step in (1, 2, 20_000, 39_999, 40_000):
        expected = (0.01 - 1e-4) * (1 - (step - 1) / total) ** 0.9 + 1e-4
        assert learning_rate(train, 1, step, total) == pytest.approx(expected, rel=1e-12)
    assert learning_rate(train, 1, 1, total) == pytest.approx(0.01)
    assert learning_rate(train, 1, total + 5, total) == pytest.approx(1e-4)  # never below the floor


def test_poly_keys_are_checked():
    from pipeline.errors import BadInput

    with pytest.raises(BadInput, match="train.min_lr"):
        load_config(None, ["train.schedule=poly", "train.lr=0.01", "train.min_lr=0.02"])
    with pytest.raises(BadInput, match="train.poly_power"):
        load_config(None, ["train.schedule=poly", "train.poly_power=0"])
