"""The networks a config can name: one registered family per kind of network.

``model.arch`` names a network; the family that knows the name resolves it to a ``NetworkSpec``
(how many blocks, its cut notation, the family's own layout facts) and builds its ``BlockNet``.
``model.arch = "package.module:factory"`` names a user's factory instead (networks/factory.py).
Adding a family is one file that subclasses ``NetworkFamily`` and calls ``register_network``
(networks/family.py).
"""

from __future__ import annotations

# The ResNets' family imports no torch (the launchers read the shipped configs many times); importing
# it registers it.
import pipeline.model.networks.resnets  # noqa: F401
from pipeline.errors import BadInput, clip
from pipeline.model.networks.family import FACTORY_FAMILY, FAMILIES, DataShape, NetworkFamily, NetworkSpec


def families() -> dict[str, NetworkFamily]:
    _load_torch_families()
    return dict(FAMILIES)


def family_named(name: str) -> NetworkFamily:
    if name not in FAMILIES:
        _load_torch_families()
    if name not in FAMILIES:
        raise BadInput(f"model.family = {clip(name)!r} is not a registered network family; allowed: auto, "
                       f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def resolve_network(arch: str, family: str, dataset: str, data: DataShape) -> NetworkSpec:
    """The network ``model.arch`` names: a factory, the family model.family names, or (auto) the one family
    that knows the name, the dataset's own family first (resnet50 is a CIFAR and an ImageNet network)."""
    if ":" in arch:
        return family_named(FACTORY_FAMILY).resolve(arch, data)
    if family != "auto":
        return family_named(family).resolve(arch, data)
    default = next(f for f in FAMILIES.values() if dataset in f.datasets)
    if default.knows(arch):
        return default.resolve(arch, data)
    _load_torch_families()
    # Families that are no dataset's default (ViT, VGG, a user's) own their names outright; a ResNet name
    # of another dataset's family stays refused with how to ask for it (model.family).
    free = [f for f in FAMILIES.values() if not f.datasets and f.knows(arch)]
    if free:
        return free[0].resolve(arch, data)
    try:
        return default.resolve(arch, data)
    except BadInput as err:
        names = [name for f in FAMILIES.values() if not f.datasets for name in f.names()]
        raise BadInput(f"{err}; or {', '.join([*names, repr('package.module:factory') + ' (your own network)'])}"
                       ) from None


def _load_torch_families() -> None:
    """Import the other built-in families (ViT, VGG, a user's factory), which register themselves: they import
    torch and the model, so a config that names a ResNet is read without them."""
    import pipeline.model.networks.builtin  # noqa: F401
