"""Wire bytes per step and idle fractions, on shapes worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.context import ContextPlan
from pipeline.model.resnet import CifarResNet
from pipeline.performance.traffic import (
    LABEL_BYTES,
    all_reduce_bytes,
    bubble_fraction,
    classic_pp_bytes,
    ddp_bytes,
    local_pipeline_bytes,
    measured_idle_fraction,
    packet_bytes,
)
from pipeline.runtime.codec import MessageCodec
from pipeline.runtime.messages import Train
from pipeline.runtime.transport import header_length

IMAGE, H1, H2 = (3, 32, 32), (16, 32, 32), (32, 16, 16)


def test_an_r0_packet_is_header_labels_and_features() -> None:
    plan = ContextPlan(modules=2, depth=0, image=False, reconstruct=False)
    got = packet_bytes(plan, [IMAGE, H1], 1, batch=128, element_bytes=4)
    assert got == 8 * header_length(2) + 128 * 8 + 128 * 16 * 32 * 32 * 4


def test_context_tensors_travel_with_the_features_and_bf16_halves_the_floats() -> None:
    # R1E into module 2: features h1, the image (E) and the register (module 1's input h0).
    plan = ContextPlan(modules=3, depth=1, image=True, reconstruct=False)
    shapes = [IMAGE, H1, H2]
    floats = 32 * 16 * 16 + 3 * 32 * 32 + 16 * 32 * 32
    assert packet_bytes(plan, shapes, 2, 10, 4) == 8 * header_length(4) + 10 * (8 + 4 * floats)
    assert packet_bytes(plan, shapes, 2, 10, 2) == 8 * header_length(4) + 10 * (8 + 2 * floats)


def test_the_all_reduce_and_ddp_model() -> None:
    assert all_reduce_bytes(1000, 1) == 0
    assert all_reduce_bytes(1000, 4) == 4 * 2 * 3 // 4 * 1000  # each of 4 ranks sends 2 (N-1)/N x bytes
    layer = nn.BatchNorm2d(4)  # 8 parameters, 2 x 4 statistics + the batch counter as buffers
    assert ddp_bytes(layer, 2) == 2 * 1 * 8 * 4 + 1 * (8 * 4 + 8)


def test_local_pipeline_replicas_split_the_batch_and_all_reduce_each_module() -> None:
    plan = ContextPlan(modules=2, depth=0, image=False, reconstruct=False)
    modules = [nn.Linear(3, 2), nn.Linear(2, 1)]
    one = local_pipeline_bytes(plan, [IMAGE, H1], modules, 128, 4)
    assert one == packet_bytes(plan, [IMAGE, H1], 1, 128, 4)
    two = local_pipeline_bytes(plan, [IMAGE, H1], modules, 128, 4, replicas=2)
    reduced = all_reduce_bytes(8 * 4, 2) + all_reduce_bytes(3 * 4, 2)  # the two Linear layers' weights + biases
    assert two == 2 * packet_bytes(plan, [IMAGE, H1], 1, 64, 4) + reduced


def test_classic_pipeline_sends_activations_forward_and_gradients_back() -> None:
    net = CifarResNet(5, 3, (32, 32))  # ResNet-32: block 5 ends stage 0 (16 x 32 x 32), block 10 stage 1 (32 x 16 x 16)
    assert classic_pp_bytes(net, [], 128) == 0
    assert classic_pp_bytes(net, [5], 128) == 128 * (2 * 16 * 32 * 32 * 4 + 8)
    assert classic_pp_bytes(net, [5, 10], 2) == 2 * (2 * (16 * 32 * 32 + 32 * 16 * 16) * 4 + 8)


def test_idle_fractions() -> None:
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(1, 4) == 0
    assert measured_idle_fraction([0.9, 0.8]) == pytest.approx(0.15)
    assert measured_idle_fraction([]) == 0.0


@pytest.mark.parametrize("context, wire", [("R0", torch.float32), ("R1E", torch.float32), ("R2E", torch.bfloat16)])
def test_the_predicted_packet_is_the_frame_the_codec_sends(context, wire, make_config, build_modules, image_batch,
                                                           run_chain) -> None:
    """packet_bytes against a real packet: the modules' own output, encoded by the link's codec, its floats in
    the wire's dtype, its header as long as the transport makes it for that codec."""
    config = make_config("local.modules=3", f"local.context={context}")
    spec, _, _, modules = build_modules(config)
    images, labels = image_batch(spec, batch=4)
    records = run_chain(modules, images, labels)
    inputs = [tuple(record["packet"].features.shape[1:]) for record in records]  # module k's input, k = 0 the image
    plan = ContextPlan.of(config.local)
    for receiver in (1, 2):
        codec = MessageCodec(plan, receiver, inputs[receiver])
        frame = codec.encode(Train(0, 0, 4, records[receiver]["packet"], 0))
        sent = sum(t.numel() * (t.to(wire) if t.is_floating_point() else t).element_size() for t in frame.tensors)
        header = LABEL_BYTES * header_length(codec.max_tensors)
        element = torch.empty((), dtype=wire).element_size()
        assert packet_bytes(plan, inputs, receiver, 4, element) == header + sent
