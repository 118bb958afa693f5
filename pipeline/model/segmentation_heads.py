"""DeepLab-V3's heads (ASPP decode head, FCN auxiliary head) and InfoPro's segmentation module head.

The facts are MMSegmentation's ASPPHead / FCNHead under the DeepLab-V3 config, and the head of
InfoPro's Cityscapes code (docs/reference.md). Every head outputs class logits at the resolution
of its input feature; the local module upsamples them to the label map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.layers import conv_bn_relu

ASPP_DILATIONS = (12, 24, 36)  # the 3x3 branches; a 1x1 branch and the image pooling come with them
ASPP_CHANNELS = 512
FCN_CHANNELS = 256
INFOPRO_CHANNELS = 512
DROPOUT = 0.1
AUX_WEIGHT = 0.4  # the FCN auxiliary head's loss weight
CLASSIFIER_STD = 0.01  # MMSegmentation draws each decode head's last conv from N(0, 0.01), bias 0


class SeededDropout2d(nn.Module):
    """nn.Dropout2d (whole channels dropped, the rest scaled by 1 / (1 - p)) drawing from its own seed.

    The trainer sets ``seed`` before every training step from (run.seed, module, step), so the
    masks are the same whether one process runs every module or each runs in its own process or
    thread; the process's random state is neither read nor changed.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.seed = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return features
        draws = torch.Generator(device=features.device).manual_seed(self.seed)
        keep = torch.empty(*features.shape[:2], 1, 1, device=features.device, dtype=features.dtype)
        keep.bernoulli_(1 - self.p, generator=draws)
        return features * keep.div_(1 - self.p)


def reset_classifier(conv: nn.Conv2d) -> None:
    """Draw a decode head's last conv as MMSegmentation does: N(0, 0.01), bias 0.

    The local module's init_weights (fan-out normal for every conv) runs after construction, so
    the module calls this on each head's ``classifier`` once that is done.
    """
    nn.init.normal_(conv.weight, 0.0, CLASSIFIER_STD)
    assert conv.bias is not None
    nn.init.zeros_(conv.bias)


class ASPPHead(nn.Module):
    """Image pooling (pool, 1x1 conv) + 1x1 conv + 3x3 convs at dilations 12, 24, 36, each to 512
    channels with BN + ReLU; concatenated (pooling first), a 3x3 bottleneck to 512, dropout 0.1,
    1x1 conv to the classes."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(channels, ASPP_CHANNELS, 1))
        self.branches = nn.ModuleList([conv_bn_relu(channels, ASPP_CHANNELS, 1)] + [
            conv_bn_relu(channels, ASPP_CHANNELS, 3, dilation=dilation) for dilation in ASPP_DILATIONS])
        self.bottleneck = conv_bn_relu((len(self.branches) + 1) * ASPP_CHANNELS, ASPP_CHANNELS, 3)
        self.dropout = SeededDropout2d(DROPOUT)
        self.classifier = nn.Conv2d(ASPP_CHANNELS, classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.image_pool(features), size=features.shape[-2:], mode="bilinear",
                               align_corners=False)
        out = torch.cat([pooled, *(branch(features) for branch in self.branches)], dim=1)
        logits: torch.Tensor = self.classifier(self.dropout(self.bottleneck(out)))
        return logits


class FCNHead(nn.Module):
    """The auxiliary head on stage 3: conv3x3 -> 256 + BN + ReLU, dropout 0.1, 1x1 conv to the classes."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(channels, FCN_CHANNELS, 3)
        self.dropout = SeededDropout2d(DROPOUT)
        self.classifier = nn.Conv2d(FCN_CHANNELS, classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.dropout(self.conv(features)))
        return logits


def build_infopro_segmentation_head(channels: int, classes: int) -> nn.Sequential:
    """InfoPro's head of module 0: conv3x3 C -> 512 (with bias, as theirs) + BN + ReLU + Dropout2d(0.1)
    + conv1x1 512 -> classes."""
    return nn.Sequential(
        *conv_bn_relu(channels, INFOPRO_CHANNELS, 3, bias=True), SeededDropout2d(DROPOUT),
        nn.Conv2d(INFOPRO_CHANNELS, classes, 1),
    )
