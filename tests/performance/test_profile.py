"""pipeline.performance.profile: exact activation bytes (weights left out), and profiles that predict them."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.model.context import ContextPlan
from pipeline.performance.activations import (
    checkpointed_activation_bytes,
    module_activation_bytes,
    saved_activation_bytes,
)
from pipeline.performance.cost import (
    end_to_end_activation_bytes,
    partition_cuts,
    predicted_checkpointed_activation_bytes,
    predicted_stage_activation_bytes,
    recompute_seconds,
)
from pipeline.performance.profile import profile_as_a_stage, profile_network, resolve_cuts
from pipeline.runtime import host
from tests.model.networks.user_networks import MAPS_THEN_VECTORS


def test_weights_saved_for_backward_are_not_activations():
    """Conv and linear keep their weights for backward; only the inputs they saved count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(64 * 4 * 4, 1000))
    x = torch.randn(2, 64, 4, 4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    size, output = saved_activation_bytes(model, x)
    # the conv saves its input x, the linear its flattened input (a view of the conv's output)
    assert size == x.numel() * 4 + 2 * 64 * 4 * 4 * 4
    assert weights > 10 * size  # counting the weights would have dwarfed the activations
    assert output.shape == (2, 1000)


def test_batch_norm_buffers_are_not_activations():
    bn = nn.BatchNorm2d(8).train()
    x = torch.randn(2, 8, 3, 3)
    size, _ = saved_activation_bytes(bn, x)
    # its input, plus the batch mean and inverse std it computed (8 floats each); not its weight,
    # bias or running statistics
    assert size == x.numel() * 4 + 2 * 8 * 4


def test_imagenet_modules_are_profiled(make_config):
    config = make_config("model.family=imagenet", "model.arch=resnet18", "local.modules=2", "local.reconstruct=true")
    e2e = make_config("model.family=imagenet", "model.arch=resnet18")
    spec = dataset_spec(config.data, config.model)
    local = module_activation_bytes(config, spec, [3], batch=2)
    whole = module_activation_bytes(e2e, spec, [], batch=2)
    assert len(local) == 2 and len(whole) == 1
    assert local[0] > 0 and 0 < local[1] < whole[0]  # the last module runs a part of the same blocks


CIFAR14 = ("model.arch=resnet14",)
IMAGENET18 = ("model.family=imagenet", "model.arch=resnet18")


@pytest.mark.parametrize("net, method", [
    (CIFAR14, ("local.context=R0",)), (CIFAR14, ("local.context=R1E",)), (CIFAR14, ("local.reconstruct=true",)),
    (IMAGENET18, ("local.reconstruct=true",)), (CIFAR14, ("local.loss=predsim",)),
], ids=["cifar-R0", "cifar-R1E", "cifar-decoder", "imagenet-decoder", "cifar-predsim"])
def test_profiled_bytes_predict_the_exact_count(make_config, net, method):
    """The profile's per-piece bytes add up to what a real module's step keeps (counted exactly)."""
    config = make_config(*net, "local.modules=3", "data.batch_size=8", *method)
    spec = dataset_spec(config.data, config.model)
    profile = profile_network(config, spec, torch.device("cpu"))
    plan = ContextPlan(3, config.local.context_depth, config.local.context_image, config.local.reconstruct)
    cuts = [1, 4]
    predicted = predicted_stage_activation_bytes(profile, plan, cuts)
    assert predicted == pytest.approx(module_activation_bytes(config, spec, cuts, 8), rel=0.01)
    e2e = make_config(*net, "data.batch_size=8")
    assert end_to_end_activation_bytes(profile, 8) == pytest.approx(
        module_activation_bytes(e2e, spec, [], 8)[0], rel=0.01)


@pytest.mark.parametrize("arch", ["vit_tiny", "vgg11_bn", MAPS_THEN_VECTORS])
def test_other_networks_are_profiled_from_their_own_shapes(make_config, arch):
    """Token, map and vector features alike: balanced-time cuts of the profile, whose bytes predict the exact count
    of those modules' steps (ContSup R1E: image and input encoders into every module after the first)."""
    config = make_config(f"model.arch={arch}", "local.modules=3", "local.context=R1E", "data.batch_size=2",
                         "local.partition=balanced-time")
    spec = dataset_spec(config.data, config.model)
    profile = profile_network(config, spec, torch.device("cpu"))
    assert len(profile) == config.arch.units
    cuts = partition_cuts(config, profile)
    assert len(cuts) == 2 and 0 <= cuts[0] < cuts[1] < config.arch.units - 1
    plan = ContextPlan(3, 1, True, False)
    assert predicted_stage_activation_bytes(profile, plan, cuts) == pytest.approx(
        module_activation_bytes(config, spec, cuts, 2), rel=0.01)


def test_balanced_cuts_never_start_a_module_where_its_context_cannot_reach(make_config, capsys):
    """The factory's blocks 2 and 3 output vectors, which no ContSup encoder reaches: with R1E the one cut of its
    five blocks into three modules that builds starts none after them; four modules cannot be built at all."""
    config = make_config(f"model.arch={MAPS_THEN_VECTORS}", "local.modules=3", "local.context=R1E",
                         "data.batch_size=2", "local.partition=balanced-time")
    spec = dataset_spec(config.data, config.model)
    assert resolve_cuts(config, spec, torch.device("cpu")) == [0, 1]
    assert "cut points [0, 1] (block index after which a module ends)" in capsys.readouterr().out
    config.local.modules = 4
    refusal = (rf"^local.partition = 'balanced-time': every cut of {re.escape(MAPS_THEN_VECTORS)} into 4 modules "
               r"has a module whose .* do not fit")
    with pytest.raises(BadInput, match=refusal):
        resolve_cuts(config, spec, torch.device("cpu"))


def test_balanced_cuts_keep_every_module_under_the_cap(make_config):
    """Whatever the timings, the chosen cuts hold every module under the cap (counted exactly)."""
    e2e_config = make_config("model.arch=resnet14", "data.batch_size=8")
    spec = dataset_spec(e2e_config.data, e2e_config.model)
    e2e = module_activation_bytes(e2e_config, spec, [], 8)[0]
    config = make_config("model.arch=resnet14", "local.modules=3", "data.batch_size=8", "local.partition=balanced",
                         "local.memory_cap=0.465")
    cuts = resolve_cuts(config, spec, torch.device("cpu"))
    assert max(module_activation_bytes(config, spec, cuts, 8)) <= 0.465 * e2e
    config.local.memory_cap = 0.4  # below the memory-balanced cuts' 0.458
    with pytest.raises(BadInput, match=r"smallest cap that fits is 0.458 of E2E"):
        resolve_cuts(config, spec, torch.device("cpu"))


def test_segmentation_is_not_profiled(make_config):
    import dataclasses

    config = make_config("local.modules=2")
    dense = dataclasses.replace(dataset_spec(config.data, config.model), dense=True)
    with pytest.raises(BadInput, match="profiling .* covers classification networks.*local.partition = 'equal'"):
        profile_network(config, dense, torch.device("cpu"))


@pytest.mark.parametrize("segments", [2, 3, 7])
def test_recomputed_segments_keep_less_and_the_profile_predicts_it(make_config, segments):
    """Checkpointed E2E keeps less than plain E2E, and the profile's pieces predict the exact count."""
    e2e = make_config("model.arch=resnet14", "data.batch_size=8")
    spec = dataset_spec(e2e.data, e2e.model)
    plain = module_activation_bytes(e2e, spec, [], 8)[0]
    exact = checkpointed_activation_bytes(e2e, spec, 8, segments)
    assert exact < plain
    profile = profile_network(e2e, spec, torch.device("cpu"))
    assert predicted_checkpointed_activation_bytes(profile, segments, 8) == pytest.approx(exact, rel=0.01)
    assert recompute_seconds(profile, segments, 8) > 0


def test_the_profile_is_measured_with_the_threads_a_stage_trains_with(
        monkeypatch: pytest.MonkeyPatch, make_config) -> None:
    """The bench and the planner profile a stage with the CPU threads its training process will set
    (limit_cpu_threads): the same rule, then torch's own count back."""
    monkeypatch.setattr(host, "_available_cores", lambda: [0, 1, 2, 3])
    before = torch.get_num_threads()
    config = make_config()
    spec = dataset_spec(config.data, config.model)
    assert profile_as_a_stage(config, spec, 2).threads == 2
    assert profile_as_a_stage(make_config("pipeline.threads_per_stage=3"), spec, 2).threads == 3
    assert torch.get_num_threads() == before
