"""pipeline.model.local_module / context: shapes for every K and context, the packets between
modules, gradient isolation and the (ixx, ixy) interpolation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.specs import IGNORE_INDEX, DatasetSpec
from pipeline.model.context import ContextPlan, ImageEncoder, InputEncoder
from pipeline.model.decoder import Decoder, ImageNetDecoder
from pipeline.model.dilated_resnet import DeepStem
from pipeline.model.local_module import LocalModule, loss_weights
from pipeline.model.network import build_module, make_layout
from pipeline.model.partition import equal_cuts, even_cuts, module_ranges
from pipeline.model.resnet import Classifier
from pipeline.model.segmentation_heads import ASPPHead, FCNHead
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime.packet import Packet

CONTEXTS = ("R0", "E", "R1", "R1E", "R2", "R2E")


def valid(modules: int, context: str) -> bool:
    """K = 1 trains end to end (R0 only); Rn needs n < K."""
    if modules == 1:
        return context == "R0"
    return not context.startswith("R") or int(context[1]) < modules


RESNET32_CASES = [(k, c) for k in (1, 2, 3, 4, 8, 16) for c in CONTEXTS if valid(k, c)]
OTHER_DEPTH_CASES = [(arch, k, c) for arch, blocks, contexts in (("resnet8", 4, ("R0", "R1E", "R2")),
                                                                   ("resnet14", 7, ("R0", "E", "R1", "R2E")))
                     for k in range(1, blocks + 1) for c in contexts if valid(k, c)]


def block_shape(flat: int, n: int, image_channels: int = 3) -> tuple[int, int]:
    """(channels, side) after flat block ``flat`` of a 32x32 CIFAR ResNet; -1 is the image."""
    if flat < 0:
        return image_channels, 32
    if flat == 0:
        return 16, 32
    stage = (flat - 1) // n
    return (16, 32, 64)[stage], 32 >> stage


def expected_sources(module: int, depth: int, image: bool) -> list[int]:
    sources = []
    for distance in range(1, depth + 1):
        source = module - distance
        if source < 0 or (image and source == 0):
            continue
        sources.append(source)
    return sources


def check_chain(config, cuts, layout, modules, records, images, labels):
    """Every module's shapes and every packet's contents, against independent expectations."""
    n = config.arch.blocks[0]
    K = config.local.modules
    channels = layout.spec.channels
    depth, with_image = config.local.context_depth, config.local.context_image
    ranges = module_ranges(cuts, 1 + 3 * n)
    assert layout.ranges == ranges
    assert len(modules) == len(records) == K
    batch = images.shape[0]
    module_inputs = []
    for index, (module, record) in enumerate(zip(modules, records)):
        start, end = ranges[index]
        in_channels, in_side = block_shape(start - 1, n, channels)
        out_channels, out_side = block_shape(end - 1, n)
        packet = record["packet"]
        assert len(module.body) == end - start
        assert tuple(packet.features.shape) == (batch, in_channels, in_side, in_side)
        assert tuple(record["inputs"].shape) == (batch, in_channels, in_side, in_side)
        assert tuple(record["output"].shape) == (batch, out_channels, out_side, out_side)
        assert torch.equal(packet.labels, labels)
        module_inputs.append(record["inputs"])
        if index == 0:
            assert torch.equal(record["inputs"], images)  # module 0 adds nothing to the image

        # what this module adds
        assert (module.image_encoder is not None) == (with_image and index >= 1)
        sources = expected_sources(index, depth, with_image)
        assert layout.plan.register_sources(index) == sources
        assert len(module.input_encoders) == len(sources)
        for encoder, source in zip(module.input_encoders, sources):
            assert isinstance(encoder, InputEncoder)
            assert encoder.layers[0].in_channels == block_shape(ranges[source][0] - 1, n, channels)[0]
            assert encoder.layers[0].out_channels == in_channels and encoder.size == (in_side, in_side)
        if module.image_encoder is not None:
            assert isinstance(module.image_encoder, ImageEncoder)
            assert module.image_encoder.layers[3].out_channels == in_channels

        # what it received: the register holds exactly the inputs of its source modules
        if index >= 1:
            assert len(packet.register) == len(sources)
            for tensor, source in zip(packet.register, sources):
                assert torch.equal(tensor, module_inputs[source])
            assert (packet.image is not None) == layout.plan.carries_image(index)
            if with_image or (config.local.reconstruct and index <= K - 2):
                assert packet.image is not None and torch.equal(packet.image, images)
            assert torch.equal(packet.features, records[index - 1]["output"])

        # its head and what it sends
        if module.last:
            assert isinstance(module.head, Classifier)
            assert record["aux"].shape == (batch, layout.spec.classes)
            assert record["produced"] is None
            with torch.no_grad():
                assert module.logits(record["output"], labels).shape == (batch, layout.spec.classes)
        else:
            out = layout.spec.classes if config.local.loss == "softmax" else config.local.aux_feature_dim
            assert record["aux"].shape == (batch, out)
            produced = record["produced"]
            assert produced is not None
            assert torch.equal(produced.features, record["output"])
            assert not produced.features.requires_grad
            assert len(produced.register) == len(expected_sources(index + 1, depth, with_image))
            assert (module.decoder is not None) == config.local.reconstruct
            if module.decoder is not None:
                with torch.no_grad():
                    assert module.decoder(record["output"]).shape == images.shape


@pytest.mark.parametrize("modules, context", RESNET32_CASES, ids=[f"K{k}-{c}" for k, c in RESNET32_CASES])
def test_resnet32_every_K_and_context(modules, context, make_config, build_modules, image_batch, run_chain):
    config = make_config("model.arch=resnet32", f"local.modules={modules}", f"local.context={context}")
    spec, cuts, layout, built = build_modules(config)
    assert cuts == equal_cuts((5, 5, 5), modules)  # the published tables
    images, labels = image_batch(spec, batch=2)
    check_chain(config, cuts, layout, built, run_chain(built, images, labels), images, labels)


@pytest.mark.parametrize("arch, modules, context", OTHER_DEPTH_CASES)
def test_other_depths_even_split(arch, modules, context, make_config, build_modules, image_batch, run_chain):
    config = make_config(f"model.arch={arch}", f"local.modules={modules}", f"local.context={context}")
    spec, cuts, layout, built = build_modules(config)
    assert cuts == even_cuts(1 + 3 * config.arch.blocks[0], modules)
    images, labels = image_batch(spec, batch=2)
    check_chain(config, cuts, layout, built, run_chain(built, images, labels), images, labels)


@pytest.mark.parametrize("context", ["R0", "R1E", "R2"])
def test_reconstruction_contrast_and_single_channel(context, make_config, build_modules, image_batch, run_chain):
    config = make_config("model.arch=resnet14", "local.modules=4", f"local.context={context}",
                         "local.reconstruct=true", "local.loss=contrast", "local.aux_feature_dim=16",
                         "model.in_channels=1", "model.classes=5", "local.aux=2c2f")
    spec, cuts, layout, built = build_modules(config)
    assert spec.channels == 1 and spec.classes == 5
    images, labels = image_batch(spec, batch=2)
    check_chain(config, cuts, layout, built, run_chain(built, images, labels), images, labels)
    assert all(isinstance(m.decoder, Decoder) for m in built[:-1]) and built[-1].decoder is None


def test_context_plan_by_hand():
    plan = ContextPlan(modules=4, depth=2, image=False, reconstruct=False)
    assert [plan.register_sources(k) for k in range(4)] == [[], [0], [1, 0], [2, 1]]
    assert not any(plan.carries_image(k) for k in range(1, 4))  # R2 sends the image as register, not as image
    plan = ContextPlan(modules=4, depth=2, image=True, reconstruct=False)
    assert [plan.register_sources(k) for k in range(4)] == [[], [], [1], [2, 1]]
    assert all(plan.carries_image(k) for k in range(1, 4))
    plan = ContextPlan(modules=4, depth=0, image=False, reconstruct=True)
    # decoders on modules 0..2 need the image: it travels to module 2, never to the last module
    assert [plan.carries_image(k) for k in range(1, 4)] == [True, True, False]
    assert [plan.needs_image(k) for k in range(4)] == [True, True, True, False]
    plan = ContextPlan(modules=3, depth=1, image=False, reconstruct=False)
    assert [plan.register_sources(k) for k in range(3)] == [[], [0], [1]]


# ---- gradient isolation ----------------------------------------------------------------------------


def leaf(tensor):
    return tensor.clone().requires_grad_(True)


@pytest.mark.parametrize("context", ["R0", "E", "R1", "R1E", "R2E"])
def test_local_loss_never_reaches_the_senders_tensors(context, make_config, build_modules, image_batch, run_chain):
    config = make_config("model.arch=resnet14", "local.modules=4", f"local.context={context}",
                         "local.reconstruct=true")
    spec, _cuts, _layout, built = build_modules(config)
    images, labels = image_batch(spec, batch=4)
    records = run_chain(built, images, labels)
    for index, (module, record) in enumerate(zip(built, records)):
        received = record["packet"]
        # the sender's tensors, as leaves that would collect any gradient flowing back into them
        sent = Packet(received.labels, leaf(received.features),
                      None if received.image is None else leaf(received.image),
                      [leaf(t) for t in received.register])
        module.train()
        module.zero_grad(set_to_none=True)
        inputs, output, loss = module(sent)  # forward = features + local loss
        loss.backward()
        assert sent.features.grad is None
        assert sent.image is None or sent.image.grad is None
        assert all(t.grad is None for t in sent.register)
        # ... while everything of this module that its loss uses was trained
        missing = [name for name, p in module.named_parameters() if p.grad is None]
        assert missing == [], f"module {index}: no gradient for {missing}"
        assert all(m.grad is None for other in built if other is not module for m in other.parameters())
        module.zero_grad(set_to_none=True)
        produced = None if module.last else module.next_packet(sent, inputs, output)
        if produced is not None:
            assert not produced.features.requires_grad and produced.features.grad_fn is None
            for tensor in produced.register:  # new entries are detached; older ones are passed on as received
                assert any(tensor is old for old in sent.register) or (
                    not tensor.requires_grad and tensor.grad_fn is None)
            assert produced.image is None or produced.image is sent.image  # passed on untouched


# ---- (ixx, ixy) interpolation --------------------------------------------------------------------


def weights(make_config, modules, values, reconstruct=True):
    ixx_1, ixy_1, ixx_2, ixy_2 = values
    config = make_config("model.arch=resnet32", f"local.modules={modules}",
                         f"local.reconstruct={str(reconstruct).lower()}",
                         f"local.ixx_1={ixx_1}", f"local.ixy_1={ixy_1}", f"local.ixx_2={ixx_2}", f"local.ixy_2={ixy_2}")
    return [loss_weights(config.local, k) for k in range(modules - 1)]


def test_interpolation_K2_uses_the_first_pair(make_config):
    assert weights(make_config, 2, (5, 1, 0, 0)) == [(5.0, 1.0)]


def test_interpolation_K3_goes_from_first_to_last(make_config):
    assert weights(make_config, 3, (5, 0, 5, 0.1)) == [(5.0, 0.0), (5.0, 0.1)]


def test_interpolation_K4_is_linear(make_config):
    got = weights(make_config, 4, (6, 0, 1, 2))
    assert got == [pytest.approx((6.0, 0.0)), pytest.approx((3.5, 1.0)), pytest.approx((1.0, 2.0))]


def test_interpolation_K8_and_K16(make_config):
    got = weights(make_config, 8, (5, 0, 0, 2))
    for k, (ixx, ixy) in enumerate(got):
        assert ixx == pytest.approx(5 - 5 * k / 6) and ixy == pytest.approx(2 * k / 6)
    got = weights(make_config, 16, (5, 0.05, 0.2, 0.5))
    assert got[0] == pytest.approx((5, 0.05)) and got[-1] == pytest.approx((0.2, 0.5))
    assert got[7] == pytest.approx((5 + 7 / 14 * (0.2 - 5), 0.05 + 7 / 14 * 0.45))


def test_without_decoder_the_loss_is_the_head_loss(make_config):
    assert weights(make_config, 4, (6, 0, 1, 2), reconstruct=False) == [(0.0, 1.0)] * 3


def test_local_loss_combines_reconstruction_and_head(make_config, build_modules, image_batch):
    config = make_config("model.arch=resnet14", "local.modules=4", "local.reconstruct=true",
                         "local.ixx_1=6", "local.ixy_1=0.5", "local.ixx_2=1", "local.ixy_2=2")
    spec, _cuts, _layout, built = build_modules(config)
    images, labels = image_batch(spec, batch=4)
    images = images.clamp(-2, 2)
    packet = Packet.from_batch(images, labels)
    expected_weights = [(6.0, 0.5), (3.5, 1.25), (1.0, 2.0)]
    for module, (ixx, ixy) in zip(built[:-1], expected_weights):
        module.eval()
        assert (module.ixx, module.ixy) == pytest.approx((ixx, ixy))
        with torch.no_grad():
            inputs, output, loss = module(packet)
            assert loss.item() == module.local_loss(output, packet).item()
            target = module.decoder.target(images)
            assert target.min() >= 0 and target.max() <= 1
            z = module.decoder(output).double()  # BCE(sigmoid(z), t) written out in its stable form
            reconstruction = (z.clamp(min=0) - z * target + torch.log1p(torch.exp(-z.abs()))).mean()
            head = F.cross_entropy(module.head(output), labels)
        assert loss.item() == pytest.approx(ixx * reconstruction.item() + ixy * head.item(), rel=1e-4)
        packet = module.next_packet(packet, inputs, output)
    last = built[-1].eval()
    with torch.no_grad():
        _, output, loss = last(packet)
        assert loss.item() == pytest.approx(
            F.cross_entropy(last.logits(output, labels), labels).item(), rel=1e-6)


def test_decoder_and_encoder_biases_start_from_the_default_init_and_are_reproducible(make_config, build_modules):
    config = make_config("model.arch=resnet14", "local.modules=4", "local.context=R1E", "local.reconstruct=true")
    _, _, _, first = build_modules(config)
    _, _, _, second = build_modules(config)
    for a, b in zip(first, second):  # every process builds module k from seed run.seed + k: same weights
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), name
    module = first[2]  # not the last (so it has a decoder), and under R1E its register is module 1's input
    assert module.decoder is not None and module.image_encoder is not None
    biased = {
        "decoder output": module.decoder.layers[3],
        "decoder hidden": module.decoder.layers[0],
        "image encoder": module.image_encoder.layers[0],
        "input encoder": module.input_encoders[0].layers[0],
    }
    for name, conv in biased.items():
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bias = conv.bias.detach()
        assert torch.any(bias != 0), f"{name}: bias was zeroed"
        assert torch.all(bias.abs() <= 1.0 / fan_in**0.5), f"{name}: not PyTorch's default bias init"
    # other modules draw other biases: the seed differs per module
    assert not torch.equal(first[0].decoder.layers[3].bias, first[1].decoder.layers[3].bias)


# ---- segmentation: InfoPro's DeepLab-V3 modules --------------------------------------------------

SEG_SPEC = DatasetSpec("seg", 3, 5, 32, (0.5,) * 3, (0.25,) * 3, 0, "constant", True, "", "")
CROP = (32, 64)


def seg_modules(seg_config, *overrides: str):
    config = seg_config("model.arch=deeplabv3_resnet50", *overrides)
    layout = make_layout(config, SEG_SPEC, resolve_cuts(config, SEG_SPEC, torch.device("cpu")))
    return config, layout, [build_module(config, layout, index, torch.device("cpu"))
                            for index in range(config.local.modules)]


@pytest.fixture(scope="module")
def seg_k2(seg_config_builder):
    """DeepLab-V3 R50 cut after layer3[2] (module 1: layer3[3..5], layer4, both heads), with the decoder."""
    return seg_modules(seg_config_builder, "local.modules=2", "local.partition=[[3, 2]]", "local.reconstruct=true",
                       "local.ixx_1=1.5", "local.ixy_1=1")


def seg_batch(seed: int = 0, ignored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *CROP, generator=generator)
    labels = torch.randint(0, SEG_SPEC.classes, (2, *CROP), generator=generator)
    labels[:, :5] = IGNORE_INDEX
    return images, torch.full_like(labels, IGNORE_INDEX) if ignored else labels


def test_segmentation_modules_carry_infopros_head_and_decoder_then_deeplabs_heads(seg_k2):
    _, layout, (first, last) = seg_k2
    assert layout.ranges == [(0, 11), (11, 17)]
    assert isinstance(first.decoder, ImageNetDecoder) and first.aux_head is None
    assert first.head[0].in_channels == 1024 and first.head[-1].out_channels == SEG_SPEC.classes
    assert isinstance(last.head, ASPPHead) and isinstance(last.aux_head, FCNHead) and last.decoder is None
    assert last.aux_tap == 2  # layer3[5], flat 13, is the third block of the module
    assert last.aux_head.conv[0].in_channels == 1024
    for classifier in (last.head.classifier, last.aux_head.classifier):
        assert torch.all(classifier.bias == 0) and classifier.weight.std().item() < 0.02
    # module 0's head and decoder keep PyTorch's default draw, within 1 / sqrt(fan in) (InfoPro's);
    # the fan-out normal of the backbone would put the 1x1 conv to 5 classes at std 0.63
    convs = [m for m in [*first.head.modules(), *first.decoder.modules()] if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        bound = 1 / math.sqrt(conv.weight[0].numel())
        assert conv.weight.abs().max().item() <= bound and conv.bias.abs().max().item() <= bound


def test_segmentation_losses_by_hand(seg_k2):
    _, _, (first, last) = seg_k2
    images, labels = seg_batch()
    with torch.no_grad():
        first.eval(), last.eval()
        packet = Packet.from_batch(images, labels)
        inputs, output, loss = first(packet)
        target = (images * 0.25 + 0.5).clamp(0, 1)
        reconstruction = F.binary_cross_entropy_with_logits(first.decoder(output, CROP), target)
        corners = F.interpolate(first.head(output), size=CROP, mode="bilinear", align_corners=True)
        task = F.cross_entropy(corners, labels, ignore_index=255)  # torch's mean over the labelled pixels
        assert loss.item() == pytest.approx(1.5 * reconstruction.item() + 1.0 * task.item(), rel=1e-5)
        assert first.decoder(output, CROP).shape == (2, 3, *CROP)

        following = first.next_packet(packet, inputs, output)
        _, output, loss = last(following)
        tapped = following.features
        for block in list(last.body)[:3]:
            tapped = block(tapped)

        def over_every_pixel(logits):
            up = F.interpolate(logits, size=CROP, mode="bilinear", align_corners=False)
            return F.cross_entropy(up, labels, ignore_index=255, reduction="sum") / labels.numel()

        expected = over_every_pixel(last.head(output)) + 0.4 * over_every_pixel(last.aux_head(tapped))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        logits = last.logits(output, labels)
        assert logits.shape == (2, SEG_SPEC.classes, *CROP)
        assert torch.allclose(logits, F.interpolate(last.head(output), size=CROP, mode="bilinear"))


@pytest.mark.parametrize("ignored", [False, True])
def test_segmentation_gradients_stay_in_their_module(seg_k2, ignored):
    _, _, (first, last) = seg_k2
    images, labels = seg_batch(1, ignored)
    first.train(), last.train()
    packet = Packet.from_batch(images, labels)
    inputs, output, loss = first(packet)
    first.zero_grad(set_to_none=True)
    loss.backward()
    before = {name: p.grad.clone() for name, p in first.named_parameters() if p.grad is not None}
    assert before and all(torch.isfinite(g).all() for g in before.values())
    following = first.next_packet(packet, inputs, output)
    assert following.features.grad_fn is None
    _, _, loss = last(following)
    if ignored:  # an all-ignored batch: no task signal, no NaN
        assert loss.item() == 0.0
    last.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in last.parameters())
    after = {name: p.grad for name, p in first.named_parameters() if p.grad is not None}
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def test_segmentation_end_to_end_is_one_module_with_both_heads(seg_config_builder):
    config = seg_config_builder("model.arch=deeplabv3_resnet50", "model.deep_stem=true")
    layout = make_layout(config, SEG_SPEC, resolve_cuts(config, SEG_SPEC, torch.device("cpu")))
    assert layout.ranges == [(0, 17)]
    module = LocalModule(layout, 0, config.local, zero_init_residual=config.model.zero_init_residual,
                         checkpoint_segments=config.precision.checkpoint_segments)
    assert isinstance(module.head, ASPPHead) and isinstance(module.aux_head, FCNHead)
    assert module.aux_tap == 13 and module.decoder is None
    assert isinstance(module.body[0], DeepStem)
