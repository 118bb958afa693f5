"""pipeline.model.networks.vit: the small-image ViT as a flat, seedable block list."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from pipeline.data.specs import SPECS
from pipeline.errors import BadInput
from pipeline.model.networks.registry import family_named
from pipeline.model.networks.vit import PatchEmbedding, SelfAttention, TransformerBlock, ViT, ViTFamily


def vit(arch: str = "vit_tiny", dataset: str = "cifar10", **changes: int) -> ViT:
    family = ViTFamily()
    return family.net(family.resolve(arch, lambda: SPECS[dataset]), dataclasses.replace(SPECS[dataset], **changes))


def test_the_family_is_registered_and_resolves_to_flat_cuts():
    assert isinstance(family_named("vit"), ViTFamily)
    assert ViTFamily().names() == ("vit_tiny", "vit_small")
    spec = ViTFamily().resolve("vit_small", lambda: SPECS["cifar10"])
    assert (spec.name, spec.family, spec.units, spec.blocks) == ("vit_small", "vit", 13, None)
    with pytest.raises(BadInput, match=r"model.arch = 'vit_huge' is not a ViT; allowed: vit_tiny, vit_small"):
        ViTFamily().resolve("vit_huge", lambda: SPECS["cifar10"])


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_every_block_shape_agrees_with_a_real_forward(dataset):
    net = vit(dataset=dataset)
    channels = SPECS[dataset].channels
    assert len(net) == 13 and net.shape(-1) == (channels, 32, 32)
    torch.manual_seed(0)
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        for index in range(len(net)):
            x = net.build(index)(x)
            assert net.shape(index) == (64, 192) == tuple(x.shape[1:])
        assert net.classifier(10)(x).shape == (2, 10)


def test_vit_small_width_and_non_square_images():
    net = vit("vit_small", image_width=48)
    assert net.shape(0) == net.shape(12) == (8 * 12, 384)


def test_parameter_count_of_vit_tiny():
    # Counted by hand for 3x32x32 images and 10 classes, D = 192, N = 64:
    # patch conv 3*16*D + D, positions N*D; each block 2 LayerNorms (4D), qkv (3D^2 + 3D), projection
    # (D^2 + D), MLP (4D^2 + 4D + 4D^2 + D): 12D^2 + 13D; classifier LayerNorm 2D + linear 10D + 10.
    d = 192
    expected = (48 * d + d) + 64 * d + 12 * (12 * d * d + 13 * d) + (2 * d + 10 * d + 10)
    assert expected == 5_362_378
    net = vit()
    modules = [net.build(index) for index in range(len(net))] + [net.classifier(10)]
    assert sum(p.numel() for m in modules for p in m.parameters()) == expected


def test_a_block_built_twice_from_one_seed_is_the_same_and_another_seed_differs():
    net = vit()
    for index in (0, 1):
        states = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            states.append(net.build(index).state_dict())
        assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
        assert not torch.equal(states[0]["position" if index == 0 else "mlp.0.weight"],
                               states[2]["position" if index == 0 else "mlp.0.weight"])


def test_initialisation_is_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    block = TransformerBlock(192, 3)
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4
    for linear in linears:
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert not linear.bias.any()
    norm = block.norm1
    assert torch.equal(norm.weight, torch.ones(192)) and not norm.bias.any()
    embedding = PatchEmbedding(3, 192, 64)
    assert embedding.position.std().item() == pytest.approx(0.02, rel=0.05)


def test_attention_is_softmax_of_scaled_dot_products_per_head():
    torch.manual_seed(0)
    attention = SelfAttention(12, 3)
    tokens = torch.randn(2, 5, 12)
    q, k, v = attention.qkv(tokens).split(12, dim=-1)
    heads = [slice(4 * h, 4 * h + 4) for h in range(3)]
    mixed = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(4), dim=-1) @ v[..., s]
                       for s in heads], dim=-1)
    torch.testing.assert_close(attention(tokens), attention.project(mixed))


def test_forward_and_backward_are_deterministic_on_cpu():
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        block = TransformerBlock(24, 3)
        tokens = torch.randn(2, 16, 24, requires_grad=True)
        block(tokens).square().sum().backward()
        grads.append([tokens.grad, *(p.grad for p in block.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_image_sides_not_divisible_by_the_patch_are_one_line_bad_input():
    with pytest.raises(BadInput, match=r"^model.arch = 'vit_tiny' cuts images into 4x4 patches, but these images are "
                                       r"32x30: set data.image_size to a multiple of 4") as err:
        vit(image_width=30)
    assert "\n" not in str(err.value)



def test_local_aux_is_said_to_have_no_effect_on_a_vit() -> None:
    from pipeline.config.loading import load_config
    from pipeline.config.validation import ineffective_keys

    config = load_config(None, ["model.arch=vit_tiny", "local.modules=2", "local.aux=0c1f"])
    assert ineffective_keys(config) == ["local.aux has no effect with a ViT (a token feature's head is LayerNorm, "
                                        "mean pool and two linear layers)"]


def test_model_pretrained_is_refused_for_a_vit() -> None:
    from pipeline.config.loading import load_config
    from pipeline.errors import BadInput

    with pytest.raises(BadInput, match="model.pretrained loads ImageNet ResNets, not the vit-family vit_tiny"):
        load_config(None, ["model.arch=vit_tiny", "model.pretrained=/no/such/file.pth"])
