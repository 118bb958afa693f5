"""The local losses a head can train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
