"""contrast: the head outputs a feature of local.aux_feature_dim, trained with the supervised
contrastive loss (InfoPro's and ContSup's contrast mode)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.model.methods.registry import LocalMethod, register_method

# torch is imported inside the functions: reading a config imports this module (the package registers its
# built-ins) and must not load torch
if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.config.schema import LocalConfig

CONTRAST_TEMPERATURE = 0.07


class Contrast(LocalMethod):
    name = "contrast"
    summary_name = "contrast"
    identity_keys = ("aux_feature_dim",)

    def head_width(self, classes: int, local: LocalConfig) -> int:
        return local.aux_feature_dim

    def loss(self, output: Tensor, head_output: Tensor, labels: Tensor) -> Tensor:
        return supervised_contrastive(head_output, labels)


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float = CONTRAST_TEMPERATURE) -> Tensor:
    """Supervised contrastive loss, one view per sample: positives share the label.

    The mean runs over all B anchors, as in both methods' published code: an anchor that is
    the only one of its class has its positive count raised from 0 to 1, so it adds 0 to the
    sum yet still counts in the mean. Averaging over the anchors with a positive instead would
    scale the loss and its gradients by B / (anchors with a positive), batch by batch.
    Only dense masks and arithmetic: no boolean indexing or ``.item()``, so nothing here waits
    for the device.
    """
    import torch
    import torch.nn.functional as F

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


register_method(Contrast())
