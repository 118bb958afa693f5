"""One gradient-isolated module: context encoders + blocks + head (+ decoder) and its local loss.

The same class serves the sequential runner, a pipeline stage and the end-to-end baselines
(K = 1: one module whose head is the real classifier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.specs import DatasetSpec
from pipeline.model.context import ContextPlan, ImageEncoder, InputEncoder
from pipeline.model.decoder import build_decoder, reconstruction_loss
from pipeline.model.heads import build_head
from pipeline.model.losses import head_loss
from pipeline.model.resnet import BlockNet, BlockShape, Classifier, ResidualBlock, init_weights
from pipeline.packet import Packet


def loss_weights(config: Config, index: int) -> tuple[float, float]:
    """(ixx, ixy) of local module ``index``: linear from (ixx_1, ixy_1) to (ixx_2, ixy_2)."""
    local = config.local
    if not local.reconstruct:
        return 0.0, 1.0
    ratio = index / (local.modules - 2) if local.modules > 2 else 0.0
    return (local.ixx_1 + ratio * (local.ixx_2 - local.ixx_1),
            local.ixy_1 + ratio * (local.ixy_2 - local.ixy_1))


@dataclass(frozen=True)
class Layout:
    """Everything a module needs to know about the whole network to build itself."""

    net: BlockNet
    ranges: list[tuple[int, int]]
    plan: ContextPlan
    spec: DatasetSpec

    def input_shape(self, module: int) -> BlockShape:
        return self.net.shape(self.ranges[module][0] - 1)

    def output_shape(self, module: int) -> BlockShape:
        return self.net.shape(self.ranges[module][1] - 1)


class LocalModule(nn.Module):
    def __init__(self, config: Config, layout: Layout, index: int) -> None:
        super().__init__()
        local = config.local
        self.index = index
        self.last = index == len(layout.ranges) - 1
        self.plan = layout.plan
        self.loss_kind = local.loss
        self.ixx, self.ixy = loss_weights(config, index)
        start, end = layout.ranges[index]
        target = layout.input_shape(index)

        self.image_encoder = (
            ImageEncoder(layout.spec.channels, target, local.aux_widen) if self.plan.image and index >= 1 else None
        )
        self.input_encoders = nn.ModuleList(
            InputEncoder(layout.input_shape(source).channels, target) for source in self.plan.register_sources(index)
        )
        self.body = nn.Sequential(*(layout.net.build(block) for block in range(start, end)))
        out = layout.output_shape(index)
        classes, family = layout.spec.classes, config.arch.family
        if self.last:
            self.head: nn.Module = Classifier(out.channels, classes)
        else:
            head_out = classes if local.loss == "softmax" else local.aux_feature_dim
            self.head = build_head(family, local, out.channels, head_out)
        self.decoder = (
            build_decoder(family, out.channels, layout.spec, local.aux_widen)
            if local.reconstruct and not self.last
            else None
        )
        init_weights(self)
        if config.model.zero_init_residual:
            for block in self.body.modules():
                if isinstance(block, ResidualBlock):
                    block.zero_init_residual()

    def assemble_input(self, packet: Packet) -> torch.Tensor:
        """h_{k-1} + E(image) + sum R_d(input_{k-d}); every source arrives detached."""
        features = packet.features.detach()
        if self.image_encoder is not None:
            assert packet.image is not None
            features = features + self.image_encoder(packet.image.detach())
        for encoder, source in zip(self.input_encoders, packet.register):
            features = features + encoder(source.detach())
        return features

    def features(self, packet: Packet) -> tuple[torch.Tensor, torch.Tensor]:
        """(this module's input with context, its output h)."""
        inputs = self.assemble_input(packet)
        return inputs, self.body(inputs)

    def forward(self, packet: Packet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, output, local loss): the loss inside forward lets DDP see every parameter used."""
        inputs, output = self.features(packet)
        return inputs, output, self.local_loss(output, packet)

    def local_loss(self, output: torch.Tensor, packet: Packet) -> torch.Tensor:
        if self.last:
            return head_loss("softmax", self.head(output), packet.labels)
        loss = head_loss(self.loss_kind, self.head(output), packet.labels)
        if self.decoder is None:
            return loss
        assert packet.image is not None
        target = self.decoder.target(packet.image.detach())
        return self.ixx * reconstruction_loss(self.decoder(output), target) + self.ixy * loss

    def next_packet(self, packet: Packet, inputs: torch.Tensor, output: torch.Tensor) -> Packet:
        """What module k+1 receives: h detached, the image if still needed, the register."""
        following = self.index + 1
        register = list(packet.register)
        if not (self.plan.image and self.index == 0):  # under RnE the image is never a register entry
            register.insert(0, inputs.detach())
        register = register[: self.plan.depth]
        image = packet.image if self.plan.carries_image(following) else None
        return Packet(packet.labels, output.detach(), image, register)

    def logits(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class scores at the labels' resolution (for classification ``labels`` only travel along)."""
        assert self.last, "only the last module has the classifier"
        logits: torch.Tensor = self.head(output)
        return logits
