"""pipeline.model.losses: cross-entropy per sample and per pixel (dense, ignoring 255), in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.specs import IGNORE_INDEX
from pipeline.model.losses import cross_entropy, dense_cross_entropy


def test_cross_entropy_is_torchs_in_fp32():
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cross_entropy(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert cross_entropy(logits.to(torch.bfloat16), labels).dtype == torch.float32


# ---- dense (per-pixel) cross-entropy ----------------------------------------------------------


def label_map(seed: int = 0, classes: int = 4, shape=(2, 8, 12)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels[0, :3] = IGNORE_INDEX
    return labels


def test_dense_cross_entropy_ignores_255_and_divides_as_asked():
    logits = torch.randn(2, 4, 4, 6)
    labels = label_map()
    upsampled = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(upsampled, labels, ignore_index=255, reduction="none")
    assert torch.all(per_pixel[labels == 255] == 0)
    valid = labels != 255
    # MMSegmentation's decode heads: the sum over every pixel of the map
    assert torch.allclose(dense_cross_entropy(logits, labels), per_pixel.sum() / labels.numel())
    # InfoPro's module-0 head: torch's mean over the pixels not ignored, after align_corners upsampling
    corners = F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=True)
    assert torch.allclose(dense_cross_entropy(logits, labels, align_corners=True, per_valid_pixel=True),
                          F.cross_entropy(corners, labels, ignore_index=255))
    assert torch.allclose(dense_cross_entropy(logits, labels, per_valid_pixel=True),
                          per_pixel[valid].mean())


def test_an_all_ignored_map_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(2, 4, 4, 6, requires_grad=True)
    labels = torch.full((2, 8, 12), IGNORE_INDEX)
    upsampled = F.interpolate(logits, size=(8, 12), mode="bilinear")
    assert torch.isnan(F.cross_entropy(upsampled, labels, ignore_index=255))  # what torch's mean does
    for per_valid_pixel in (False, True):
        loss = dense_cross_entropy(logits, labels, per_valid_pixel=per_valid_pixel)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.all(grad == 0)


def test_dense_cross_entropy_is_fp32_under_bf16_logits():
    logits = torch.randn(2, 4, 4, 6).to(torch.bfloat16)
    assert dense_cross_entropy(logits, label_map()).dtype == torch.float32
