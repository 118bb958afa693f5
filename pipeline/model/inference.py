"""The trained network as one ordinary module: the K module bodies in order, ContSup's context encoders,
the last module's classifier; every local head, decoder and FCN auxiliary head left out.

It is built of the very ``LocalModule``s the run trained, stripped of what serves training only, and
its forward calls their own evaluation steps (``features``, ``next_packet``, ``logits``) in the order
the stage loop does: that is what makes its logits the run's evaluation logits bit for bit. Its state dict
is ``stages.<k>.<name>`` with ``<name>`` module k's own key in the run's checkpoint.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from pipeline.config.schema import Config
from pipeline.data.specs import DatasetSpec
from pipeline.model.local_module import LocalModule
from pipeline.model.network import make_layout
from pipeline.model.networks.registry import family_named
from pipeline.runtime.packet import Packet

STAGES = "stages"  # the state dict's prefix of module k: stages.<k>.


def strip(module: LocalModule) -> LocalModule:
    """``module`` without its training-only parts (local head, decoder, auxiliary head), in eval mode."""
    if not module.last:
        module.head = nn.Identity()  # a local head predicts from one module's output for its loss only
    module.decoder = None
    module.aux_head = None
    module.aux_tap = None
    module.dropouts = [layer for layer in module.dropouts if any(layer is own for own in module.modules())]
    return module.eval()


class InferenceNet(nn.Module):
    """images [B, C, H, W] (normalised as the run's evaluation) -> class logits [B, classes], or for
    segmentation [B, classes, H, W] at the image's resolution."""

    def __init__(self, modules: list[LocalModule]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(strip(module) for module in modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        chain = cast(list[LocalModule], list(self.stages))
        # The images stand in for the labels, which nothing reads but the size of a label map: a
        # segmentation net's logits come at the image's resolution.
        packet = Packet.from_batch(images, images)
        for module in chain[:-1]:
            inputs, output = module.features(packet)
            packet = module.next_packet(packet, inputs, output)
        last = chain[-1]
        _, output = last.features(packet)
        return last.logits(output, packet.labels)


def build_inference_net(config: Config, spec: DatasetSpec, cuts: list[int]) -> InferenceNet:
    """The network of ``config`` cut at ``cuts``, its tensors on the meta device (no storage, no draws):
    load_state_dict(..., assign=True) gives it the trained ones."""
    layout = make_layout(config, spec, cuts)
    with torch.device("meta"):
        modules = [LocalModule(config, layout, index) for index in range(len(cuts) + 1)]
    return InferenceNet(modules)


def stage_key(module: int, name: str) -> str:
    """The inference net's key of module ``module``'s own key ``name``."""
    return f"{STAGES}.{module}.{name}"


def network_identity(config: Config, cuts: list[int]) -> dict[str, Any]:
    """What of a config decides the inference network's tensors and what its inputs are: a config used with an
    export (to evaluate it) must agree on all of it; the test split's classes are checked against the network
    where it is read. Training-only settings (heads, decoder, losses, batch) may differ."""
    return {
        **family_named(config.arch.family).identity(config.arch),  # the network as its family records it
        "dataset": config.data.name,
        "modules": config.local.modules,
        "cuts": list(cuts),
        "context": config.local.context,
        "aux_widen": config.local.aux_widen,  # the width of the E encoders
        "deep_stem": config.model.deep_stem,
    }
