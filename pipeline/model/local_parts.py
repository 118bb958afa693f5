"""Which auxiliary head, reconstruction decoder and context encoder fit a feature.

The generic choice goes by the feature's rank: 4-D maps get the published CIFAR heads (0c1f ...
2c2f), decoder and ContSup encoders; 3-D token sequences the token forms (pipeline/model/tokens.py:
LayerNorm + mean-pool + MLP head, a per-token linear reconstruction of its patch, a patch embedding
of the image for E, a per-token projection for Rn); 2-D vectors an MLP head. A family whose papers
publish their own parts (InfoPro's ImageNet and segmentation heads) subclasses ``LocalParts``;
anything that cannot fit a feature says so in one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput
from pipeline.model.context import ImageEncoder, InputEncoder
from pipeline.model.decoder import Decoder, ImageDecoder, ImageNetDecoder
from pipeline.model.heads import build_aux_head, build_imagenet_head
from pipeline.model.networks.base import Shape, describe_shape
from pipeline.model.segmentation_heads import build_infopro_segmentation_head
from pipeline.model.tokens import TokenDecoder, TokenHead, VectorHead, token_context_encoder

if TYPE_CHECKING:  # annotations only: reading a config builds no torch module
    from pipeline.config.schema import LocalConfig


class LocalParts:
    """The generic parts, chosen by the rank of the feature they read or write."""

    def aux_head(self, shape: Shape, out: int, local: LocalConfig) -> nn.Module:
        """The head that trains a module ending in a feature of ``shape``: ``out`` outputs."""
        if len(shape) == 3:
            return build_aux_head(local.aux, shape[0], out, local.aux_widen, local.aux_hidden)
        hidden = local.aux_hidden * local.aux_widen
        if len(shape) == 2:
            return TokenHead(shape, out, hidden)
        if len(shape) == 1:
            return VectorHead(shape, out, hidden)
        raise BadInput(f"no auxiliary head fits a module output of {describe_shape(shape)}; cut after a block "
                       "whose output is a map, a token sequence or a vector")

    def aux_head_names(self, shapes: Iterable[Shape], local: LocalConfig) -> list[str]:
        """What ``aux_head`` builds for features of ``shapes``, as a recipe names them (each once); parts with
        one head for every feature name it without reading them (a shape may cost a probe of the network)."""
        return list(dict.fromkeys({3: local.aux, 2: "token head", 1: "vector head"}.get(len(shape), "no head")
                                  for shape in shapes))

    def decoder(self, shape: Shape, spec: DatasetSpec, widen: int) -> ImageDecoder:
        """InfoPro's reconstruction of the image from a feature of ``shape``."""
        if len(shape) == 3:
            return Decoder(shape[0], spec.channels, spec.image_size, widen, spec.mean, spec.std)
        if len(shape) == 2:
            return TokenDecoder(shape, (spec.channels, *spec.image_shape), spec.mean, spec.std)
        raise BadInput(f"local.reconstruct: no decoder rebuilds the image from {describe_shape(shape)}; set "
                       "local.reconstruct = false")

    def image_encoder(self, image: Shape, target: Shape, widen: int) -> nn.Module:
        """ContSup's E: the image encoded into a module input of ``target``."""
        if len(target) == 3:
            return ImageEncoder(image[0], target, widen)
        return token_context_encoder(image, target)

    def input_encoder(self, source: Shape, target: Shape) -> nn.Module:
        """ContSup's R: an earlier module's input of ``source`` encoded into a module input of ``target``."""
        if len(source) == 3 and len(target) == 3:
            return InputEncoder(source[0], target)
        return token_context_encoder(source, target)


class ImageNetParts(LocalParts):
    """InfoPro's ImageNet head and decoder."""

    def aux_head(self, shape: Shape, out: int, local: LocalConfig) -> nn.Module:
        return build_imagenet_head(shape[0], out)

    def aux_head_names(self, shapes: Iterable[Shape], local: LocalConfig) -> list[str]:
        return ["ImageNet head"]

    def decoder(self, shape: Shape, spec: DatasetSpec, widen: int) -> ImageDecoder:
        return ImageNetDecoder(shape[0], spec.channels, spec.image_size, spec.mean, spec.std)


class SegmentationParts(ImageNetParts):
    """InfoPro's segmentation head (its decoder is the ImageNet one)."""

    def aux_head(self, shape: Shape, out: int, local: LocalConfig) -> nn.Module:
        return build_infopro_segmentation_head(shape[0], out)

    def aux_head_names(self, shapes: Iterable[Shape], local: LocalConfig) -> list[str]:
        return ["segmentation head"]
