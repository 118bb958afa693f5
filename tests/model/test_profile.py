"""pipeline.model.profile: activation bytes are what autograd saves beyond the module's own weights."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.specs import dataset_spec
from pipeline.model.profile import module_activation_bytes, saved_activation_bytes


def test_weights_saved_for_backward_are_not_activations():
    """Conv and linear keep their weights for backward; only the inputs they saved count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(64 * 4 * 4, 1000))
    x = torch.randn(2, 64, 4, 4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    size, output = saved_activation_bytes(model, x)
    # the conv saves its input x, the linear its flattened input (a view of the conv's output)
    assert size == x.numel() * 4 + 2 * 64 * 4 * 4 * 4
    assert weights > 10 * size  # counting the weights would have dwarfed the activations
    assert output.shape == (2, 1000)


def test_batch_norm_buffers_are_not_activations():
    bn = nn.BatchNorm2d(8).train()
    x = torch.randn(2, 8, 3, 3)
    size, _ = saved_activation_bytes(bn, x)
    # its input, plus the batch mean and inverse std it computed (8 floats each); not its weight,
    # bias or running statistics
    assert size == x.numel() * 4 + 2 * 8 * 4


def test_imagenet_modules_are_profiled(make_config):
    config = make_config("model.family=imagenet", "model.arch=resnet18", "local.modules=2", "local.reconstruct=true")
    e2e = make_config("model.family=imagenet", "model.arch=resnet18")
    spec = dataset_spec(config)
    local = module_activation_bytes(config, spec, [3], batch=2)
    whole = module_activation_bytes(e2e, spec, [], batch=2)
    assert len(local) == 2 and len(whole) == 1
    assert local[0] > 0 and 0 < local[1] < whole[0]  # the last module runs a part of the same blocks
