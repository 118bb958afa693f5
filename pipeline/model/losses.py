"""The local losses a head can train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.specs import IGNORE_INDEX

CONTRAST_TEMPERATURE = 0.07


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor,
                           temperature: float = CONTRAST_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss, one view per sample: positives share the label.

    The mean runs over all B anchors, as in both methods' published code: an anchor that is
    the only one of its class has its positive count raised from 0 to 1, so it adds 0 to the
    sum yet still counts in the mean. Averaging over the anchors with a positive instead would
    scale the loss and its gradients by B / (anchors with a positive), batch by batch.
    Only dense masks and arithmetic: no boolean indexing or ``.item()``, so nothing here waits
    for the device.
    """
    features = F.normalize(features.float(), dim=1)
    logits = features @ features.T / temperature
    count = labels.shape[0]
    self_mask = torch.eye(count, dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_count = positives.sum(1).clamp(min=1)
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    return -(summed / positive_count).mean()


def head_loss(kind: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "contrast":
        return supervised_contrastive(outputs, labels)
    return F.cross_entropy(outputs.float(), labels)


def dense_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool = False,
                        per_valid_pixel: bool = False) -> torch.Tensor:
    """Per-pixel cross-entropy of class logits [B, C, h, w] against a label map [B, H, W], in fp32.

    The logits are upsampled bilinearly to the label map first. Pixels labelled IGNORE_INDEX add 0.
    The sum is divided by every pixel of the map (MMSegmentation's decode heads), or with
    ``per_valid_pixel`` by the pixels not ignored (torch's mean, InfoPro's module-0 head), raised to
    at least 1: a map with every pixel ignored gives 0 and a zero gradient where torch's mean gives
    NaN. The count stays on the device (no host sync).
    """
    upsampled = upsample_to(logits.float(), labels, align_corners)
    losses = F.cross_entropy(upsampled, labels, ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1) if per_valid_pixel else labels.numel()
    return losses.sum() / count


def upsample_to(logits: torch.Tensor, labels: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """Class logits resized bilinearly to the label map's height and width."""
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
