"""What a network family is: the ``NetworkFamily`` a new kind of network subclasses, the ``NetworkSpec`` it
resolves ``model.arch`` to, and ``register_network``. Families import this module; looking a name up is
registry.py's (which imports the built-in families), so neither imports the other in a circle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

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
        from pipeline.model.local_parts import LocalParts  # torch: a config is read without it

        return LocalParts()

    def identity(self, spec: NetworkSpec) -> dict[str, Any]:
        """What a checkpoint records to refuse another network's weights."""
        return {"arch": spec.name, "family": spec.family}


# Every family registered so far, by name (registry.py reads it; built-in families register on import).
FAMILIES: dict[str, NetworkFamily] = {}
FACTORY_FAMILY = "factory"


def register_network(family: NetworkFamily) -> NetworkFamily:
    """Make ``family`` nameable by model.family and its names by model.arch (later registrations of a
    family's name replace earlier ones: a test or a notebook may register a family again)."""
    FAMILIES[family.name] = family
    return family
