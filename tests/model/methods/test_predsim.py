"""pipeline.model.methods.predsim: PredSim's loss (Nøkland & Eidnes 2019) against the formula written out in
plain Python, its gradients, its limits (beta = 0, label-aligned features) and fp32 under autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.schema import LocalConfig
from pipeline.model.methods.predsim import BETA, predsim_loss
from pipeline.model.methods.registry import method_named
from pipeline.runtime.packet import Packet


def flatten(nested: object) -> list[float]:
    return [v for item in nested for v in flatten(item)] if isinstance(nested, list) else [float(nested)]


def sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def feature_rows(features: torch.Tensor) -> list[list[float]]:
    """One row per sample: a map of more than 3 channels and more than one row becomes each channel's
    standard deviation over its pixels; anything else is flattened."""
    samples = features.tolist()
    if features.dim() == 4 and features.shape[1] > 3 and features.shape[2] > 1:
        return [[sample_std(flatten(channel)) for channel in sample] for sample in samples]
    return [flatten(sample) for sample in samples]


def similarity(rows: list[list[float]]) -> list[list[float]]:
    """Rows centred, divided by their norm + 1e-8, then every pair's dot product clamped to [-1, 1]."""
    units = []
    for row in rows:
        mean = sum(row) / len(row)
        centred = [v - mean for v in row]
        norm = math.sqrt(sum(v * v for v in centred))
        units.append([v / (norm + 1e-8) for v in centred])
    return [[max(-1.0, min(1.0, sum(a * b for a, b in zip(u, v)))) for v in units] for u in units]


def expected(features: torch.Tensor, logits: torch.Tensor, labels: list[int], beta: float = 0.99) -> float:
    """(1 - beta) * cross-entropy + beta * mean squared difference of the two similarity matrices."""
    classes = logits.shape[1]
    batch = len(labels)
    onehot = [[1.0 if c == label else 0.0 for c in range(classes)] for label in labels]
    s_h, s_y = similarity(feature_rows(features)), similarity(onehot)
    sim = sum((s_h[i][j] - s_y[i][j]) ** 2 for i in range(batch) for j in range(batch)) / batch**2
    pred = 0.0
    for row, label in zip(logits.tolist(), labels):
        pred += math.log(sum(math.exp(v) for v in row)) - row[label]
    pred /= batch
    return (1 - beta) * pred + beta * sim


# A hand-made batch: 3 samples, maps of 4 channels, 2 x 2 pixels, 3 classes (samples 0 and 2 share a class).
MAPS = torch.tensor([
    [[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 1.0]], [[2.0, -2.0], [2.0, -2.0]], [[5.0, 5.0], [5.0, 5.5]]],
    [[[0.0, 1.0], [0.0, 1.0]], [[3.0, 1.0], [2.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[-1.0, 2.0], [0.5, 0.0]]],
    [[[2.0, 4.0], [6.0, 8.0]], [[0.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [1.0, -1.0]], [[4.0, 4.0], [4.5, 4.0]]],
])
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.5, -0.5, 0.25]])
LABELS = [0, 1, 0]


def test_the_method_is_registered_with_class_scores_from_its_head():
    method = method_named("predsim")
    assert method.summary_name == "predsim" and method.standalone and method.identity_keys == ()
    assert method.head_width(10, LocalConfig(aux_feature_dim=40)) == 10
    assert BETA == 0.99


def test_hand_made_maps_against_the_formula_step_by_step():
    got = predsim_loss(MAPS, LOGITS, torch.tensor(LABELS))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected(MAPS, LOGITS, LABELS), rel=1e-5)
    # the method's loss is this, the module's output first and the head's second
    assert method_named("predsim").loss(MAPS, LOGITS, torch.tensor(LABELS)).item() == got.item()


def test_two_vectors_by_hand():
    # centred rows (1/2, -1/2) and (-1/2, 1/2): similarity -1 between them; labels that agree: +1
    features, logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 2)
    assert predsim_loss(features, logits, torch.tensor([0, 1])).item() == pytest.approx(0.01 * math.log(2), rel=1e-5)
    # the two off-diagonal entries are 2 apart: (0 + 4 + 4 + 0) / 4
    same = predsim_loss(features, logits, torch.tensor([0, 0])).item()
    assert same == pytest.approx(0.01 * math.log(2) + 0.99 * 2.0, rel=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (4, 5, 1, 6), (4, 6, 3, 2), (4, 5, 3), (4, 7)],
                         ids=["3-channel map", "one-row map", "map", "tokens", "vectors"])
