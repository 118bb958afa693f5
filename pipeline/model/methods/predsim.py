"""predsim: PredSim (Nøkland & Eidnes 2019, "Training neural networks with local error signals", ICML;
their code: github.com/anokland/local-loss).

The loss is ``(1 - beta) * pred + beta * sim`` with beta = 0.99 (their default): pred is the
cross-entropy of the head's class logits; sim is the mean squared difference between the similarity
matrix of the module's output h and that of the one-hot labels.

sim scores h itself, as their --bio setting does; their default scores a learned 3x3 conv of h, a
layer this method does not add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.model.methods.registry import LocalMethod, register_method

# torch is imported inside the functions: reading a config imports this module (the package registers its
# built-ins) and must not load torch
if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.config.schema import LocalConfig

BETA = 0.99
NORM_EPS = 1e-8


class PredSim(LocalMethod):
    name = "predsim"
    summary_name = "predsim"
    standalone = True

    def head_width(self, classes: int, local: LocalConfig) -> int:
        return classes

    def loss(self, output: Tensor, head_output: Tensor, labels: Tensor) -> Tensor:
        return predsim_loss(output, head_output, labels)


def similarity_matrix(x: Tensor) -> Tensor:
    """[B, B] cosine similarities of the samples' centred features, clamped to [-1, 1] (their ``similarity_matrix``).

    A 4-D map of more than 3 channels and more than one row (their test reads the height) is first
    reduced to each channel's standard deviation over its pixels, which makes the similarity
    independent of where in the image a feature fires; anything else (a small map, token sequences
    [B, N, D], vectors [B, D]) is flattened per sample. Each row is centred by its mean and divided
    by its norm + 1e-8. The norm is torch's, whose gradient is 0 at a constant row where their
    explicit square root gives NaN; the values are the same.
    """
    import torch

    batch = x.shape[0]
    if x.dim() == 4 and x.shape[1] > 3 and x.shape[2] > 1:
        x = x.reshape(batch, x.shape[1], -1).std(dim=2)
    x = x.reshape(batch, -1)
    centred = x - x.mean(dim=1, keepdim=True)
    norm: Tensor = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    unit = centred / (norm + NORM_EPS)
    return (unit @ unit.T).clamp(-1.0, 1.0)


def similarity_loss(features: Tensor, labels: Tensor, classes: int) -> Tensor:
    """sim: the mean squared difference between the features' similarity matrix and the one-hot labels'."""
    import torch.nn.functional as F

    target = similarity_matrix(F.one_hot(labels, classes).float())
    return F.mse_loss(similarity_matrix(features.float()), target)


def predsim_loss(features: Tensor, logits: Tensor, labels: Tensor, beta: float = BETA) -> Tensor:
    """``(1 - beta) * cross-entropy(logits) + beta * sim(features)``, in fp32: autocast is off inside, so the
    similarity matrices' matrix products are not rounded to bf16 under mixed precision."""
    import torch

    from pipeline.model.losses import cross_entropy

    with torch.autocast(features.device.type, enabled=False):
        pred = cross_entropy(logits, labels)
        return (1.0 - beta) * pred + beta * similarity_loss(features, labels, logits.shape[1])


register_method(PredSim())
