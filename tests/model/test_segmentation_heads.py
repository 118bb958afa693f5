"""pipeline.model.segmentation_heads: MMSegmentation's ASPP and FCN heads, InfoPro's segmentation head,
and the decoder the segmentation family uses."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.specs import DatasetSpec
from pipeline.model.decoder import ImageNetDecoder
from pipeline.model.networks.registry import family_named
from pipeline.model.segmentation_heads import (
    AUX_WEIGHT,
    ASPPHead,
    FCNHead,
    SeededDropout2d,
    build_infopro_segmentation_head,
    reset_classifier,
)

SPEC = DatasetSpec("seg", 3, 5, 64, (0.5,) * 3, (0.25,) * 3, 0, "constant", True, "", "")


def convs(module: nn.Module) -> list[tuple[int, int, int, int, int, bool]]:
    """(in, out, kernel, dilation, padding, has bias) of every conv, in construction order."""
    return [(c.in_channels, c.out_channels, c.kernel_size[0], c.dilation[0], c.padding[0], c.bias is not None)
            for c in module.modules() if isinstance(c, nn.Conv2d)]


def test_aspp_head_is_mmsegmentations():
    head = ASPPHead(64, 5).eval()
    assert convs(head) == [
        (64, 512, 1, 1, 0, False),  # image pooling
        (64, 512, 1, 1, 0, False), (64, 512, 3, 12, 12, False), (64, 512, 3, 24, 24, False),
        (64, 512, 3, 36, 36, False),
        (5 * 512, 512, 3, 1, 1, False),  # bottleneck over the five branches
        (512, 5, 1, 1, 0, True),
    ]
    assert isinstance(head.image_pool[0], nn.AdaptiveAvgPool2d)
    assert isinstance(head.dropout, SeededDropout2d) and head.dropout.p == 0.1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in head.modules()) == 6
    with torch.no_grad():
        assert head(torch.randn(2, 64, 8, 16)).shape == (2, 5, 8, 16)


def test_aspp_pooling_branch_comes_first_and_is_spread_over_the_feature():
    head = ASPPHead(8, 3).eval()
    features = torch.randn(2, 8, 4, 6)
    seen = {}
    head.bottleneck.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0]))
    with torch.no_grad():
        head(features)
        pooled = head.image_pool(features)
        assert torch.allclose(seen["x"][:, :512], pooled.expand(-1, -1, 4, 6))
        assert torch.allclose(seen["x"][:, 512:1024], head.branches[0](features))


def test_fcn_head_is_mmsegmentations():
    head = FCNHead(1024, 19).eval()
    assert convs(head) == [(1024, 256, 3, 1, 1, False), (256, 19, 1, 1, 0, True)]
    assert isinstance(head.dropout, SeededDropout2d) and head.dropout.p == 0.1
    assert AUX_WEIGHT == 0.4
    with torch.no_grad():
        assert head(torch.randn(2, 1024, 4, 8)).shape == (2, 19, 4, 8)


def test_classifier_init_is_mmsegmentations():
    conv = nn.Conv2d(512, 19, 1)
    reset_classifier(conv)
    assert torch.all(conv.bias == 0)
    assert abs(conv.weight.std().item() - 0.01) < 0.001


def test_infopro_head_is_theirs():
    head = build_infopro_segmentation_head(1024, 19)
    assert convs(head) == [(1024, 512, 3, 1, 1, True), (512, 19, 1, 1, 0, True)]
    assert [type(layer) for layer in head] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, SeededDropout2d, nn.Conv2d]
    assert head[3].p == 0.1
    from pipeline.config.schema import LocalConfig

    assert convs(family_named("segmentation").parts().aux_head((1024, 8, 8), 19, LocalConfig())) == convs(head)


def test_the_segmentation_decoder_rebuilds_the_crop_at_its_size():
    decoder = family_named("segmentation").parts().decoder((1024, 8, 8), SPEC, 1)
    assert type(decoder) is ImageNetDecoder  # InfoPro's segmentation decoder is the ImageNet one, layer for layer
    assert convs(decoder) == [(1024, 128, 1, 1, 0, True), (128, 32, 3, 1, 1, True), (32, 12, 3, 1, 1, True),
                              (12, 3, 3, 1, 1, True)]
    sizes = []
    for step in decoder.steps:
        step.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(inputs[0].shape[-2:])))
    with torch.no_grad():
        assert decoder.eval()(torch.randn(2, 1024, 8, 16), (64, 128)).shape == (2, 3, 64, 128)
        assert sizes == [(16, 32), (32, 64), (64, 128)]  # x2, x2, x2 from the stride-8 feature
        assert decoder(torch.randn(2, 1024, 8, 13), (60, 100)).shape == (2, 3, 60, 100)  # ends at the crop's size


def test_seeded_dropout_drops_whole_channels_like_dropout2d_from_its_own_seed() -> None:
    layer = SeededDropout2d(0.5).train()
    features = torch.ones(4, 64, 3, 5)
    layer.seed = 7
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    out = layer(features)
    assert torch.equal(torch.random.get_rng_state(), state)  # the process's stream is not touched
    per_channel = out[:, :, 0, 0]
    assert torch.equal(out, per_channel[:, :, None, None].expand_as(out))  # a channel is kept or dropped whole
    assert set(per_channel.unique().tolist()) == {0.0, 2.0}  # kept channels scaled by 1 / (1 - p)
    assert torch.equal(layer(features), out)  # the same seed, the same mask
    layer.seed = 8
    assert not torch.equal(layer(features), out)
    assert torch.equal(layer.eval()(features), features)