@pytest.mark.parametrize("beta", [0.99, 0.5])
def test_every_feature_rank_against_the_formula(shape, beta):
    generator = torch.Generator().manual_seed(sum(shape))
    features = torch.randn(*shape, generator=generator)
    logits = torch.randn(4, 5, generator=generator)
    labels = [3, 0, 3, 1]
    got = predsim_loss(features, logits, torch.tensor(labels), beta=beta).item()
    assert got == pytest.approx(expected(features, logits, labels, beta), rel=1e-5)


def test_beta_zero_is_the_cross_entropy():
    labels = torch.tensor(LABELS)
    assert predsim_loss(MAPS, LOGITS, labels, beta=0.0).item() == pytest.approx(
        F.cross_entropy(LOGITS, labels).item(), rel=1e-7)


def test_features_aligned_with_the_labels_have_no_similarity_loss():
    labels = torch.tensor([0, 2, 1, 2, 3])
    onehot = F.one_hot(labels, 4).float()
    logits = torch.randn(5, 4)
    ce = F.cross_entropy(logits, labels).item()
    vectors = 3.0 * onehot + 2.0  # scale and shift leave the centred, normalised rows alone
    assert predsim_loss(vectors, logits, labels).item() == pytest.approx(0.01 * ce, abs=1e-7)
    # a map whose channels vary over the pixels exactly where the label is: its per-channel spreads are aligned
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    maps = onehot[:, :, None, None] * checker + torch.arange(4.0)[None, :, None, None]
    assert predsim_loss(maps, logits, labels).item() == pytest.approx(0.01 * ce, abs=1e-7)
    # while features unrelated to the labels are scored
    assert predsim_loss(torch.randn(5, 4), logits, labels).item() > 0.01 * ce + 0.05


def test_the_gradient_reaches_the_features_and_the_head():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, 8, 4, 4, generator=generator).requires_grad_(True)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    predsim_loss(features, head(features), labels).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    # the similarity term alone (beta = 1) trains the features, not the head
    features.grad = None
    head.zero_grad(set_to_none=True)
    predsim_loss(features, head(features), labels, beta=1.0).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in head.parameters())


def test_a_dead_channel_or_a_constant_sample_gives_a_finite_gradient():
    features = torch.randn(4, 5, 3, 3)
    features[:, 2] = 0.0  # a channel ReLU switched off: its standard deviation is 0
    features[1] = 7.0  # a sample whose every channel is flat: its row is constant
    features.requires_grad_(True)
    loss = predsim_loss(features, torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and features.grad is not None and torch.all(torch.isfinite(features.grad))


def test_fp32_under_bf16_autocast_and_for_bf16_inputs():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(8, 6, 4, 4, generator=generator)
    logits = torch.randn(8, 5, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    plain = predsim_loss(features, logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = predsim_loss(features, logits, labels)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(plain.item(), rel=1e-6)
    assert predsim_loss(features.to(torch.bfloat16), logits.to(torch.bfloat16), labels).dtype == torch.float32


def test_no_data_dependent_shapes_or_host_reads():
    # vmap refuses boolean-mask indexing, nonzero() and .item(): the loss must run under it
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 5, 4, 2, 2, generator=generator)
    logits = torch.randn(3, 5, 3, generator=generator)
    labels = torch.tensor([[0, 0, 1, 2, 1], [0, 1, 2, 1, 0], [1, 1, 1, 1, 1]])
    batched = torch.vmap(predsim_loss)(features, logits, labels)
    one_by_one = torch.stack([predsim_loss(f, z, y) for f, z, y in zip(features, logits, labels)])
    torch.testing.assert_close(batched, one_by_one)


def test_a_local_module_trains_on_predsim_of_its_output_and_head(make_config, build_modules, image_batch):
    config = make_config("model.arch=resnet8", "local.modules=2", "local.loss=predsim")
    spec, _, _, (first, _) = build_modules(config)
    images, labels = image_batch(spec, batch=4)
    first.eval()
    with torch.no_grad():
        _, output, loss = first(Packet.from_batch(images, labels))
        logits = first.head(output)
        assert logits.shape == (4, spec.classes)
        assert loss.item() == pytest.approx(predsim_loss(output, logits, labels).item(), rel=1e-6)
        assert loss.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)
