"""InfoPro's reconstruction decoder: a module's output back to the input image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Decoder(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

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
        logits: torch.Tensor = self.layers(upsampled)
        return logits

    def target(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised input image back in [0, 1]: what the reconstruction is scored against.

        For real images the de-normalised pixels already lie in [0, 1] (up to rounding), so the
        clamp changes nothing there; it matters for inputs that do not (synthetic data, a wrong
        normalisation), where BCE against a target outside [0, 1] has no minimum and the
        decoder's logits would run off to infinity.
        """
        return (image * self.std + self.mean).clamp(0.0, 1.0)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logits) against the image in [0, 1], in the fused, stable form.

    Equal to the published sigmoid-then-BCE for unsaturated logits. Kept because that form
    loses the gradient once sigmoid rounds to exactly 0 or 1 (BCE then clamps log at -100
    and the sigmoid's derivative is 0), and because autocast refuses plain BCE.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
