"""ContSup context: which tensors travel to each module, and the encoders that add them.

Module j (j >= 1) receives h_{j-1}.detach() and adds, with its own encoders:
- E: an encoding of the normalised image;
- Rn: a 1x1 encoding of each of the inputs of modules j-1 .. j-n (its "register"), where
  that module exists and, under RnE, is not module 0 (whose input is the image E already adds).
Module 0 receives the image itself and adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.layers import conv_bn_relu
from pipeline.model.networks.base import Shape

if TYPE_CHECKING:  # annotations only: reading a config builds no torch module
    from pipeline.config.schema import LocalConfig


@dataclass(frozen=True)
class ContextPlan:
    """Static facts of the context flow, shared by the sender and the receiver of each link."""

    modules: int
    depth: int  # n of Rn
    image: bool  # E or RnE
    reconstruct: bool

    @classmethod
    def of(cls, local: LocalConfig) -> ContextPlan:
        """The plan local.modules, local.context and local.reconstruct make."""
        return cls(local.modules, local.context_depth, local.context_image, local.reconstruct)

    def needs_image(self, module: int) -> bool:
        """Does module ``module`` itself use the image (E encoder or reconstruction target)?"""
        return (self.image and module >= 1) or (self.reconstruct and module <= self.modules - 2)

    def carries_image(self, module: int) -> bool:
        """Does the packet into ``module`` (>= 1) carry the image for it or a later module?"""
        return any(self.needs_image(later) for later in range(module, self.modules))

    def register_sources(self, module: int) -> list[int]:
        """Indices of the modules whose inputs travel into ``module``, nearest first."""
        sources = [module - distance for distance in range(1, self.depth + 1)]
        return [s for s in sources if s >= 0 and not (self.image and s == 0)]


class ImageEncoder(nn.Module):
    """E_k: conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> pool to the target size."""

    def __init__(self, image_channels: int, target: Shape, widen: int) -> None:
        super().__init__()
        hidden = 12 * widen
        self.size = (target[1], target[2])
        self.layers = nn.Sequential(*conv_bn_relu(image_channels, hidden, 3, bias=True),
                                    *conv_bn_relu(hidden, target[0], 3, bias=True))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(image), self.size)


class InputEncoder(nn.Module):
    """R_k: conv1x1 -> BN -> ReLU -> pool, from an earlier module's input to the target size."""

    def __init__(self, source_channels: int, target: Shape) -> None:
        super().__init__()
        self.size = (target[1], target[2])
        self.layers = conv_bn_relu(source_channels, target[0], 1, bias=True)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.layers(source), self.size)
