"""pipeline.model.losses: supervised contrastive loss (one view, temperature 0.07) and CE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.losses import CONTRAST_TEMPERATURE, head_loss, supervised_contrastive


def reference(features, labels, temperature=0.07):
    """SupCon by its definition, anchor by anchor, in float64 Python."""
    rows = [[float(v) for v in row] for row in features]
    rows = [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in rows]
    labels = [int(v) for v in labels]
    losses = []
    for i, anchor in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i]
        positives = [j for j in others if labels[j] == labels[i]]
        if not positives:
            continue
        sims = {j: sum(a * b for a, b in zip(anchor, rows[j])) / temperature for j in others}
        log_norm = math.log(sum(math.exp(s) for s in sims.values()))
        losses.append(-sum(sims[p] - log_norm for p in positives) / len(positives))
    return sum(losses) / len(losses)


def test_temperature_is_the_published_one():
    assert CONTRAST_TEMPERATURE == 0.07


def test_hand_computed_three_samples():
    # unit vectors: a=(1,0), b=(0.6,0.8), c=(0,1); a and b share label 0, c is alone
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.07
    anchor_a = -(0.6 / t - math.log(math.exp(0.6 / t) + math.exp(0.0 / t)))
    anchor_b = -(0.6 / t - math.log(math.exp(0.6 / t) + math.exp(0.8 / t)))
    # c has no positive: it is left out of the mean (but is still a negative for a and b)
    expected = (anchor_a + anchor_b) / 2
    assert supervised_contrastive(features, labels).item() == pytest.approx(expected, rel=1e-5)


def test_anchors_without_positives_are_ignored():
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # c relabelled to share a's label: now three anchors count, and the value changes
    with_all = supervised_contrastive(features, torch.tensor([0, 0, 0])).item()
    only_two = supervised_contrastive(features, torch.tensor([0, 0, 1])).item()
    assert with_all != pytest.approx(only_two)
    # every anchor alone: no term at all -> 0, and backward still works
    lonely = torch.randn(4, 8, requires_grad=True)
    loss = supervised_contrastive(lonely, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == 0.0
    loss.backward()
    assert lonely.grad is not None and torch.all(lonely.grad == 0)


@pytest.mark.parametrize("seed", range(3))
def test_matches_the_definition_on_random_batches(seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(7, 5, generator=generator) * 3  # not unit length: the loss normalises
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # anchors with 2, 1 and no positives
    assert supervised_contrastive(features, labels).item() == pytest.approx(reference(features, labels), rel=1e-4)


def test_scale_invariance_and_head_loss_dispatch():
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert supervised_contrastive(features * 5, labels).item() == pytest.approx(
        supervised_contrastive(features, labels).item(), rel=1e-5)
    assert head_loss("contrast", features, labels).item() == supervised_contrastive(features, labels).item()
    logits = torch.randn(6, 3)
    assert head_loss("softmax", logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())
