"""One gradient-isolated module: context encoders + blocks + head (+ decoder) and its local loss.

The same class serves sequential mode, a pipeline stage and the end-to-end baselines
(K = 1: one module whose head is the real classifier). For segmentation the last module's head
is DeepLab-V3's ASPP head, with the FCN auxiliary head on the output of layer3's last block
(which config validation keeps inside the last module); labels are per-pixel maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config.schema import LocalConfig
from pipeline.data.contract import mix_seed
from pipeline.data.specs import DatasetSpec
from pipeline.model.arch import aux_block
from pipeline.model.context import ContextPlan
from pipeline.model.local_parts import LocalParts
from pipeline.model.losses import cross_entropy, dense_cross_entropy, upsample_to
from pipeline.model.methods.infopro import loss_weights, with_reconstruction
from pipeline.model.methods.registry import method_named
from pipeline.model.networks.base import BlockNet, Shape
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.recompute import checkpointed_body
from pipeline.model.resnet import ResidualBlock, init_weights
from pipeline.model.segmentation_heads import AUX_WEIGHT, ASPPHead, FCNHead, SeededDropout2d, reset_classifier
from pipeline.runtime.packet import Packet


@dataclass(frozen=True)
class Layout:
    """Everything a module needs to know about the whole network to build itself."""

    arch: NetworkSpec  # model.arch resolved: its family and the family's own facts
    net: BlockNet
    ranges: list[tuple[int, int]]
    plan: ContextPlan
    spec: DatasetSpec
    parts: LocalParts  # the heads, decoder and context encoders that fit the network's features

    def input_shape(self, module: int) -> Shape:
        return self.net.shape(self.ranges[module][0] - 1)

    def output_shape(self, module: int) -> Shape:
        return self.net.shape(self.ranges[module][1] - 1)


class LocalModule(nn.Module):
    def __init__(self, layout: Layout, index: int, local: LocalConfig, *, zero_init_residual: bool,
                 checkpoint_segments: int) -> None:
        """Module ``index`` of ``layout``; zero_init_residual and checkpoint_segments are model.zero_init_residual
        and precision.checkpoint_segments."""
        super().__init__()
        self.index = index
        self.last = index == len(layout.ranges) - 1
        self.plan = layout.plan
        self.method = method_named(local.loss)
        self.ixx, self.ixy = loss_weights(local, index)
        start, end = layout.ranges[index]
        target, parts = layout.input_shape(index), layout.parts

        self.image_encoder = (
            parts.image_encoder(layout.net.shape(-1), target, local.aux_widen)
            if self.plan.image and index >= 1 else None
        )
        self.input_encoders = nn.ModuleList(
            parts.input_encoder(layout.input_shape(source), target) for source in self.plan.register_sources(index)
        )
        self.body = nn.Sequential(*layout.net.build_range(start, end))
        self.checkpoint_segments = checkpoint_segments  # 0: no recomputation
        out = layout.output_shape(index)
        classes = layout.spec.classes
        self.dense = layout.arch.family == "segmentation"
        # The body's position of the block the FCN auxiliary head reads (the last module only).
        self.aux_tap: int | None = None
        self.aux_head: FCNHead | None = None
        self.head: nn.Module
        if self.last and self.dense:
            tap = aux_block(layout.arch.layout)
            assert start <= tap < end, "config validation keeps layer3's last block in the last module"
            self.aux_tap = tap - start
            self.head = ASPPHead(out[0], classes)
            self.aux_head = FCNHead(layout.net.shape(tap)[0], classes)
        elif self.last:
            self.head = layout.net.classifier(classes)
        else:
            head_out = self.method.head_width(classes, local)
            self.head = parts.aux_head(out, head_out, local)
        self.decoder = parts.decoder(out, layout.spec, local.aux_widen) if local.reconstruct and not self.last else None
        # Dropout (the segmentation heads) draws at every training step, from seeds the worker sets.
        self.dropouts = [layer for layer in self.modules() if isinstance(layer, SeededDropout2d)]
        if layout.net.own_init:  # a user's blocks keep their own initialisation; what the trainer adds does not
            for part in self.children():
                if part is not self.body:
                    init_weights(part)
        else:
            init_weights(self)
        if isinstance(self.head, ASPPHead) and self.aux_head is not None:
            reset_classifier(self.head.classifier)
            reset_classifier(self.aux_head.classifier)
        elif self.dense:
            # InfoPro builds its segmentation head and decoder after the network's initialisation, so
            # they keep PyTorch's default draw (a fan-out normal 1x1 conv to a few classes would
            # start the head at logits of ten and more).
            for layer in [*self.head.modules(), *(self.decoder.modules() if self.decoder is not None else [])]:
                if isinstance(layer, nn.Conv2d):
                    layer.reset_parameters()
        if zero_init_residual:
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

    def tapped_body(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The body's output, and the output of the block the FCN auxiliary head reads (None without it)."""
        if self.aux_tap is None:
            if self.checkpoint_segments and torch.is_grad_enabled():
                return checkpointed_body(self.body, inputs, self.checkpoint_segments), None
            return self.body(inputs), None
        out, tapped = inputs, None
        for position, block in enumerate(self.body):
            out = block(out)
            if position == self.aux_tap:
                tapped = out
        return out, tapped

    def forward(self, packet: Packet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, output, local loss): the loss inside forward lets DDP see every parameter used."""
        inputs = self.assemble_input(packet)
        output, tapped = self.tapped_body(inputs)
        return inputs, output, self.local_loss(output, packet, tapped)

    def local_loss(self, output: torch.Tensor, packet: Packet, tapped: torch.Tensor | None = None) -> torch.Tensor:
        """The module's loss on its output h (``tapped``: layer3's output, for the FCN auxiliary head)."""
        labels = packet.labels
        if self.last and self.aux_head is not None:
            assert tapped is not None
            # MMSegmentation's decode heads: logits resized to the labels (align_corners False), the
            # sum over pixels divided by every pixel of the map.
            return (dense_cross_entropy(self.head(output), labels)
                    + AUX_WEIGHT * dense_cross_entropy(self.aux_head(tapped), labels))
        if self.last:
            return cross_entropy(self.head(output), labels)
        if self.dense:  # InfoPro's module-0 head: align_corners, torch's mean over the pixels not ignored
            loss = dense_cross_entropy(self.head(output), labels, align_corners=True, per_valid_pixel=True)
        else:
            loss = self.method.loss(output, self.head(output), labels)
        if self.decoder is None:
            return loss
        assert packet.image is not None
        return with_reconstruction(loss, self.decoder, output, packet.image.detach(), (self.ixx, self.ixy))

    def next_packet(self, packet: Packet, inputs: torch.Tensor, output: torch.Tensor) -> Packet:
        """What module k+1 receives: h detached, the image if still needed, the register."""
        following = self.index + 1
        register = list(packet.register)
        if not (self.plan.image and self.index == 0):  # under RnE the image is never a register entry
            register.insert(0, inputs.detach())
        register = register[: self.plan.depth]
        image = packet.image if self.plan.carries_image(following) else None
        return Packet(packet.labels, output.detach(), image, register)

    def reseed(self, seed: int) -> None:
        """The seed of this training step's dropout masks; each dropout layer draws from its own."""
        for position, layer in enumerate(self.dropouts):
            layer.seed = mix_seed(seed, position)

    def logits(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class logits at the labels' resolution: per image (``labels`` only travel along), or for label
        maps the ASPP head's logits resized to the map (align_corners False, as MMSegmentation's DeepLab-V3)."""
        assert self.last, "only the last module has the classifier"
        logits: torch.Tensor = self.head(output)
        return upsample_to(logits, labels) if self.dense else logits
