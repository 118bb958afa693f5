"""The network registry: one file adds a family; the shipped ResNet configs build what they built before it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import CPU, tiny_config
from torch import nn

from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.errors import BadInput
from pipeline.model import network
from pipeline.model.network import build_module, make_layout
from pipeline.model.networks import family
from pipeline.model.networks.base import BlockNet
from pipeline.model.networks.family import DataShape, NetworkFamily, NetworkSpec, register_network
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.packet import Packet

REPO = Path(__file__).resolve().parents[3]
# sha256 of every module's state dict for each shipped config, computed with the code before the network
# registry (commit 13af074), model.pretrained left empty and image folders given 1000 classes.
BEFORE = json.loads((Path(__file__).parent.parent / "data" / "shipped_parameters.json").read_text())

def representatives() -> list[str]:
    """The first config of each folder (every family, dataset and depth): the fast tier checks these."""
    firsts: dict[str, str] = {}
    for path in sorted(BEFORE):
        firsts.setdefault(str(Path(path).parent), path)
    return [path for path in firsts.values() if "imagenet" not in path and "cityscapes" not in path]


def parameter_digest(config: Config) -> str:
    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, resolve_cuts(config, spec, CPU))
    digest = hashlib.sha256()
    for index in range(config.local.modules):
        for name, tensor in build_module(config, layout, index, CPU).state_dict().items():
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())  # its bytes, uncopied
    return digest.hexdigest()


# Building a module probes its network's block shapes with a forward of one image: DeepLab-V3 at Cityscapes'
# 512 x 1024 crop (output stride 8) takes seconds per network. No weight's shape depends on the crop, so the
# segmentation configs are built at a small one: their digests, taken at the shipped crops, still have to match.
SMALL_CROP = "data.crop=[64, 128]"


def shipped(path: str) -> Config:
    sets = ["model.pretrained=", "data.root=/nonexistent"]
    try:
        config = load_config(REPO / path, sets)
    except BadInput:  # an image folder's classes come from its folders, absent here
        return load_config(REPO / path, [*sets, "model.classes=1000"])
    return load_config(REPO / path, [*sets, SMALL_CROP]) if config.data.name == "cityscapes" else config


def check_digests(paths: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    nets: dict[tuple[object, ...], BlockNet] = {}
    make_net = network.make_net

    def shared_net(arch: NetworkSpec, spec: DatasetSpec, deep_stem: bool) -> BlockNet:
        """make_net's network, one per (arch, dataset, stem): configs of one network probe its block shapes (a
        forward at the dataset's image size) once, not once each; every module is still built from its seeds."""
        key = (arch, spec, deep_stem)
        if key not in nets:
            nets[key] = make_net(arch, spec, deep_stem)
        return nets[key]

    monkeypatch.setattr(network, "make_net", shared_net)
    seen: dict[tuple[str, ...], str] = {}
    changed = []
    for path in paths:
        config = shipped(path)
        key = (json.dumps([config.to_dict()["model"], config.to_dict()["local"]], sort_keys=True), config.data.name,
               str(config.run.seed), str(config.precision.channels_last))
        if key not in seen:
            seen[key] = parameter_digest(config)
        if seen[key] != BEFORE[path]:
            changed.append(path)
    assert not changed, f"these configs now build other parameters: {changed}"


def test_every_shipped_config_is_covered() -> None:
    tomls = {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.toml") if p.name != "base.toml"}
    assert tomls == set(BEFORE)


def test_one_shipped_config_per_folder_builds_the_parameters_it_built_before(monkeypatch: pytest.MonkeyPatch) -> None:
    check_digests(representatives(), monkeypatch)


@pytest.mark.slow
def test_every_shipped_config_builds_the_parameters_it_built_before(monkeypatch: pytest.MonkeyPatch) -> None:
    check_digests([path for path in sorted(BEFORE) if path not in representatives()], monkeypatch)


class Mlp(BlockNet):
    """A family in one file: flattened images through three linear blocks."""

    def __len__(self) -> int:
        return 3

    def build(self, index: int) -> nn.Module:
        width = 3 * 32 * 32
        return [nn.Flatten(), nn.Sequential(nn.Linear(width, 64), nn.ReLU()),
                nn.Sequential(nn.Linear(64, 64), nn.ReLU())][index]

    def classifier(self, classes: int) -> nn.Module:
        return nn.Linear(64, classes)


class Mlps(NetworkFamily):
    name = "mlp"

    def names(self) -> tuple[str, ...]:
        return ("mlp3",)

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        if arch != "mlp3":
            raise BadInput(f"model.arch = {arch!r} is not an mlp; allowed: mlp3")
        return NetworkSpec(arch, self.name, 3)

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        return Mlp(spec.name, (data.channels, *data.image_shape))


def test_a_family_registered_in_one_file_trains(build_modules, request: pytest.FixtureRequest) -> None:
    register_network(Mlps())
    request.addfinalizer(lambda: family.FAMILIES.pop("mlp"))  # the registration ends with the test
    config = tiny_config("model.arch=mlp3", "local.modules=3")
    assert config.arch.family == "mlp"
    _, cuts, layout, modules = build_modules(config)
    assert cuts == [0, 1] and [layout.output_shape(k) for k in range(3)] == [(3072,), (64,), (64,)]
    packet = Packet.from_batch(torch.randn(4, 3, 32, 32), torch.arange(4))
    for module in modules:
        inputs, output, loss = module(packet)
        loss.backward()
        if not module.last:
            packet = module.next_packet(packet, inputs, output)
    assert modules[-1].logits(output, packet.labels).shape == (4, 10)
    assert tiny_config("model.arch=mlp3", "model.family=mlp").arch == config.arch
    with pytest.raises(BadInput, match="is not an mlp; allowed: mlp3"):
        tiny_config("model.arch=resnet8", "model.family=mlp")


def test_auto_picks_the_one_family_that_knows_the_name() -> None:
    assert tiny_config("model.arch=vit_tiny").arch.family == "vit"
    assert tiny_config("model.arch=vgg16_bn").arch.family == "vgg"
    assert load_config(None, ["data.name=cifar10", "model.arch=resnet50"]).arch.family == "cifar"  # the dataset's
    others = r"is not a CIFAR ResNet.*; or .*vgg11_bn, vgg16_bn, vit_tiny, vit_small, 'package.module:factory'"
    with pytest.raises(BadInput, match=others):
        tiny_config("model.arch=resnet7")
    with pytest.raises(BadInput, match=r"model.family = 'nets' is not a registered network family"):
        tiny_config("model.family=nets")
