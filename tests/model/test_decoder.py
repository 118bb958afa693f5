"""pipeline.model.decoder: the reconstruction loss against the published sigmoid-then-BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.model.decoder import Decoder, reconstruction_loss


def published_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The published form: a Sigmoid layer, then BCELoss on the (un-clamped) target."""
    return F.binary_cross_entropy(torch.sigmoid(logits), target)


def written_out(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same in the normal range, by hand: mean of -(t log p + (1 - t) log(1 - p)), p = 1/(1 + e^-z)."""
    p = 1.0 / (1.0 + torch.exp(-logits))
    return -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()


def test_equals_the_published_form_in_the_normal_range():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64) * 3)
    target = torch.rand(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    ours_in = logits.clone().requires_grad_(True)
    theirs_in = logits.clone().requires_grad_(True)
    ours = reconstruction_loss(ours_in, target)
    theirs = published_loss(theirs_in, target)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ours.double(), written_out(logits, target), rtol=1e-6, atol=1e-7)


def test_saturated_logits_keep_their_gradient_here_but_not_in_the_published_form():
    # float32 sigmoid rounds to exactly 1 above ~17: the published form's gradient vanishes there
    logits = torch.tensor([30.0], requires_grad=True)
    published_in = torch.tensor([30.0], requires_grad=True)
    target = torch.tensor([0.25])
    reconstruction_loss(logits, target).backward()
    published_loss(published_in, target).backward()
    assert logits.grad is not None and published_in.grad is not None
    assert torch.allclose(logits.grad, torch.tensor([0.75]))  # sigmoid(z) - t
    assert published_in.grad.item() == 0.0
    # the published value there is BCE's log clamp (-100), not the true loss 0.75 * 30 + log1p(e^-30)
    assert abs(published_loss(published_in.detach(), target).item() - 75.0) < 1e-4


def test_target_is_the_de_normalised_image_clamped_to_unit_range():
    decoder = Decoder(16, 3, 8, 1, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, 0, 0] = 1.0  # 0.5 + 0.2 = 0.7: in range, unchanged
    image[0, 1, 0, 0] = 4.0  # 0.4 + 1.0 = 1.4: clamped to 1
    image[0, 2, 0, 0] = -2.0  # 0.3 - 1.0 = -0.7: clamped to 0
    target = decoder.target(image)
    assert abs(target[0, 0, 0, 0].item() - 0.7) < 1e-6
    assert target[0, 1, 0, 0].item() == 1.0 and target[0, 2, 0, 0].item() == 0.0
    assert abs(target[0, 2, 1, 1].item() - 0.3) < 1e-6  # a zero (mean) pixel maps back to the mean
