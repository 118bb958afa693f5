"""The local losses a head can train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONTRAST_TEMPERATURE = 0.07


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor,
                           temperature: float = CONTRAST_TEMPERATURE) -> torch.Tensor:
    """Supervised contrastive loss, one view per sample: positives share the label.

    Anchors without any positive in the batch contribute nothing.
    """
    features = F.normalize(features.float(), dim=1)
    logits = features @ features.T / temperature
    count = labels.shape[0]
    self_mask = torch.eye(count, dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    positive_count = positives.sum(1)
    summed = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    has_positive = positive_count > 0
    per_anchor = -summed[has_positive] / positive_count[has_positive]
    return per_anchor.mean() if per_anchor.numel() else features.sum() * 0.0


def head_loss(kind: str, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if kind == "contrast":
        return supervised_contrastive(outputs, labels)
    return F.cross_entropy(outputs.float(), labels)
