"""pipeline.runtime.optim: SGD as published and the per-epoch learning-rate schedule of docs/reference.md."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config.loading import load_config
from pipeline.config.schema import Config, TrainConfig
from pipeline.errors import BadInput
from pipeline.runtime.optim import check_schedule, learning_rate, make_optimizer, set_learning_rate, steps_at_rate_zero
from pipeline.train import main


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


# ---- a schedule that would train at rate 0 is refused; the published rates stay the authors'

TRAIN_SAMPLES = {"fashion_mnist": 60_000, "cifar10": 50_000, "svhn": 73_257, "stl10": 5_000,
                 "image_folder": 1_281_167, "cityscapes": 2_975}


def test_published_configs_keep_the_authors_rates_and_are_not_refused(check_shipped: Callable[..., int]) -> None:
    """Loading refuses a schedule with epochs at rate 0 (the session's configs loaded, so none was)."""
    assert check_shipped(check_published_rates, lambda path: path.startswith("configs/published/")) >= 120


def check_published_rates(path: str, config: Config) -> None:
    train = config.train
    batches = -(-TRAIN_SAMPLES[config.data.name] // config.data.batch_size)
    check_schedule(train, batches)  # nor when the epoch's length is known
    if train.schedule != "cosine":
        return
    for epoch in range(1, train.epochs + 1):
        assert learning_rate(train, epoch) == reference_lr(train.lr, epoch, train.epochs, train.warmup_epochs)
    assert learning_rate(train, train.epochs) == 0.0  # the authors' last epoch: a sliver of a long run
    zero, total = steps_at_rate_zero(train, batches)
    assert (zero, total) == (batches, train.epochs * batches)


@pytest.mark.parametrize("overrides, share", [
    (["train.epochs=1", "train.warmup_epochs=0"], "1 of this run's 1 epochs"),
    (["train.epochs=2", "train.warmup_epochs=1"], "1 of this run's 2 epochs"),
    (["train.epochs=10", "train.warmup_epochs=0"], "1 of this run's 10 epochs"),
])
def test_a_short_cosine_run_is_refused_in_one_line(overrides: list[str], share: str) -> None:
    with pytest.raises(BadInput) as caught:
        load_config(None, ["data.name=synthetic", *overrides])
    message = str(caught.value)
    assert "\n" not in message and share in message
    assert "train.schedule = 'cosine'" in message and "train.schedule = 'cosine-step'" in message


def test_the_share_at_rate_zero_counts_the_steps_the_run_takes() -> None:
    train = TrainConfig(epochs=3, warmup_epochs=1, schedule="cosine", max_steps=20)
    assert steps_at_rate_zero(train, 8) == (4, 20)  # steps 17..20 are in epoch 3, at rate 0
    with pytest.raises(BadInput, match="4 of this run's 20 steps would learn nothing"):
        check_schedule(train, 8)
    short = TrainConfig(epochs=3, warmup_epochs=1, schedule="cosine", max_steps=16)
    assert steps_at_rate_zero(short, 8) == (0, 16)  # the run ends before the last epoch
    check_schedule(short, 8)
    for schedule in ("cosine-step", "poly", "constant"):  # the per-step schedules end above 0
        one_epoch = TrainConfig(epochs=1, warmup_epochs=0, schedule=schedule)
        assert steps_at_rate_zero(one_epoch, 50) == (0, 50)
        assert min(learning_rate(one_epoch, 1, step, 50) for step in range(1, 51)) > 0


def test_the_issue_command_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Cosine, 1 epoch, max_steps = 6: it logged lr 0.0 on every step and exited 0."""
    out = tmp_path / "run"
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=resnet8", "--set", "train.epochs=1",
                 "--set", "train.warmup_epochs=0", "--set", "train.max_steps=6", "--set", "run.log_every=1",
                 "--set", f"run.out_dir={out}"])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: train.schedule = 'cosine'") and "6 of this run's 6 steps" in line
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
