"""From a config to the K local modules: the layout at given cuts, seeded construction.

make_layout and build_module are where a whole Config becomes modules (they read its model, local, precision,
run and data sections); everything they call takes the sections it reads.
"""

from __future__ import annotations

import threading

import torch

from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec
from pipeline.model.context import ContextPlan
from pipeline.model.local_module import Layout, LocalModule
from pipeline.model.networks.base import BlockNet
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.networks.registry import family_named
from pipeline.model.partition import module_ranges
from pipeline.model.pretrained import load_pretrained


def make_net(arch: NetworkSpec, spec: DatasetSpec, deep_stem: bool) -> BlockNet:
    """The network ``arch`` (model.arch resolved), for ``spec``'s images and classes; ``deep_stem``: model.deep_stem."""
    return family_named(arch.family).net(arch, spec, deep_stem)


def make_layout(config: Config, spec: DatasetSpec, cuts: list[int]) -> Layout:
    arch = config.arch
    net = make_net(arch, spec, config.model.deep_stem)
    return Layout(arch, net, module_ranges(cuts, len(net)), ContextPlan.of(config.local), spec,
                  family_named(arch.family).parts())


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
        module = LocalModule(layout, index, config.local, zero_init_residual=config.model.zero_init_residual,
                             checkpoint_segments=config.precision.checkpoint_segments)
    if config.model.pretrained and not config.run.resume:  # a resumed run restores every weight itself
        start, end = layout.ranges[index]
        load_pretrained(module.body, config.model, layout.arch, start, end)
    if config.precision.channels_last:
        # Module.to takes memory_format at run time; torch's stubs leave it out
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module.to(device)
