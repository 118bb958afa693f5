"""pipeline.model.losses: supervised contrastive loss (one view, temperature 0.07) and CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.specs import IGNORE_INDEX
from pipeline.model.losses import (
    CONTRAST_TEMPERATURE,
    dense_cross_entropy,
    head_loss,
    supervised_contrastive,
)


def definition(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
               lone_anchors_count: bool = True) -> float:
    """SupCon anchor by anchor in float64 Python; a lone anchor adds 0 and (by default) counts in the mean."""
    rows = [[float(v) for v in row] for row in features]
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]
    classes = [int(v) for v in labels]
    total, counted = 0.0, 0
    for i, anchor in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i]
        positives = [j for j in others if classes[j] == classes[i]]
        counted += 1 if positives or lone_anchors_count else 0
        sims = {j: sum(a * b for a, b in zip(anchor, rows[j])) / temperature for j in others}
        log_norm = math.log(sum(math.exp(s) for s in sims.values()))
        total += -sum(sims[p] - log_norm for p in positives) / max(len(positives), 1)
    return total / counted


def published_formula(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """The formula of the InfoPro / ContSup code, step by step, in float64 and differentiable.

    sim = z z^T / t with z = x / |x|; logits = sim - rowmax(sim) (self included, not differentiated);
    log_prob_ij = logits_ij - log sum_{k != i} exp(logits_ik); m_ij = [y_i = y_j, i != j];
    n_i = sum_j m_ij, and n_i = 1 where it is 0; loss = -(1/B) sum_i (sum_j m_ij log_prob_ij) / n_i.
    """
    z = features / features.norm(dim=1, keepdim=True)
    sim = z @ z.T / temperature
    logits = sim - sim.max(dim=1, keepdim=True).values.detach()
    batch = labels.shape[0]
    not_self = 1.0 - torch.eye(batch, dtype=features.dtype)
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(features.dtype) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    n = same.sum(1)
    n = n + (n == 0).to(n.dtype)
    return -((same * log_prob).sum(1) / n).mean()


def test_temperature_is_the_published_one():
    assert CONTRAST_TEMPERATURE == 0.07


def test_hand_computed_three_samples():
    # unit vectors: a=(1,0), b=(0.6,0.8), c=(0,1); a and b share label 0, c is alone
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.07
    anchor_a = -(0.6 / t - math.log(math.exp(0.6 / t) + math.exp(0.0 / t)))
    anchor_b = -(0.6 / t - math.log(math.exp(0.6 / t) + math.exp(0.8 / t)))
    # c has no positive: it adds 0 but still counts, so the mean divides by 3, not 2
    expected = (anchor_a + anchor_b + 0.0) / 3
    assert supervised_contrastive(features, labels).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_lone_anchors_value_and_gradient_match_the_published_formula(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(9, 6, generator=generator, dtype=torch.float64) * 2
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 4, 2])  # anchors 6 and 7 have no positive
    ours_in = features.clone().float().requires_grad_(True)
    theirs_in = features.clone().requires_grad_(True)
    ours = supervised_contrastive(ours_in, labels)
    theirs = published_formula(theirs_in, labels)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert ours.item() == pytest.approx(definition(features, labels), rel=1e-5)
    assert ours_in.grad is not None and theirs_in.grad is not None
    torch.testing.assert_close(ours_in.grad.double(), theirs_in.grad, rtol=1e-4, atol=1e-6)
    # the lone anchors still receive gradient: they are negatives of every other anchor
    assert ours_in.grad[6].abs().sum() > 0 and ours_in.grad[7].abs().sum() > 0


def test_lone_anchors_count_in_the_mean():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(6, 4, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # 4 of 6 anchors have a positive
    full = supervised_contrastive(features, labels).item()
    assert full == pytest.approx(published_formula(features.double(), labels).item(), rel=1e-5)
    # the mean over the 4 anchors with a positive only is 6/4 times larger: not what the references do
    only_paired = definition(features, labels, lone_anchors_count=False)
    assert full == pytest.approx(only_paired * 4 / 6, rel=1e-5)
    assert full != pytest.approx(only_paired, rel=1e-2)
    # every anchor alone: the loss is 0 with zero gradient, not NaN
    lonely = torch.randn(4, 8, requires_grad=True)
    loss = supervised_contrastive(lonely, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert lonely.grad is not None and torch.all(lonely.grad == 0)


def test_no_data_dependent_shapes_or_host_reads():
    # vmap refuses boolean-mask indexing, nonzero() and .item(): the loss must run under it
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 5, 4, generator=generator)
    labels = torch.tensor([[0, 0, 1, 2, 1], [0, 1, 2, 3, 4], [1, 1, 1, 1, 1]])
    batched = torch.vmap(supervised_contrastive)(features, labels)
    one_by_one = torch.stack([supervised_contrastive(f, y) for f, y in zip(features, labels)])
    torch.testing.assert_close(batched, one_by_one)
    assert batched[1].item() == 0.0  # no anchor has a positive


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_definition_on_random_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(7, 5, generator=generator) * 3  # not unit length: the loss normalises
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # anchors with 2, 1 and no positives
    assert supervised_contrastive(features, labels).item() == pytest.approx(definition(features, labels), rel=1e-4)


def test_scale_invariance_and_head_loss_dispatch():
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert supervised_contrastive(features * 5, labels).item() == pytest.approx(
        supervised_contrastive(features, labels).item(), rel=1e-5)
    assert head_loss("contrast", features, labels).item() == supervised_contrastive(features, labels).item()
    logits = torch.randn(6, 3)
    assert head_loss("softmax", logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


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
