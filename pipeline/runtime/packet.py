"""What flows from module k to module k+1 for one batch: labels, output and context."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Packet:
    labels: torch.Tensor
    features: torch.Tensor  # h_{k} detached; for module 0 the normalised image
    image: torch.Tensor | None = None  # the normalised image, where a later module needs it
    register: list[torch.Tensor] = field(default_factory=list)  # inputs of earlier modules, nearest first

    def tensors(self) -> list[torch.Tensor]:
        """Wire order (docs/design.md): labels, module output, context tensors."""
        image = [] if self.image is None else [self.image]
        return [self.labels, self.features, *image, *self.register]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], has_image: bool) -> Packet:
        labels, features, *context = tensors
        image = context.pop(0) if has_image else None
        return cls(labels, features, image, context)

    @classmethod
    def from_batch(cls, images: torch.Tensor, labels: torch.Tensor) -> Packet:
        """The packet module 0 receives: the image is its input and, where needed, context."""
        return cls(labels, images, images, [])
