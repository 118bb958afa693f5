"""pipeline.runtime.scoring: accuracy counts and the segmentation confusion matrix, against hand counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.data.specs import IGNORE_INDEX, SPECS
from pipeline.runtime.scoring import Accuracy, MeanIoU, score_line, scoring_for


def one_hot_logits(predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits [B, C, H, W] whose argmax is ``predicted`` [B, H, W]."""
    return torch.nn.functional.one_hot(predicted, classes).permute(0, 3, 1, 2).float()


def test_confusion_matrix_and_miou_by_hand() -> None:
    labels = torch.tensor([[[0, 0, 1], [1, 2, IGNORE_INDEX]]])
    predicted = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    scoring = MeanIoU(4)
    counts = scoring.count(one_hot_logits(predicted, 4), labels)
    # rows: label, columns: prediction; the ignored pixel (predicted 2) counts nowhere
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(counts, expected)
    scores = scoring.scores(counts, images=1)
    # IoU 0: 1 / (2 + 2 - 1); 1: 2 / (2 + 3 - 2); 2: 0 / (1 + 0 - 0); class 3 occurs nowhere: no IoU
    assert scores["test_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert scores["test_iou"][3] is None
    assert scores["test_miou"] == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
    assert scores["test_accuracy"] == pytest.approx(3 / 5)  # labelled pixels only
    assert score_line(scores) == "test mIoU 33.33 %, pixel accuracy 60.00 %"


def test_counts_add_over_batches_like_one_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 6, 7), generator=generator)
    labels[labels == 4] = IGNORE_INDEX
    logits = torch.randn(4, 4, 6, 7, generator=generator)
    scoring = MeanIoU(4)
    whole = scoring.count(logits, labels)
    parts = scoring.zeros(torch.device("cpu"))
    for index in range(4):
        parts += scoring.count(logits[index : index + 1], labels[index : index + 1])
    assert torch.equal(parts, whole)
    assert int(whole.sum()) == int((labels != IGNORE_INDEX).sum())


def test_an_all_ignored_test_set_has_no_miou() -> None:
    scoring = MeanIoU(3)
    labels = torch.full((1, 2, 2), IGNORE_INDEX)
    scores = scoring.scores(scoring.count(torch.randn(1, 3, 2, 2), labels), images=1)
    assert scores["test_miou"] is None and scores["test_iou"] == [None, None, None]
    assert score_line(scores) == "test mIoU -, pixel accuracy 0.00 %"


def test_accuracy_counts_correct_predictions() -> None:
    scoring = Accuracy()
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    total = scoring.zeros(torch.device("cpu")) + scoring.count(logits, torch.tensor([0, 0, 0]))
    assert int(total) == 2
    assert scoring.scores(total, images=3) == {"test_accuracy": pytest.approx(2 / 3)}
    assert score_line({"test_accuracy": 0.5}) == "test accuracy 50.00 %"


def test_the_dataset_decides_the_scoring() -> None:
    assert isinstance(scoring_for(SPECS["cifar10"]), Accuracy)
    dense = scoring_for(dataclasses.replace(SPECS["cifar10"], dense=True))
    assert isinstance(dense, MeanIoU) and dense.classes == 10
