"""pipeline.model.pretrained: ImageNet backbones (torchvision, MMSegmentation V1c, this trainer's checkpoint
sets) loaded into the blocks each module owns, and one clear line for every file that does not fit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config.cuts import flat_to_cut
from pipeline.config.loading import load_config
from pipeline.config.validation import ineffective_keys
from pipeline.data.specs import dataset_spec
from pipeline.errors import BadInput
from pipeline.model.arch import resolve_arch
from pipeline.model.imagenet_resnet import ImageNetResNet
from pipeline.model.network import make_layout
from pipeline.model.pretrained import TORCHVISION, V1C, load_pretrained, read_backbone
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.runtime.run_order import Position
from pipeline.runtime.worker import make_worker
from pipeline.train import main

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
IMAGENET = ("model.family=imagenet", "model.arch=resnet18")
TORCHVISION_STEM = {"0": "conv1", "1": "bn1"}  # the stem block's conv and batch norm in torchvision's names


def backbone_blocks(arch: str, seed: int = 1, fill: bool = True) -> list[dict[str, torch.Tensor]]:
    """Each flat block's state of an ImageNet ``arch``, every tensor drawn at random (zeros: fill=False).

    The blocks are built on the meta device: only their names and shapes are taken.
    """
    net = ImageNetResNet(resolve_arch("imagenet", arch), 3, (32, 32))
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for index in range(len(net)):
        with torch.device("meta"):
            shapes = {name: (tensor.shape, tensor.dtype) for name, tensor in net.build(index).state_dict().items()}
        state = {}
        for name, (shape, dtype) in shapes.items():
            if dtype == torch.long:  # num_batches_tracked
                state[name] = torch.tensor(1000 + index)
            elif fill:
                # running_var must stay positive; every other tensor any value
                state[name] = torch.rand(shape, generator=generator) + 0.5 if name.endswith("running_var") \
                    else torch.randn(shape, generator=generator)
            else:
                state[name] = torch.zeros(shape)
        blocks.append(state)
    return blocks


def torchvision_keys(blocks: list[dict[str, torch.Tensor]], arch: str) -> dict[str, torch.Tensor]:
    """The flat blocks renamed to torchvision's state-dict keys, with its 1000-class fc."""
    spec = resolve_arch("imagenet", arch)
    state = {}
    for name, tensor in blocks[0].items():
        index, _, rest = name.partition(".")
        state[f"{TORCHVISION_STEM[index]}.{rest}"] = tensor
    for flat in range(1, len(blocks)):
        stage, block = flat_to_cut(flat, spec.blocks)
        for name, tensor in blocks[flat].items():
            state[f"layer{stage}.{block}.{name.replace('shortcut.', 'downsample.')}"] = tensor
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, spec.widths[-1]), torch.randn(1000)
    return state


@pytest.fixture(scope="module")
def resnet18():
    return backbone_blocks("resnet18")


@pytest.fixture
def saved(tmp_path, resnet18):
    """(path of a torchvision resnet18 .pth, its flat blocks); save(state) writes a variant."""
    def save(state: object, name: str = "resnet18.pth") -> Path:
        path = tmp_path / name
        torch.save(state, path)
        return path

    return save(torchvision_keys(resnet18, "resnet18")), save


def assert_blocks_equal(modules, ranges, blocks) -> None:
    for module, (start, end) in zip(modules, ranges):
        assert len(module.body) == end - start
        for offset, block in enumerate(module.body):
            own = block.state_dict()
            assert own.keys() == blocks[start + offset].keys()
            for name, tensor in own.items():
                assert torch.equal(tensor, blocks[start + offset][name]), (start + offset, name)


def without_body(module) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in module.state_dict().items() if not name.startswith("body.")}


def test_a_torchvision_file_fills_every_modules_own_blocks(saved, resnet18, make_config, build_modules):
    path, _ = saved
    config = make_config(*IMAGENET, "local.modules=2", f"model.pretrained='{path}'")
    _, _, layout, modules = build_modules(config)
    assert_blocks_equal(modules, layout.ranges, resnet18)
    # heads and decoders keep their seeded draws: the same as a build without the file
    _, _, _, plain = build_modules(make_config(*IMAGENET, "local.modules=2"))
    for loaded, fresh in zip(modules, plain):
        first, second = without_body(loaded), without_body(fresh)
        assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp"])
