"""InfoPro's reconstruction decoder: a module's output back to the input image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Decoder(nn.Module):
    def __init__(self, channels: int, image_channels: int, image_size: int, widen: int,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.image_size = image_size
        # The dataset's normalisation, to turn the normalised input back into [0, 1] pixels.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        hidden = 12 * widen
        self.layers = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, image_channels, 3, padding=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of the reconstructed pixels; the loss applies the sigmoid (stable BCE)."""
        size = (self.image_size, self.image_size)
        upsampled = F.interpolate(features, size=size, mode="bilinear", align_corners=True)
        return self.layers(upsampled)

    def target(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised input image back in [0, 1]: what the reconstruction is scored against."""
        return (image * self.std + self.mean).clamp(0.0, 1.0)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logits) against the image in [0, 1]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
