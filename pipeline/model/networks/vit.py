"""ViT for small images as a flat list of blocks: block 0 the patch embedding, blocks 1..depth the
transformer blocks; the classifier (LayerNorm, mean over the tokens, linear) belongs to the last module.

DeiT's widths (tiny 192, small 384; 12 blocks) on 4x4 patches, as the small-image ViT recipes cut a
32x32 image into 64 tokens. There is no class token: the classifier and the token heads mean-pool,
so every module's output is the same (N, D) tokens and any block boundary is a cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput, clip
from pipeline.model.networks.base import BlockNet, Shape
from pipeline.model.networks.family import DataShape, NetworkFamily, NetworkSpec, register_network
from pipeline.model.tokens import NORM_EPS, TokenPool

PATCH = 4
MLP_RATIO = 4
INIT_STD = 0.02


@dataclass(frozen=True)
class ViTSize:
    width: int  # D
    depth: int  # transformer blocks
    heads: int


SIZES = {"vit_tiny": ViTSize(192, 12, 3), "vit_small": ViTSize(384, 12, 6)}


def init_transformer(module: nn.Module) -> None:
    """timm's ViT initialisation: linear weights trunc-normal (std 0.02), biases 0 (LayerNorm starts at
    (1, 0) as built). Each block calls it on itself, so a block built alone draws what it draws in a network."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=INIT_STD)
            nn.init.zeros_(layer.bias)


class PatchEmbedding(nn.Module):
    """Block 0: the image cut into PATCH x PATCH patches, each projected to D, plus learned positions."""

    def __init__(self, in_channels: int, width: int, tokens: int) -> None:
        super().__init__()
        # The conv keeps PyTorch's draw here; LocalModule's init_weights redraws it as every conv.
        self.project = nn.Conv2d(in_channels, width, PATCH, stride=PATCH)
        # timm's call: bounds of +-2 in absolute terms, so at this std the truncation never bites.
        self.position = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, width), std=INIT_STD))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.project(image).flatten(2).transpose(1, 2)
        return tokens + self.position


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens (scaled dot product, no dropout)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.project = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, count, width = tokens.shape
        q, k, v = self.qkv(tokens).view(batch, count, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        out: torch.Tensor = self.project(mixed.transpose(1, 2).reshape(batch, count, width))
        return out


class TransformerBlock(nn.Module):
    """Pre-norm: x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU MLP of MLP_RATIO x the width."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=NORM_EPS)
        self.attention = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, MLP_RATIO * width), nn.GELU(), nn.Linear(MLP_RATIO * width, width))
        init_transformer(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attention(self.norm1(tokens))
        out: torch.Tensor = tokens + self.mlp(self.norm2(tokens))
        return out


class ViTClassifier(nn.Sequential):
    def __init__(self, width: int, classes: int) -> None:
        super().__init__(TokenPool(width), nn.Linear(width, classes))
        init_transformer(self)


class ViT(BlockNet):
    def __init__(self, name: str, size: ViTSize, input_shape: Shape) -> None:
        super().__init__(name, input_shape)
        self.size = size
        _, height, width = input_shape
        if height % PATCH or width % PATCH:
            raise BadInput(f"model.arch = {name!r} cuts images into {PATCH}x{PATCH} patches, but these images are "
                           f"{height}x{width}: set data.image_size to a multiple of {PATCH}, or use a ResNet or VGG")
        self.tokens = (height // PATCH) * (width // PATCH)

    def __len__(self) -> int:
        return 1 + self.size.depth

    def build(self, index: int) -> nn.Module:
        if index == 0:
            return PatchEmbedding(self.input_shape[0], self.size.width, self.tokens)
        return TransformerBlock(self.size.width, self.size.heads)

    def classifier(self, classes: int) -> nn.Module:
        return ViTClassifier(self.size.width, classes)


class ViTFamily(NetworkFamily):
    name = "vit"

    def names(self) -> tuple[str, ...]:
        return tuple(SIZES)

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        if arch not in SIZES:
            raise BadInput(f"model.arch = {clip(arch)!r} is not a ViT; allowed: {', '.join(SIZES)}")
        return NetworkSpec(arch, self.name, 1 + SIZES[arch].depth, layout=SIZES[arch])

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> ViT:
        return ViT(spec.name, spec.layout, (data.channels, *data.image_shape))


register_network(ViTFamily())
