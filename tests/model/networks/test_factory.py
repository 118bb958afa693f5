"""Your own network: model.arch = "package.module:factory" (pipeline/model/networks/factory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import user_networks
from conftest import CPU, tiny_config
from torch import nn

from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.model.network import build_module, make_layout
from pipeline.model.networks.factory import FactoryNet
from pipeline.model.tokens import VectorHead
from pipeline.runtime.packet import Packet
from pipeline.train import main

NET = "model.arch=user_networks:maps_then_vectors"


def test_a_factory_network_is_cut_at_flat_block_indices(build_modules) -> None:
    config = tiny_config(NET, "local.modules=3", "local.partition=[1, 2]")
    assert (config.arch.family, config.arch.units, config.arch.blocks) == ("factory", 5, None)
    _, cuts, layout, modules = build_modules(config)
    assert cuts == [1, 2] and layout.ranges == [(0, 2), (2, 3), (3, 5)]
    assert [layout.output_shape(k) for k in range(3)] == [(16, 16, 16), (64,), (10,)]
    assert isinstance(modules[1].head, VectorHead)  # a vector feature gets the MLP head
    assert isinstance(modules[2].head, nn.Identity)  # the factory's own last block outputs the logits
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    packet = Packet.from_batch(images, labels)
    for module in modules:
        inputs, output, loss = module(packet)
        assert loss.dim() == 0 and torch.isfinite(loss)
        if not module.last:
            packet = module.next_packet(packet, inputs, output)
    assert output.shape == (4, 10)


def test_its_blocks_keep_the_factorys_initialisation(build_modules) -> None:
    """Module k holds the blocks one factory call makes from seed run.seed + k; its head is initialised as the
    papers' heads are."""
    config = tiny_config(NET, "local.modules=2", "local.partition=[1]", "run.seed=5")
    _, _, layout, modules = build_modules(config)
    for index, module in enumerate(modules):
        torch.manual_seed(5 + index)
        start, end = layout.ranges[index]
        expected = nn.Sequential(*list(user_networks.maps_then_vectors(3, 10, (32, 32)))[start:end])
        assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), module.body.state_dict().values()))
    conv = next(layer for layer in modules[0].head.modules() if isinstance(layer, nn.Conv2d))
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    assert abs(conv.weight.std().item() - (2.0 / fan_out) ** 0.5) < 0.2 * (2.0 / fan_out) ** 0.5


def test_a_list_of_blocks_and_the_shapes_of_a_real_forward() -> None:
    config = tiny_config("model.arch=user_networks:as_a_list", "local.modules=2")
    assert config.arch.units == 2
    net = FactoryNet("user_networks:maps_then_vectors", user_networks.maps_then_vectors,
                     dataset_spec(config.data, config.model))
    x = torch.randn(2, 3, 32, 32)
    for index in range(len(net)):
        x = net.build(index).eval()(x)
        assert tuple(x.shape[1:]) == net.shape(index)


@pytest.mark.parametrize("arch, needle", [
    ("user_networks", "vit_small, 'package.module:factory' (your own network)"),
    ("no_such_module_here:build", "module 'no_such_module_here' does not import (ModuleNotFoundError"),
    ("user_networks:missing", "module 'user_networks' has no callable 'missing'"),
    ("user_networks:NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ("user_networks:raises", "the factory raised ValueError: no such width when called as factory(in_channels=3"),
    ("user_networks:not_a_network", "the factory returned 3; it must return an nn.Sequential"),
    ("user_networks:holds_a_number", "the factory returned a sequence holding a int"),
    ("user_networks:broken_chain", "user_networks:broken_chain: block 1 (Sequential) does not take the output of "
                                   "block 0 (maps of shape [8, 32, 32])"),
    ("user_networks:no_logits", "the last block returns maps of shape [8, 32, 32], not the logits of the 10 classes"),
    ("a b:c", "is not 'package.module:factory'"),
])
def test_a_bad_factory_is_one_line_naming_it(arch: str, needle: str) -> None:
    with pytest.raises(BadInput) as caught:
        tiny_config(f"model.arch={arch}")
    message = str(caught.value)
    assert needle in message and "\n" not in message, message


def test_cuts_of_a_flat_network_are_checked() -> None:
    with pytest.raises(BadInput, match=r"cut \[1, 0\] is out of range; cuts are block indices 0..3"):
        tiny_config(NET, "local.modules=2", "local.partition=[[1, 0]]")
    with pytest.raises(BadInput, match=r"cut 4 is out of range"):
        tiny_config(NET, "local.modules=2", "local.partition=[4]")
    with pytest.raises(BadInput, match="strictly increasing"):
        tiny_config(NET, "local.modules=3", "local.partition=[2, 1]")
    with pytest.raises(BadInput, match="K must be between 1 and 5"):
        tiny_config(NET, "local.modules=6")


def test_the_command_refuses_a_bad_factory_with_exit_2_and_writes_nothing(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["--set", "data.name=synthetic", "--set", "model.arch=user_networks:broken_chain",
                 "--set", f"run.out_dir={out}"])
    said = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(said) == 1 and said[0].startswith("error: user_networks:broken_chain: block 1")
    assert not out.exists()


def test_a_context_that_cannot_fit_a_vector_says_so() -> None:
    """Module 2's input is a vector: module 1's input map cannot be added to it."""
    config = tiny_config(NET, "local.modules=3", "local.partition=[1, 2]", "local.context=R1")
    layout = make_layout(config, dataset_spec(config.data, config.model), [1, 2])
    with pytest.raises(BadInput, match=r"ContSup cannot add maps of shape \[16, 16, 16\] to vectors of shape \[64\]"):
        build_module(config, layout, 2, CPU)
