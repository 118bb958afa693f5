"""InfoPro's reconstruction decoders: a module's output back to the input image (CIFAR, ImageNet and
segmentation, whose decoder is the ImageNet one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.layers import conv_bn_relu


class ImageDecoder(nn.Module):
    """What every decoder shares: the image size it rebuilds and the target it is scored against."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.image_size = image_size
        # The dataset's normalisation, to turn the normalised input back into [0, 1] pixels.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def target(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised input image back in [0, 1]: what the reconstruction is scored against.

        For real images the de-normalised pixels already lie in [0, 1] (up to rounding), so the
        clamp changes nothing there; it matters for inputs that do not (synthetic data, a wrong
        normalisation), where BCE against a target outside [0, 1] has no minimum and the
        decoder's logits would run off to infinity.
        """
        return (image * self.std + self.mean).clamp(0.0, 1.0)


class Decoder(ImageDecoder):
    """The CIFAR decoder: upsample to the image, conv3x3 to 12w, conv3x3 to the image channels."""

    def __init__(self, channels: int, image_channels: int, image_size: int, widen: int,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        super().__init__(image_size, mean, std)
        hidden = 12 * widen
        self.layers = nn.Sequential(*conv_bn_relu(channels, hidden, 3, bias=True),
                                    nn.Conv2d(hidden, image_channels, 3, padding=1))

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits of the reconstructed pixels at ``size`` (default: the spec's square image); the
        loss applies the sigmoid (stable BCE)."""
        size = size or (self.image_size, self.image_size)
        upsampled = F.interpolate(features, size=size, mode="bilinear", align_corners=True)
        logits: torch.Tensor = self.layers(upsampled)
        return logits


class ImageNetDecoder(ImageDecoder):
    """InfoPro's ImageNet decoder: 1x1 to 128, then three bilinear x2 steps up to the image
    (56, 112, 224 from a 28x28 feature at 224) with 3x3 convs to 32, 12 and the image channels.

    Their segmentation decoder is the same layer for layer (x2 steps from the stride-8 feature):
    a quarter, a half and the whole of the crop's height and width are those steps whenever the
    crop's sides are multiples of 8 (512x1024 is), and end at the crop's size otherwise."""

    def __init__(self, channels: int, image_channels: int, image_size: int,
                 mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)) -> None:
        super().__init__(image_size, mean, std)
        self.reduce = conv_bn_relu(channels, 128, 1, bias=True)
        self.steps = nn.ModuleList([conv_bn_relu(128, 32, 3, bias=True), conv_bn_relu(32, 12, 3, bias=True),
                                    nn.Conv2d(12, image_channels, 3, padding=1)])

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits of the reconstructed pixels at ``size`` (height, width; default: the spec's square
        image); the loss applies the sigmoid (stable BCE)."""
        height, width = size or (self.image_size, self.image_size)
        out: torch.Tensor = self.reduce(features)
        for step, divisor in zip(self.steps, (4, 2, 1)):
            out = step(F.interpolate(out, size=(height // divisor, width // divisor), mode="bilinear",
                                     align_corners=True))
        return out


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of sigmoid(logits) against the image in [0, 1], in the fused, stable form.

    Equal to the published sigmoid-then-BCE for unsaturated logits. Kept because that form
    loses the gradient once sigmoid rounds to exactly 0 or 1 (BCE then clamps log at -100
    and the sigmoid's derivative is 0), and because autocast refuses plain BCE.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
