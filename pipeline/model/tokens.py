"""The local parts for token features (B, N, D) and vector features (B, D): heads, InfoPro's decoder,
ContSup's context encoders.

The maps' parts (heads.py, decoder.py, context.py) pool, upsample and convolve; tokens have no
spatial layout of their own, so where a part needs one (rebuilding the image, encoding it into
tokens) it reads the tokens as the image's square patches in row order — what a ViT's patch
embedding makes of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import BadInput
from pipeline.model.decoder import ImageDecoder
from pipeline.model.networks.base import Shape, describe_shape

# DeiT's LayerNorm epsilon, for the ViT's own norms and the token heads alike.
NORM_EPS = 1e-6
_CONTEXT_FITS = ("ContSup's context reaches tokens from images or maps cut into square patches (a patch encoder) "
                 "and from tokens of the same count (a projection); set local.context = 'R0' or cut where the "
                 "features fit")


def patch_side(tokens: int, image: Shape) -> int | None:
    """Side p of the square patches that ``tokens`` tokens would tile the (C, H, W) ``image`` with, in a
    grid of H/p x W/p; None where no such p exists."""
    _, height, width = image
    side = math.isqrt(height * width // tokens) if tokens > 0 else 0
    if side == 0 or height % side or width % side or (height // side) * (width // side) != tokens:
        return None
    return side


def token_width(shape: Shape, dims: int, part: str) -> int:
    """D of a ``dims``-dimensional feature shape ((N, D) tokens: 2, (D,) vectors: 1); BadInput otherwise."""
    if len(shape) != dims:
        raise BadInput(f"{part} takes {'tokens' if dims == 2 else 'vectors'}, not {describe_shape(shape)}: "
                       "cut where the network's features are of that kind")
    return shape[-1]


class TokenPool(nn.Module):
    """LayerNorm on each token, then the mean over the tokens: (B, N, D) -> (B, D)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.norm(tokens).mean(dim=1)
        return pooled


def _mlp(width: int, hidden: int, out: int) -> list[nn.Module]:
    return [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)]


class VectorHead(nn.Sequential):
    """The auxiliary head on vectors: Linear -> ReLU -> Linear."""

    def __init__(self, shape: Shape, out: int, hidden: int) -> None:
        super().__init__(*_mlp(token_width(shape, 1, "a vector head"), hidden, out))


class TokenHead(nn.Sequential):
    """The auxiliary head on tokens (the greedy / DGL form): LayerNorm, mean over tokens, Linear -> ReLU -> Linear."""

    def __init__(self, shape: Shape, out: int, hidden: int) -> None:
        width = token_width(shape, 2, "a token head")
        super().__init__(TokenPool(width), *_mlp(width, hidden, out))


class TokenDecoder(ImageDecoder):
    """InfoPro's reconstruction from tokens: each token to the pixels of its patch, folded into the image."""

    def __init__(self, shape: Shape, image_shape: Shape, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        tokens, width = shape[0], token_width(shape, 2, "the token decoder")
        channels, height, image_width = image_shape
        side = patch_side(tokens, image_shape)
        if side is None:
            raise BadInput(f"InfoPro's decoder cannot rebuild a {channels}x{height}x{image_width} image from "
                           f"{describe_shape(shape)}: the tokens must be its square patches in row order; set "
                           "local.reconstruct = false or cut where the features are maps")
        super().__init__(height, mean, std)
        self.size = (height, image_width)
        self.patch = side
        self.pixels = nn.Linear(width, channels * side * side)

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits of the reconstructed pixels (B, C, H, W), the image at ``size`` (default: the spec's) cut
        into the patches the tokens stand for; the loss applies the sigmoid (stable BCE)."""
        height, width = size or self.size
        tokens = features.shape[1]
        if height % self.patch or width % self.patch or (height // self.patch) * (width // self.patch) != tokens:
            raise BadInput(f"InfoPro's decoder cannot fold {tokens} tokens of {self.patch}x{self.patch} pixels into "
                           f"a {height}x{width} image: feed images of the size the network was built for")
        # (B, N, C*p*p) with N in row order is the column layout of fold: channel-major, then row, then column.
        pixels = self.pixels(features).transpose(1, 2)
        return F.fold(pixels, (height, width), kernel_size=self.patch, stride=self.patch)


class PatchEncoder(nn.Module):
    """ContSup's E into tokens (and Rn from maps into tokens): a patch embedding of ``source`` (C, H, W)
    into the target's N tokens of width D, then LayerNorm."""

    def __init__(self, source: Shape, target: Shape) -> None:
        super().__init__()
        side = patch_side(target[0], source) if len(source) == 3 and len(target) == 2 else None
        if side is None:
            raise BadInput(f"ContSup's patch encoder cannot turn {describe_shape(source)} into "
                           f"{describe_shape(target)}: {_CONTEXT_FITS}")
        self.embed = nn.Conv2d(source[0], target[1], side, stride=side)
        self.norm = nn.LayerNorm(target[1], eps=NORM_EPS)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.norm(self.embed(source).flatten(2).transpose(1, 2))
        return tokens


class TokenProjection(nn.Module):
    """ContSup's Rn between tokens: Linear -> LayerNorm on each token, from one width to the target's."""

    def __init__(self, source: Shape, target: Shape) -> None:
        super().__init__()
        if len(source) != 2 or len(target) != 2 or source[0] != target[0]:
            raise BadInput(f"ContSup's token projection cannot turn {describe_shape(source)} into "
                           f"{describe_shape(target)}: {_CONTEXT_FITS}")
        self.project = nn.Linear(source[1], target[1])
        self.norm = nn.LayerNorm(target[1], eps=NORM_EPS)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.norm(self.project(source))
        return tokens


def token_context_encoder(source: Shape, target: Shape) -> nn.Module:
    """The encoder that adds ``source`` (the image, or an earlier module's input) to token features of
    ``target``: a patch encoder from maps, a projection from tokens. Maps into maps are context.py's;
    anything else (a vector target or source, maps into tokens that do not tile them) is a BadInput."""
    if len(target) == 2 and len(source) == 3:
        return PatchEncoder(source, target)
    if len(target) == 2 and len(source) == 2:
        return TokenProjection(source, target)
    raise BadInput(f"ContSup cannot add {describe_shape(source)} to {describe_shape(target)}: {_CONTEXT_FITS}")
