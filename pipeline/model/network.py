"""From a config to the K local modules: cut points, layout, seeded construction."""

from __future__ import annotations

import threading

import torch

from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec
from pipeline.model.context import ContextPlan
from pipeline.model.local_module import Layout, LocalModule
from pipeline.model.networks.base import BlockNet
from pipeline.model.networks.registry import family_named
from pipeline.model.partition import module_ranges
from pipeline.model.pretrained import load_pretrained


def make_net(config: Config, spec: DatasetSpec) -> BlockNet:
    """The network config.model.arch names, for ``spec``'s images and classes."""
    arch = config.arch
    return family_named(arch.family).net(arch, spec, config.model.deep_stem)


def make_layout(config: Config, spec: DatasetSpec, cuts: list[int]) -> Layout:
    net = make_net(config, spec)
    return Layout(net, module_ranges(cuts, len(net)), ContextPlan.of(config.local), spec,
                  family_named(config.arch.family).parts())


# Construction draws from the process-wide RNG: threads that build modules at once (stage loops
# run on threads in one process) must not interleave their seeding and draws.
_BUILDING = threading.Lock()


def build_module(config: Config, layout: Layout, index: int, device: torch.device) -> LocalModule:
    """Module ``index`` from seed run.seed + index, so every process builds the same weights.

    model.pretrained then overwrites its backbone blocks, after the seeded draws, so the rest of
    the module (heads, decoder) is the same with and without it.
    """
    with _BUILDING, torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed + index)
        module = LocalModule(config, layout, index)
    if config.model.pretrained and not config.run.resume:  # a resumed run restores every weight itself
        start, end = layout.ranges[index]
        load_pretrained(module.body, config, start, end)
    if config.precision.channels_last:
        # Module.to takes memory_format at run time; torch's stubs leave it out
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module.to(device)
