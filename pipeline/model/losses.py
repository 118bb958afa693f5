"""Cross-entropy of class logits, per sample and per pixel (the local methods' own losses are
pipeline/model/methods/)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.specs import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of class logits [B, C] against one class per sample, in fp32: the classifier's loss
    and the softmax method's."""
    return F.cross_entropy(logits.float(), labels)


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
