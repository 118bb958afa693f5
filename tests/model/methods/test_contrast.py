"""pipeline.model.methods.contrast: supervised contrastive loss (one view, temperature 0.07)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config.schema import LocalConfig
from pipeline.model.methods.contrast import CONTRAST_TEMPERATURE, supervised_contrastive
from pipeline.model.methods.registry import method_named


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


def test_scale_invariance_and_the_method_scores_the_heads_output():
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert supervised_contrastive(features * 5, labels).item() == pytest.approx(
        supervised_contrastive(features, labels).item(), rel=1e-5)
    method = method_named("contrast")
    output = torch.randn(6, 8, 2, 2)  # the module's output: contrast reads the head's alone
    assert method.loss(output, features, labels).item() == supervised_contrastive(features, labels).item()
    assert method.head_width(10, LocalConfig(aux_feature_dim=40)) == 40
    assert method.identity_keys == ("aux_feature_dim",)
