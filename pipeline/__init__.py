"""Greedy local learning (greedy SL, DGL heads, InfoPro, ContSup, PredSim) trained sequentially or as an
asynchronous pipeline with one process per module, plus the end-to-end DDP baseline.

The Python API: ``pipeline.run(config)`` trains a config in this process, the very entry point
``python -m pipeline.train`` and every torchrun process call; ``pipeline.register_network`` and
``pipeline.register_method`` add a network or a local loss from your own code (README: "Your own
network").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing the package imports no torch: a config is read without it
    from torch import nn

    from pipeline.config.schema import Config
    from pipeline.model.methods.registry import LocalMethod
    from pipeline.model.networks.family import NetworkFamily

__version__ = "0.1.0"


def run(config: Config | str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any] | None:
    """Train ``config`` in this process, in its run.mode: the whole run sequentially, or this process's stage
    or replica under torchrun. ``config``: a Config, or a TOML file (None: the defaults) read with
    ``overrides`` (``table.key=value`` each). Returns the run's summary where this process writes it (rank 0);
    bad input raises BadInput."""
    from pipeline.config.loading import load_config
    from pipeline.config.schema import Config
    from pipeline.train import train

    if not isinstance(config, Config):
        config = load_config(config, list(overrides))
    elif overrides:
        raise TypeError("overrides apply to a config file; change a Config's fields directly")
    return train(config)


def register_network(family: NetworkFamily | str, factory: Callable[..., object] | None = None) -> None:
    """Make a network nameable by model.arch: a ``NetworkFamily`` (pipeline/model/networks/family.py), or a
    name and a factory called as ``factory(in_channels=C, classes=N, image_size=(H, W))`` that returns the
    network's blocks, the last ending in the logits (pipeline/model/networks/factory.py). Register it in every
    process that trains it (or name the factory as model.arch = "package.module:factory" instead)."""
    from pipeline.model.networks.factory import NamedFactory
    from pipeline.model.networks.family import register_network as register

    if isinstance(family, str):
        if factory is None:
            raise TypeError("register_network(name, factory): give the factory that builds the network")
        family = NamedFactory(family, factory)
    register(family)


def register_method(method: LocalMethod) -> None:
    """Make a local loss nameable by local.loss: a ``LocalMethod`` (pipeline/model/methods/registry.py) that says
    what its head outputs and how the module's output and the head's are scored. Register it in every process
    that trains it, before its config is loaded."""
    from pipeline.model.methods.registry import register_method as register

    register(method)


def load_model(path: str | Path) -> nn.Module:
    """A model file written by python -m pipeline.export as an nn.Module in eval mode, on the CPU."""
    from pipeline.tools.model_file import load_model as load

    return load(path)
