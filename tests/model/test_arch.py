"""pipeline.model.arch: which network model.arch and model.family name, and every error about it."""

from __future__ import annotations

import pytest

from pipeline.config.cuts import flat_to_cut
from pipeline.config.loading import load_config
from pipeline.config.validation import ineffective_keys
from pipeline.errors import BadInput
from pipeline.model.arch import IMAGENET_ARCHS, SEGMENTATION_ARCHS, aux_block, resolve_arch

# torchvision's layouts (its resnet.py builders), written out independently of the code's table:
# (block, blocks per stage, groups, width per group).
TORCHVISION = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
}


def error(family, arch) -> str:
    with pytest.raises(BadInput) as info:
        resolve_arch(family, arch)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


@pytest.mark.parametrize("arch", sorted(TORCHVISION))
def test_imagenet_layouts_are_torchvisions(arch):
    spec = resolve_arch("imagenet", arch)
    block, blocks, groups, width_per_group = TORCHVISION[arch]
    assert (spec.family, spec.block, spec.blocks, spec.groups, spec.width_per_group) == (
        "imagenet", block, blocks, groups, width_per_group)
    expansion = 4 if block == "bottleneck" else 1
    assert spec.widths == (64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
    assert spec.stem_width == 64 and spec.units == 1 + sum(blocks)
    assert set(IMAGENET_ARCHS) == set(TORCHVISION)


@pytest.mark.parametrize("arch, n", [("resnet8", 1), ("resnet32", 5), ("resnet110", 18), ("resnet50", 8),
                                      ("resnet152", 25), ("resnet1202", 200)])
def test_cifar_depths(arch, n):
    spec = resolve_arch("cifar", arch)
    assert (spec.family, spec.block, spec.blocks, spec.widths) == ("cifar", "basic", (n, n, n), (16, 32, 64))
    assert spec.stem_width == 16 and spec.units == 1 + 3 * n


def test_default_family_follows_the_dataset():
    folder = load_config(None, ["data.name=image_folder", "model.arch=resnet18", "model.classes=5"])
    assert folder.arch.family == "imagenet"
    for name in ("fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "synthetic"):
        assert load_config(None, [f"data.name={name}"]).arch.family == "cifar"


@pytest.mark.parametrize("arch", ["resnet50", "resnet152"])
def test_a_name_in_both_families_is_decided_by_the_family(arch):
    cifar = load_config(None, ["data.name=cifar10", f"model.arch={arch}"]).arch
    assert cifar.family == "cifar" and len(cifar.blocks) == 3
    forced = load_config(None, ["data.name=cifar10", f"model.arch={arch}", "model.family=imagenet"]).arch
    assert forced.family == "imagenet" and forced.blocks == TORCHVISION[arch][1]
    folder = load_config(None, ["data.name=image_folder", f"model.arch={arch}"]).arch
    assert folder == forced
    back = load_config(None, ["data.name=image_folder", f"model.arch={arch}", "model.family=cifar"]).arch
    assert back == cifar


def test_a_name_in_neither_family_is_one_clear_error():
    for family in ("cifar", "imagenet"):
        message = error(family, "resnet51")
        assert "'resnet51'" in message and "resnet101" in message
    assert "resnet<6n+2>" in error("cifar", "resnet51")


def test_the_error_points_to_the_other_family():
    assert "model.family = 'imagenet'" in error("cifar", "resnext50_32x4d")
    assert "model.family = 'imagenet'" in error("cifar", "resnet101")
    assert "model.family = 'cifar'" in error("imagenet", "resnet32")
    assert "set model.family" not in error("imagenet", "vgg16")


def test_config_errors_name_the_key():
    with pytest.raises(BadInput, match=r"model.arch = 'resnet51' is not a CIFAR ResNet"):
        load_config(None, ["model.arch=resnet51"])
    with pytest.raises(BadInput, match=r"model.arch = 'resnet32' is not an ImageNet ResNet"):
        load_config(None, ["data.name=image_folder", "model.arch=resnet32"])
    with pytest.raises(BadInput, match=r"model.family = 'resnet' is not a registered network family; allowed: auto, "):
        load_config(None, ["model.family=resnet"])


def test_module_count_and_cuts_follow_the_per_stage_counts():
    imagenet = ["data.name=image_folder", "model.arch=resnet101"]
    assert load_config(None, [*imagenet, "local.modules=34"]).local.modules == 34  # stem + 33 blocks
    with pytest.raises(BadInput, match="resnet101 has 34 blocks"):
        load_config(None, [*imagenet, "local.modules=35"])
    assert load_config(None, [*imagenet, "local.modules=2", "local.partition=[[3, 22]]"]).local.partition == [[3, 22]]
    stages = r"\[1, 0..2\], \[2, 0..3\], \[3, 0..22\], \[4, 0..2\]"
    with pytest.raises(BadInput, match=r"\[4, 3\] is out of range.*" + stages):
        load_config(None, [*imagenet, "local.modules=2", "local.partition=[[4, 3]]"])
    with pytest.raises(BadInput, match=r"\[4, 2\] leaves the last module empty; cut before \[4, 2\]"):
        load_config(None, [*imagenet, "local.modules=2", "local.partition=[[4, 2]]"])
    with pytest.raises(BadInput, match=r"\[3, 5\] is out of range"):  # CIFAR resnet32 has 5 blocks per stage
        load_config(None, ["local.modules=2", "local.partition=[[3, 5]]"])


def test_the_imagenet_head_makes_the_cifar_head_keys_ineffective():
    imagenet = load_config(None, ["data.name=image_folder", "model.arch=resnet50", "local.modules=2",
                                  "local.aux=2c2f", "local.aux_hidden=64"])
    assert [note.split(" ")[0] for note in ineffective_keys(imagenet)] == ["local.aux", "local.aux_hidden"]
    cifar = load_config(None, ["local.modules=2", "local.aux=2c2f", "local.aux_hidden=64"])
    assert ineffective_keys(cifar) == []


# ---- segmentation (DeepLab-V3) ----------------------------------------------------------------

def seg_error(seg_config, *overrides: str) -> str:
    with pytest.raises(BadInput) as info:
        seg_config(*overrides)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    return message


@pytest.mark.parametrize("arch, blocks", [("deeplabv3_resnet50", (3, 4, 6, 3)), ("deeplabv3_resnet101", (3, 4, 23, 3))])
def test_segmentation_layouts(arch, blocks):
    spec = resolve_arch("segmentation", arch)
    assert (spec.family, spec.block, spec.blocks, spec.groups, spec.width_per_group) == (
        "segmentation", "bottleneck", blocks, 1, 64)
    assert spec.widths == (256, 512, 1024, 2048) and spec.stem_width == 64
    assert aux_block(spec) == sum(blocks[:3])  # layer3's last block, flat
    assert flat_to_cut(aux_block(spec), blocks) == [3, blocks[2] - 1]


def test_segmentation_datasets_default_to_the_segmentation_family():
    for name in ("cityscapes", "segmentation_folder"):
        config = load_config(None, [f"data.name={name}", "model.arch=deeplabv3_resnet50", "model.classes=19"])
        assert config.arch.family == "segmentation"
    assert SEGMENTATION_ARCHS == ("deeplabv3_resnet50", "deeplabv3_resnet101")


def test_segmentation_names_and_families_point_at_each_other():
    assert "deeplabv3_resnet50, deeplabv3_resnet101" in error("segmentation", "resnet101")
    for family in ("cifar", "imagenet"):
        assert "set model.family = 'segmentation'" in error(family, "deeplabv3_resnet101")


def test_infopros_cut_and_the_fcn_rule(seg_config_builder):
    seg_config = seg_config_builder
    assert seg_config("local.modules=2", "local.partition=[[3, 21]]").local.partition == [[3, 21]]
    message = seg_error(seg_config, "local.modules=2", "local.partition=[[3, 22]]")
    assert "cut [3, 22] is at or after layer3's last block [3, 22]" in message
    assert "FCN auxiliary head reads layer3's output" in message and "cut before it" in message
    assert "[4, 0] is at or after" in seg_error(seg_config, "local.modules=2", "local.partition=[[4, 0]]")
    # equal cuts: the even split of many modules reaches past layer3
    assert seg_config("local.modules=8").local.modules == 8
    message = seg_error(seg_config, "local.modules=20")
    assert "at or after layer3's last block [3, 22]" in message and "use fewer modules than 20" in message


@pytest.mark.parametrize("override, words", [
    ("local.context=E", "local.context = 'E' is not supported with model.family = 'segmentation'"),
    ("local.context=R1", "use local.context = 'R0'"),
    ("local.loss=contrast", "segmentation labels are per-pixel maps; use local.loss = 'softmax'"),
    ("local.partition=balanced", "local.partition = 'balanced' is not supported"),
])
def test_segmentation_refuses_what_it_cannot_train(override, words, seg_config_builder):
    assert words in seg_error(seg_config_builder, "local.modules=2", override)


def test_end_to_end_segmentation_and_the_deep_stem_key(seg_config_builder):
    seg_config = seg_config_builder
    assert seg_config("model.deep_stem=true").model.deep_stem
    assert ineffective_keys(seg_config("model.deep_stem=true")) == []
    cifar = load_config(None, ["model.deep_stem=true"])
    assert [note.split(" ")[0] for note in ineffective_keys(cifar)] == ["model.deep_stem"]
    heads = seg_config("local.modules=2", "local.aux=2c2f", "local.aux_hidden=64", "local.aux_widen=2")
    assert [note.split(" ")[0] for note in ineffective_keys(heads)] == [
        "local.aux", "local.aux_hidden", "local.aux_widen"]


def test_segmentation_family_and_label_maps_go_together(seg_config_builder):
    with pytest.raises(BadInput, match=r"model.family = 'segmentation' needs per-pixel labels, but data.name = "
                                       r"'cifar10' has one label per image; use data.name = 'cityscapes' or "
                                       r"'segmentation_folder'"):
        load_config(None, ["data.name=cifar10", "model.family=segmentation", "model.arch=deeplabv3_resnet50"])
    assert seg_config_builder().arch.family == "segmentation"  # auto
