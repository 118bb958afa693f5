"""How the last module's test predictions are scored: counts summed over batches and replicas.

Classification counts correct predictions (accuracy); segmentation accumulates a classes x
classes confusion matrix (rows: the label, columns: the prediction) over every labelled pixel,
from which come the per-class IoU, their mean (mIoU) and the pixel accuracy. The counts stay on
the device until an epoch ends, where the replicas' counts are summed and turned into scores.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pipeline.data.specs import IGNORE_INDEX, DatasetSpec
from pipeline.runtime.metrics import percent


class Scoring(Protocol):
    def zeros(self, device: torch.device) -> torch.Tensor:
        """The running count before the first test batch."""
        ...

    def count(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What one test batch adds to the running count (no host synchronisation)."""
        ...

    def scores(self, total: torch.Tensor, images: int) -> dict[str, Any]:
        """summary.json's scores of a whole test set; test_accuracy is always one of them."""
        ...


class Accuracy:
    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((), dtype=torch.int64, device=device)

    def count(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == labels).sum()

    def scores(self, total: torch.Tensor, images: int) -> dict[str, Any]:
        return {"test_accuracy": float(total) / max(images, 1)}


class MeanIoU:
    """mIoU as MMSegmentation and the Cityscapes benchmark compute it: the mean over the classes
    that occur in the labels or the predictions of the test set (a class with neither has no IoU)."""

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.classes, self.classes, dtype=torch.int64, device=device)

    def count(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = self.classes
        # Ignored pixels go to an extra bin that is dropped: no boolean indexing, so no wait for the device.
        cells = torch.where(labels == IGNORE_INDEX, classes * classes, labels * classes + logits.argmax(1))
        flat = cells.flatten()
        counts = torch.zeros(classes * classes + 1, dtype=torch.int64, device=labels.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        return counts[:-1].view(classes, classes)

    def scores(self, total: torch.Tensor, images: int) -> dict[str, Any]:
        confusion = total.double().cpu()
        hits = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - hits
        iou = [float(h / u) if u > 0 else None for h, u in zip(hits, union)]
        present = [value for value in iou if value is not None]
        labelled = float(confusion.sum())
        return {
            "test_accuracy": float(hits.sum()) / labelled if labelled else 0.0,  # pixel accuracy
            "test_miou": sum(present) / len(present) if present else None,
            "test_iou": iou,
        }


def scoring_for(spec: DatasetSpec) -> Scoring:
    return MeanIoU(spec.classes) if spec.dense else Accuracy()


def score_line(scores: dict[str, Any]) -> str:
    """A run's test scores as the console shows them (summary.json's keys)."""
    if "test_miou" in scores:
        miou = "-" if scores["test_miou"] is None else percent(scores["test_miou"])
        return f"test mIoU {miou}, pixel accuracy {percent(scores['test_accuracy'])}"
    return f"test accuracy {percent(scores['test_accuracy'])}"
