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

from pipeline.config.schema import LocalConfig, ModelConfig
from pipeline.model.local_module import Layout, LocalModule
from pipeline.model.networks.family import NetworkSpec
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


def build_inference_net(layout: Layout, local: LocalConfig) -> InferenceNet:
    """The modules of ``layout`` (make_layout's of a run's config and cuts), their tensors on the meta device (no
    storage, no draws): load_state_dict(..., assign=True) gives it the trained ones."""
    with torch.device("meta"):
        # Neither training setting shapes a tensor or the forward: a meta tensor holds no value to zero, and
        # evaluation recomputes nothing.
        modules = [LocalModule(layout, index, local, zero_init_residual=False, checkpoint_segments=0)
                   for index in range(len(layout.ranges))]
    return InferenceNet(modules)


def stage_key(module: int, name: str) -> str:
    """The inference net's key of module ``module``'s own key ``name``."""
    return f"{STAGES}.{module}.{name}"


def network_identity(arch: NetworkSpec, dataset: str, local: LocalConfig, model: ModelConfig,
                     cuts: list[int]) -> dict[str, Any]:
    """What of a config decides the inference network's tensors and what its inputs are (``arch``: model.arch
    resolved, ``dataset``: data.name): a config used with an export (to evaluate it) must agree on all of it; the
    test split's classes are checked against the network where it is read. Training-only settings (heads,
    decoder, losses, batch) may differ."""
    return {
        **family_named(arch.family).identity(arch),  # the network as its family records it
        "dataset": dataset,
        "modules": local.modules,
        "cuts": list(cuts),
        "context": local.context,
        "aux_widen": local.aux_widen,  # the width of the E encoders
        "deep_stem": model.deep_stem,
    }
