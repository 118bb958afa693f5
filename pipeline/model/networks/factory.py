"""Your own network: ``model.arch = "package.module:factory"`` or a name given to ``pipeline.register_network``.

The factory is called as ``factory(in_channels=C, classes=N, image_size=(H, W))`` and returns the
network as one would train it end to end: an ``nn.Sequential`` (or a list of modules) whose last
block outputs the class logits. Its blocks are what cuts follow (flat indices ``local.partition =
[3, 7]``, or equal / balanced); every module but the last gets the auxiliary head that fits its
output, the last ends in the factory's own logits. Every process imports the factory by name, so
the same config runs sequentially, under torchrun, with replicas and on resume. The blocks keep the
initialisation the factory gives them; each module calls the factory once, from its own seed.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.errors import BadInput, clip
from pipeline.model.networks.base import BlockNet, Shape, describe_shape, output_shape
from pipeline.model.networks.family import (
    FACTORY_FAMILY,
    DataShape,
    NetworkFamily,
    NetworkSpec,
    register_network,
)

if TYPE_CHECKING:
    from pipeline.data.specs import DatasetSpec

Factory = Callable[..., object]
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def import_factory(arch: str) -> Factory:
    """The callable ``package.module:name`` names; BadInput naming what is wrong and the fix."""
    if not _PATH.match(arch):
        raise BadInput(f"model.arch = {clip(arch)!r} is not 'package.module:factory' (a module path, a colon, a "
                       "function name)")
    module_name, name = arch.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module: ImportError, or whatever its import raises
        raise BadInput(f"model.arch = {clip(arch)!r}: module {module_name!r} does not import ({type(err).__name__}: "
                       f"{clip(str(err), 200)}); put its folder on PYTHONPATH on every node, or fix the module"
                       ) from err
    factory: Factory | None = getattr(module, name, None)
    if not callable(factory):
        raise BadInput(f"model.arch = {clip(arch)!r}: module {module_name!r} has no callable {name!r}; name the "
                       "function that builds your network")
    return factory


def call_factory(label: str, factory: Factory, data: DatasetSpec) -> list[nn.Module]:
    """The factory's blocks for ``data``'s images and classes; BadInput where it fails or returns something else."""
    try:
        built = factory(in_channels=data.channels, classes=data.classes, image_size=data.image_shape)
    except Exception as err:  # the user's code
        raise BadInput(f"model.arch = {label!r}: the factory raised {type(err).__name__}: {clip(str(err), 200)} when "
                       f"called as factory(in_channels={data.channels}, classes={data.classes}, "
                       f"image_size={data.image_shape}); fix the factory") from err
    blocks: list[object] = list(built) if isinstance(built, (nn.Sequential, list, tuple, nn.ModuleList)) else []
    strays = [block for block in blocks if not isinstance(block, nn.Module)]
    if not blocks or strays:
        what = f"a sequence holding a {type(strays[0]).__name__}" if strays else clip(repr(built), 80)
        raise BadInput(f"model.arch = {label!r}: the factory returned {what}; it must return an nn.Sequential (or a "
                       "list of nn.Modules) of the blocks, the last one ending in the class logits")
    return [block for block in blocks if isinstance(block, nn.Module)]


class FactoryNet(BlockNet):
    """A user's network: the factory's blocks, cut anywhere; its last block's output is the logits."""

    own_init = True

    def __init__(self, label: str, factory: Factory, data: DatasetSpec) -> None:
        super().__init__(label, (data.channels, *data.image_shape))
        self.factory, self.data = factory, data
        self._probed: list[Shape] = []
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            self.blocks = len(call_factory(label, factory, data))

    def __len__(self) -> int:
        return self.blocks

    def build(self, index: int) -> nn.Module:
        return self.build_range(index, index + 1)[0]

    def build_range(self, start: int, end: int) -> list[nn.Module]:
        """One call of the factory (its draws in its own order), keeping blocks [start, end)."""
        return call_factory(self.name, self.factory, self.data)[start:end]

    def classifier(self, classes: int) -> nn.Module:
        return nn.Identity()  # the last block already outputs the logits

    def _probe(self, index: int) -> Shape:
        """Every block's shape from one meta-device build (a factory builds all its blocks at once)."""
        if not self._probed:
            shapes: list[Shape] = []
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                for position, block in enumerate(call_factory(self.name, self.factory, self.data)):
                    shapes.append(output_shape(self.name, position, block, shapes[-1] if shapes else self.input_shape))
            if shapes[-1] != (self.data.classes,):
                raise BadInput(f"model.arch = {self.name!r}: the last block returns {describe_shape(shapes[-1])}, "
                               f"not the logits of the {self.data.classes} classes; end the network in them "
                               "(e.g. nn.Linear(width, classes))")
            self._probed = shapes
        return self._probed[index]


@functools.lru_cache(maxsize=64)
def factory_net(label: str, factory: Factory, data: DatasetSpec) -> FactoryNet:
    """The factory's network for ``data``, checked block by block (cached: config.arch asks often)."""
    net = FactoryNet(label, factory, data)
    net.shape(len(net) - 1)
    return net


class Factories(NetworkFamily):
    """``package.module:factory`` names."""

    name = FACTORY_FAMILY

    def names(self) -> tuple[str, ...]:
        return ()

    def knows(self, arch: str) -> bool:
        return ":" in arch

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        factory = import_factory(arch)
        return NetworkSpec(arch, self.name, len(factory_net(arch, factory, data())), None, factory)

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        return factory_net(spec.name, spec.layout, data)


class NamedFactory(NetworkFamily):
    """A factory registered under a name of its own (``pipeline.register_network(name, factory)``)."""

    def __init__(self, name: str, factory: Factory) -> None:
        self.name = name  # type: ignore[misc]  # a ClassVar for the built-ins, one per instance here
        self.factory = factory

    def names(self) -> tuple[str, ...]:
        return (self.name,)

    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        if arch != self.name:
            raise BadInput(f"model.arch = {clip(arch)!r} is not a network of model.family = {self.name!r}; use "
                           f"model.arch = {self.name!r}")
        return NetworkSpec(arch, self.name, len(factory_net(arch, self.factory, data())), None, self.factory)

    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        return factory_net(spec.name, self.factory, data)


register_network(Factories())