def test_wrapped_and_ddp_saves_read_as_the_bare_state_dict(wrap, saved, resnet18):
    path, save = saved
    state = torch.load(path, weights_only=True)
    if wrap == "ddp":
        path = save({f"module.{key}": value for key, value in state.items()}, "ddp.pth")
    elif wrap != "bare":
        path = save({wrap: state, "meta": {"epoch": 90}}, f"{wrap}.pth")
    backbone = read_backbone(str(path))
    assert backbone.layout == TORCHVISION and sorted(backbone.blocks) == list(range(len(resnet18)))
    for index, block in enumerate(resnet18):
        assert backbone.blocks[index].keys() == block.keys()
        assert all(torch.equal(backbone.blocks[index][name], tensor) for name, tensor in block.items())


def test_the_file_is_read_once_per_process(saved, make_config, build_modules, monkeypatch):
    path, _ = saved
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: reads.append(args[0]) or real_load(*args, **kwargs))
    config = make_config(*IMAGENET, "local.modules=3", f"model.pretrained='{path}'")
    build_modules(config)
    build_modules(config)
    assert reads == [path]


def test_a_v1c_file_maps_its_deep_stem_onto_one_sequential(saved, resnet18):
    _, save = saved
    state = {key: value for key, value in torchvision_keys(resnet18, "resnet18").items()
             if not key.startswith(("conv1.", "bn1."))}
    stem = {"stem.0.weight": torch.randn(32, 3, 3, 3), "stem.3.weight": torch.randn(32, 32, 3, 3),
            "stem.6.weight": torch.randn(64, 32, 3, 3)}
    for index, width in ((1, 32), (4, 32), (7, 64)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            stem[f"stem.{index}.{name}"] = torch.randn(width)
    backbone = read_backbone(str(save({**stem, **state}, "v1c.pth")))
    assert backbone.layout == V1C
    assert backbone.blocks[0].keys() == {key.removeprefix("stem.") for key in stem}
    assert all(torch.equal(backbone.blocks[0][key.removeprefix("stem.")], tensor) for key, tensor in stem.items())
    assert torch.equal(backbone.blocks[5]["conv2.weight"], resnet18[5]["conv2.weight"])
    assert backbone.file_key(0, "4.running_var") == "stem.4.running_var"


def test_a_v1c_file_into_torchvisions_stem_says_to_set_deep_stem(saved, resnet18, make_config, build_modules):
    _, save = saved
    state = {key: value for key, value in torchvision_keys(resnet18, "resnet18").items()
             if not key.startswith(("conv1.", "bn1."))}
    state["stem.0.weight"], state["stem.3.weight"] = torch.randn(32, 3, 3, 3), torch.randn(32, 32, 3, 3)
    path = save(state, "v1c.pth")
    needle = (r"stem.0.weight is \[32, 3, 3, 3\] in the file, \[64, 3, 7, 7\] in the model; "
              r"the file's stem is V1c's three 3x3 convs: set model.deep_stem = true")
    with pytest.raises(BadInput, match=needle) as caught:
        build_modules(make_config(*IMAGENET, "local.modules=2", f"model.pretrained='{path}'"))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory, config_builder):
    """The out_dir of a resnet18 run at K = 2 cut after layer2's first block (flat block 3), written by the
    trainer's own checkpoint code at step 5, its batch-norm statistics moved off their initial values."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    config = config_builder(*IMAGENET, "local.modules=2", "local.partition=[[2, 0]]", out_dir=out)
    spec = dataset_spec(config.data, config.model)
    cuts = resolve_cuts(config, spec, CPU)
    layout = make_layout(config, spec, cuts)
    identity = checkpoint.identity_of(config, cuts)
    position = Position(1, 5, 5)
    for index in range(2):
        worker = make_worker(config, layout, index, CPU)
        for layer in worker.module.body.modules():
            if isinstance(layer, nn.BatchNorm2d):
                assert layer.running_mean is not None
                layer.running_mean.normal_()
        checkpoint.save(out, worker, position, identity)
    checkpoint.commit(out, position, 2, identity, keep=2, config={}, schedule={})
    return out


def test_a_checkpoint_set_loads_under_other_cuts(checkpoint_run, make_config, build_modules):
    folder = checkpoint.find_set(checkpoint_run)
    saved = [torch.load(checkpoint.module_file(folder, module), weights_only=True)["state"]["module"]
             for module in range(2)]
    starts = (0, 4)  # module 1's body.0 is flat block 4
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for start, state in zip(starts, saved):
        for key, tensor in state.items():
            if key.startswith("body."):
                index, _, name = key.removeprefix("body.").partition(".")
                blocks.setdefault(start + int(index), {})[name] = tensor
    flat = [blocks[index] for index in range(len(blocks))]
    for where in (checkpoint_run, folder):  # a run's out_dir (its newest set) or the set itself
        config = make_config(*IMAGENET, "local.modules=3", f"model.pretrained='{where}'")
        _, _, layout, modules = build_modules(config)
        assert layout.ranges == [(0, 3), (3, 6), (6, 9)]
        assert_blocks_equal(modules, layout.ranges, flat)


def test_one_module_file_is_refused_with_its_folder_as_the_fix(checkpoint_run, make_config, build_modules):
    file = checkpoint.newest_module_file(checkpoint_run, 0)
    with pytest.raises(BadInput, match=r"one module's file of this trainer's checkpoint; pass its folder"):
        build_modules(make_config(*IMAGENET, f"model.pretrained='{file}'"))


def test_a_set_without_its_marker_is_refused(checkpoint_run, tmp_path, make_config, build_modules):
    folder = tmp_path / "step_1"
    for module in range(2):
        folder.mkdir(exist_ok=True)
        (folder / f"module_{module}.pt").write_bytes(checkpoint.newest_module_file(checkpoint_run, module).read_bytes())
    with pytest.raises(BadInput, match=r"without its COMPLETE marker"):
        build_modules(make_config(*IMAGENET, f"model.pretrained='{folder}'"))


def test_a_resnet50_file_into_a_resnet101_names_both_and_the_setting(saved, make_config):
    _, save = saved
    path = save(torchvision_keys(backbone_blocks("resnet50", fill=False), "resnet50"), "resnet50.pth")
    config = make_config("model.family=imagenet", "model.arch=resnet101", f"model.pretrained='{path}'")
    # the network's structure is compared before any block: no resnet101 need be built
    with pytest.raises(BadInput, match=r"holds a resnet50 \(torchvision's ResNet layout\) but model.arch = "
                                       r"'resnet101' is a resnet101; set model.arch = 'resnet50'"):
        load_pretrained(nn.Sequential(), config.model, config.arch, 0, 0)


def test_a_wrong_arch_ends_the_run_with_exit_2_and_one_line(saved, tmp_path, capsys):
    path, _ = saved
    code = main(["--set", "data.name=synthetic", "--set", "model.family=imagenet", "--set", "model.arch=resnet34",
                 "--set", "data.batch_size=8", "--set", "train.max_steps=1", "--set", "run.device=cpu",
                 "--set", f"model.pretrained='{path}'", "--set", f"run.out_dir='{tmp_path / 'run'}'"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: model.pretrained = ") and "holds a resnet18" in err and "resnet34" in err


def test_a_truncated_file_is_one_line(saved, make_config, build_modules):
    path, save = saved
    cut = save(b"", "truncated.pth")
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadInput, match=r"truncated.pth' is not a readable checkpoint \(") as caught:
        build_modules(make_config(*IMAGENET, f"model.pretrained='{cut}'"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("change, needle", [
    (lambda state: state.update({"aux_classifier.0.weight": torch.zeros(1)}),
     "holds keys no ResNet backbone has: aux_classifier.0.weight; pass an ImageNet classification checkpoint"),
    (lambda state: state.pop("layer3.1.bn2.running_var"), "lacks layer3.1.bn2.running_var"),
    (lambda state: state.update({"layer2.0.conv1.weight": torch.zeros(128, 64, 1, 1)}),
     "layer2.0.conv1.weight is [128, 64, 1, 1] in the file, [128, 64, 3, 3] in the model"),
    (lambda state: state.update({"layer1.0.downsample.0.weight": torch.zeros(64, 64, 1, 1)}),
     "has layer1.0.downsample.0.weight that the model has no place for"),
], ids=["foreign-key", "missing-key", "shape", "unexpected-in-block"])
def test_a_file_that_does_not_fit_is_one_line_naming_the_key(change, needle, saved, resnet18, make_config,
                                                             build_modules):
    _, save = saved
    state = torchvision_keys(resnet18, "resnet18")
    change(state)
    path = save(state, "changed.pth")
    with pytest.raises(BadInput) as caught:
        build_modules(make_config(*IMAGENET, "local.modules=2", f"model.pretrained='{path}'"))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_what_is_not_a_state_dict_is_refused(saved, make_config, build_modules):
    _, save = saved
    for name, payload, needle in (("list.pth", [1, 2], "holds a list, not a state dict"),
                                  ("optimizer.pth", {"optimizer": torch.zeros(2)},
                                   "holds no ResNet backbone (its first keys: optimizer)")):
        path = save(payload, name)
        with pytest.raises(BadInput, match=re.escape(needle)):
            build_modules(make_config(*IMAGENET, f"model.pretrained='{path}'"))


def test_a_missing_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "resnet101.pth"
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--set", "model.family=imagenet",
                           "--set", "model.arch=resnet101", "--set", f"model.pretrained='{missing}'", "--check"],
                          cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: model.pretrained = {str(missing)!r} does not exist; give an ImageNet checkpoint: a torchvision or "
        "MMSegmentation ResNet .pth file, or a checkpoint folder or out_dir of this trainer (docs/segmentation.md)"]


def test_a_cifar_network_is_refused(saved):
    path, _ = saved
    with pytest.raises(BadInput, match=r"model.pretrained loads ImageNet ResNets, not the CIFAR resnet8; set "
                                       r"model.family = 'imagenet'"):
        load_config(None, ["data.name=synthetic", "model.arch=resnet8", f"model.pretrained='{path}'"])


def test_a_resumed_run_skips_the_file_and_says_so(saved, make_config, build_modules, tmp_path):
    path, _ = saved
    config = make_config(*IMAGENET, f"model.pretrained='{path}'", f"run.resume='{tmp_path}'")
    assert "model.pretrained has no effect with run.resume set (the checkpoint restores every weight)" in \
        ineffective_keys(config)
    _, _, _, (resumed,) = build_modules(config)
    _, _, _, (plain,) = build_modules(make_config(*IMAGENET))
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), plain.state_dict().values()))


def test_a_v1c_resnet50_file_fills_deeplabv3s_deep_stem_and_dilated_blocks(saved, seg_config_builder,
                                                                           build_modules):
    """MMSegmentation's V1c backbone into DeepLab-V3 at K = 2: dilation changes no weight's shape."""
    _, save = saved
    blocks = backbone_blocks("resnet50", seed=2)
    state = {key: value for key, value in torchvision_keys(blocks, "resnet50").items()
             if not key.startswith(("conv1.", "bn1."))}
    generator = torch.Generator().manual_seed(3)
    stem: dict[str, torch.Tensor] = {}
    for conv, norm, shape in ((0, 1, (32, 3, 3, 3)), (3, 4, (32, 32, 3, 3)), (6, 7, (64, 32, 3, 3))):
        stem[f"{conv}.weight"] = torch.randn(shape, generator=generator)
        for name in ("weight", "bias", "running_mean"):
            stem[f"{norm}.{name}"] = torch.randn(shape[0], generator=generator)
        stem[f"{norm}.running_var"] = torch.rand(shape[0], generator=generator) + 0.5
        stem[f"{norm}.num_batches_tracked"] = torch.tensor(7)
    path = save({**{f"stem.{key}": value for key, value in stem.items()}, **state}, "resnet50_v1c.pth")
    config = seg_config_builder("model.arch=deeplabv3_resnet50", "model.deep_stem=true", "local.modules=2",
                                f"model.pretrained={str(path)!r}", "data.crop=[32, 64]")  # weights fit any crop
    _, _, layout, modules = build_modules(config)
    assert_blocks_equal(modules, layout.ranges, [stem, *blocks[1:]])
    assert modules[0].body[0][3].dilation == (1, 1) and modules[1].body[-1].conv2.dilation == (4, 4)
