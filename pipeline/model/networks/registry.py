"""The networks a config can name: one registered family per kind of network.

``model.arch`` names a network; the family that knows the name resolves it to a ``NetworkSpec``
(how many blocks, its cut notation, the family's own layout facts) and builds its ``BlockNet``.
``model.arch = "package.module:factory"`` names a user's factory instead (networks/factory.py).
Adding a family is one file that subclasses ``NetworkFamily`` and calls ``register_network``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import BadInput, clip
from pipeline.model.partition import even_cuts

if TYPE_CHECKING:
    from pipeline.data.specs import DatasetSpec
    from pipeline.model.local_parts import LocalParts
    from pipeline.model.networks.base import BlockNet


@dataclass(frozen=True)
class NetworkSpec:
    """A resolved ``model.arch``: what config validation, cuts and summaries read of it."""

    name: str  # model.arch as given
    family: str  # the registered family that builds it
    units: int  # blocks: a cut follows any of them but the last
    # Blocks per stage, for the [stage, block] cut notation of the ResNets ([0, 0]: after the stem);
    # None: cuts are flat block indices 0..units-2.
    blocks: tuple[int, ...] | None = None
    layout: Any = None  # the family's own facts (a ResNet's ArchSpec)


# What resolving needs besides the name: model.* and the dataset's shapes (called only by the
# families that build the network to count its blocks).
DataShape = Callable[[], "DatasetSpec"]


class NetworkFamily(ABC):
    """A kind of network: the names it knows, how it is cut by default, how its blocks are built."""

    name: ClassVar[str]
    datasets: ClassVar[tuple[str, ...]] = ()  # datasets whose networks are this family's by default
    pretrained: ClassVar[bool] = False  # model.pretrained can load an ImageNet ResNet backbone into it

    @abstractmethod
    def names(self) -> tuple[str, ...]:
        """The model.arch names it knows (listed in errors; a family of numbered depths gives examples)."""

    def knows(self, arch: str) -> bool:
        return arch in self.names()

    @abstractmethod
    def resolve(self, arch: str, data: DataShape) -> NetworkSpec:
        """``arch`` as this family's network; BadInput (one line: what is allowed) when it names none."""

    @abstractmethod
    def net(self, spec: NetworkSpec, data: DatasetSpec, deep_stem: bool = False) -> BlockNet:
        """The network for ``data``'s images and classes."""

    def default_cuts(self, spec: NetworkSpec, modules: int) -> list[int]:
        """The cuts of local.partition = 'equal': K groups of consecutive blocks of sizes within one."""
        return even_cuts(spec.units, modules)

    def parts(self) -> LocalParts:
        """The heads, decoders and context encoders its modules train with: the generic ones by default."""
        from pipeline.model.local_parts import LocalParts  # they import the model, which imports this module

        return LocalParts()

    def identity(self, spec: NetworkSpec) -> dict[str, Any]:
        """What a checkpoint records to refuse another network's weights."""
        return {"arch": spec.name, "family": spec.family}


_FAMILIES: dict[str, NetworkFamily] = {}
FACTORY_FAMILY = "factory"


def register_network(family: NetworkFamily) -> NetworkFamily:
    """Make ``family`` nameable by model.family and its names by model.arch (later registrations of a
    family's name replace earlier ones: a test or a notebook may register a family again)."""
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, NetworkFamily]:
    _load_builtins(everything=True)
    return dict(_FAMILIES)


def family_named(name: str) -> NetworkFamily:
    _load_builtins(everything=name not in _FAMILIES)
    if name not in _FAMILIES:
        raise BadInput(f"model.family = {clip(name)!r} is not a registered network family; allowed: auto, "
                       f"{', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def resolve_network(arch: str, family: str, dataset: str, data: DataShape) -> NetworkSpec:
    """The network ``model.arch`` names: a factory, the family model.family names, or (auto) the one family
    that knows the name, the dataset's own family first (resnet50 is a CIFAR and an ImageNet network)."""
    _load_builtins()
    if ":" in arch:
        return family_named(FACTORY_FAMILY).resolve(arch, data)
    if family != "auto":
        return family_named(family).resolve(arch, data)
    default = next(f for f in _FAMILIES.values() if dataset in f.datasets)
    if default.knows(arch):
        return default.resolve(arch, data)
    _load_builtins(everything=True)
    # Families that are no dataset's default (ViT, VGG, a user's) own their names outright; a ResNet name
    # of another dataset's family stays refused with how to ask for it (model.family).
    free = [f for f in _FAMILIES.values() if not f.datasets and f.knows(arch)]
    if free:
        return free[0].resolve(arch, data)
    try:
        return default.resolve(arch, data)
    except BadInput as err:
        names = [name for f in _FAMILIES.values() if not f.datasets for name in f.names()]
        raise BadInput(f"{err}; or {', '.join([*names, repr('package.module:factory') + ' (your own network)'])}"
                       ) from None


def _load_builtins(everything: bool = False) -> None:
    """Import the built-in families, which register themselves: the ResNets', which import no torch (the
    launchers read the shipped configs many times), or ``everything`` (the others import torch and the model)."""
    import pipeline.model.networks.resnets

    if everything:
        import pipeline.model.networks.builtin  # noqa: F401
