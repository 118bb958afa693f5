"""pipeline.export: a run's complete checkpoint set as one inference network, equal bit for bit to the
run's own evaluation; torchvision's names and shapes; the torch.export program; the refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trained_runs import NETWORKS, TrainedRun, exported, small_synthetic, trained_run

import pipeline
from pipeline.config.loading import config_from_dict, load_config
from pipeline.data.loader import make_loaders
from pipeline.data.specs import folder_spec
from pipeline.errors import BadInput
from pipeline.model.inference import build_inference_net
from pipeline.model.network import make_layout
from pipeline.performance.profile import resolve_cuts
from pipeline.runtime import checkpoint
from pipeline.tools.export import export, main, read_run, run_config, torchvision_state_dict
from tests.model.networks.user_networks import MAPS_THEN_VECTORS

CPU = torch.device("cpu")
RUNS = {"contsup": "contsup_r1e", "infopro": "infopro_resnet50"}  # fixture -> trained_runs' name


@pytest.fixture(scope="module")
def contsup(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return trained_run(tmp_path_factory, "contsup_r1e")


@pytest.fixture(scope="module")
def infopro(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return trained_run(tmp_path_factory, "infopro_resnet50")


def evaluation_batches(trained: TrainedRun) -> list[torch.Tensor]:
    config = load_config(None, list(trained.overrides))
    _, test = make_loaders(config.data, config.model, config.run.seed, CPU)
    return [images for images, _ in test.batches(0)]


@pytest.mark.parametrize("name", ["contsup", "infopro"])
def test_the_exported_model_gives_the_runs_evaluation_logits_bit_for_bit(name: str, request: pytest.FixtureRequest,
                                                                         tmp_path: Path) -> None:
    trained: TrainedRun = request.getfixturevalue(name)
    model = pipeline.load_model(exported(request.getfixturevalue("tmp_path_factory"), RUNS[name]))
    assert not model.training
    with torch.no_grad():
        logits = [model(images) for images in evaluation_batches(trained)]
    assert len(logits) == len(trained.logits)
    for ours, runs in zip(logits, trained.logits):
        assert torch.equal(ours, runs)
    names = model.state_dict().keys()
    # the bodies, the last classifier and (ContSup) the context encoders; nothing of training
    assert not [key for key in names if ".decoder." in key or ".aux_head." in key]
    last = max(int(key.split(".")[1]) for key in names)
    assert [key for key in names if ".head." in key] == [key for key in names if key.startswith(f"stages.{last}.head.")]
    assert any(".image_encoder." in key for key in names) == (name == "contsup")
    assert any(".input_encoders." in key for key in names) == (name == "contsup")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["contsup", "infopro"])
def test_the_torch_export_program_gives_the_same_logits(name: str, request: pytest.FixtureRequest,
                                                        tmp_path: Path) -> None:
    trained: TrainedRun = request.getfixturevalue(name)
    written = exported(request.getfixturevalue("tmp_path_factory"), RUNS[name], "export")
    program = torch.export.load(str(written)).module()
    with torch.no_grad():
        for images, runs in zip(evaluation_batches(trained), trained.logits):
            assert (program(images) - runs).abs().max() <= 1e-6
        assert program(evaluation_batches(trained)[0][:1]).shape == trained.logits[0][:1].shape  # any batch size


@pytest.mark.slow
def test_a_segmentation_program_takes_whole_images_of_any_size(tmp_path_factory: pytest.TempPathFactory,
                                                               tmp_path: Path) -> None:
    trained = trained_run(tmp_path_factory, "deeplab")
    model = pipeline.load_model(exported(tmp_path_factory, "deeplab"))
    program = torch.export.load(str(exported(tmp_path_factory, "deeplab", "export"))).module()
    sizes = set()
    with torch.no_grad():
        for images in evaluation_batches(trained):  # padded to each batch's largest image: 40 x 60, 44 x 52
            logits = model(images)
            assert logits.shape[-2:] == images.shape[-2:]
            assert (program(images) - logits).abs().max() <= 1e-6
            sizes.add(tuple(images.shape[-2:]))
    assert len(sizes) == 2


@pytest.mark.slow
def test_the_program_runs_where_this_package_is_not_imported(contsup: TrainedRun, tmp_path: Path,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    written = exported(tmp_path_factory, "contsup_r1e", "export")
    images = evaluation_batches(contsup)[0]
    torch.save(images, tmp_path / "images.pt")
    script = ("import sys, torch; program = torch.export.load(sys.argv[1]).module(); "
              "logits = program(torch.load(sys.argv[2])); torch.save(logits, sys.argv[3]); "
              "assert not [name for name in sys.modules if name.split('.')[0] == 'pipeline']")
    done = subprocess.run([sys.executable, "-c", script, str(written), str(tmp_path / "images.pt"),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (torch.load(tmp_path / "logits.pt") - contsup.logits[0]).abs().max() <= 1e-6


# ---- the other network families -----------------------------------------------------------------------

def network_batches(trained: TrainedRun) -> list[torch.Tensor]:
    with small_synthetic():
        return evaluation_batches(trained)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_any_networks_model_file_gives_the_runs_evaluation_logits_bit_for_bit(
        name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    trained = trained_run(tmp_path_factory, name)
    model = pipeline.load_model(exported(tmp_path_factory, name))
    with torch.no_grad():
        logits = [model(images) for images in network_batches(trained)]
    assert len(logits) == len(trained.logits) > 0
    for ours, runs in zip(logits, trained.logits):
        assert torch.equal(ours, runs)
    names = model.state_dict().keys()
    assert any(".image_encoder." in key for key in names) == (name == "vit_tiny")  # R1E: the patch encoder
    assert any(".input_encoders." in key for key in names) == (name == "factory")  # K = 3, R1: module 1's input


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_any_networks_program_gives_the_same_logits(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    trained = trained_run(tmp_path_factory, name)
    program = torch.export.load(str(exported(tmp_path_factory, name, "export"))).module()
    with torch.no_grad():
        for images, runs in zip(network_batches(trained), trained.logits):
            assert (program(images) - runs).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny"])  # token features; maps go through the ResNets' ONNX test
def test_any_networks_onnx_file_gives_the_same_logits(name: str, tmp_path_factory: pytest.TempPathFactory,
                                                      tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    from onnx.reference import ReferenceEvaluator

    trained = trained_run(tmp_path_factory, name)
    graph = onnx.load(str(export(trained.out_dir, tmp_path / "model.onnx", "onnx")))
    onnx.checker.check_model(graph)
    evaluator = ReferenceEvaluator(graph)
    for images, runs in zip(network_batches(trained), trained.logits):
        (logits,) = evaluator.run(None, {"images": images.numpy()})
        assert (torch.from_numpy(logits) - runs).abs().max() <= 1e-4  # numpy's float32 sums in its own order


@pytest.mark.parametrize("name, family", [("vit_tiny", "vit"), ("vgg11_bn", "vgg"), ("factory", "factory")])
def test_torchvision_refuses_any_network_but_its_resnets_in_one_line(
        name: str, family: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    trained = trained_run(tmp_path_factory, name)
    arch = trained.summary["config"]["model"]["arch"]
    one_line_exit_2(capsys, [str(trained.out_dir), "--format", "torchvision", "--out", str(tmp_path / "tv.pth")],
                    f"--format torchvision writes torchvision's resnet / resnext only, and {arch} is a network of "
                    f"model.family = {family!r}; use --format model or export")
    assert not (tmp_path / "tv.pth").exists()


def test_a_factory_run_is_known_by_its_factory(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    trained = trained_run(tmp_path_factory, "factory")
    ((_, folder),) = checkpoint.complete_sets(trained.out_dir)[-1:]
    marker = checkpoint.read_marker(folder)
    assert marker is not None
    assert (marker["identity"]["arch"], marker["identity"]["family"]) == (MAPS_THEN_VECTORS, "factory")
    one_line_exit_2(capsys, [str(trained.out_dir), "--set", "model.arch=vgg11_bn", "--out", str(tmp_path / "m.pt")],
                    f"the config gives arch = 'vgg11_bn' but {folder} was trained with {MAPS_THEN_VECTORS!r}")


# ---- torchvision's layout -----------------------------------------------------------------------------

# Written from torchvision's definitions (torchvision/models/resnet.py): block kind, blocks per stage,
# ResNeXt's groups and width per group; and its documented parameter counts at 1000 classes.
TORCHVISION_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64, 11_689_512),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64, 25_557_032),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64, 44_549_160),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64, 60_192_808),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4, 25_028_904),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8, 88_791_336),
}


def batch_norm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def torchvision_layout(arch: str, classes: int) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet state dict keys in order, with their shapes: conv1, bn1, layer1..4, fc."""
    block, counts, groups, width_per_group, _ = TORCHVISION_ARCHS[arch]
    expansion = 1 if block == "basic" else 4
    names = {"conv1.weight": (64, 3, 7, 7), **batch_norm("bn1", 64)}
    inplanes = 64
    for stage, count in enumerate(counts, start=1):
        planes = 64 * 2 ** (stage - 1)
        for index in range(count):
            stride = 2 if stage > 1 and index == 0 else 1
            at = f"layer{stage}.{index}"
            if block == "basic":
                names |= {f"{at}.conv1.weight": (planes, inplanes, 3, 3), **batch_norm(f"{at}.bn1", planes),
                          f"{at}.conv2.weight": (planes, planes, 3, 3), **batch_norm(f"{at}.bn2", planes)}
            else:
                width = int(planes * (width_per_group / 64.0)) * groups
                names |= {f"{at}.conv1.weight": (width, inplanes, 1, 1), **batch_norm(f"{at}.bn1", width),
                          f"{at}.conv2.weight": (width, width // groups, 3, 3), **batch_norm(f"{at}.bn2", width),
                          f"{at}.conv3.weight": (planes * expansion, width, 1, 1),
                          **batch_norm(f"{at}.bn3", planes * expansion)}
            if stride != 1 or inplanes != planes * expansion:
                names |= {f"{at}.downsample.0.weight": (planes * expansion, inplanes, 1, 1),
                          **batch_norm(f"{at}.downsample.1", planes * expansion)}
            inplanes = planes * expansion
    return names | {"fc.weight": (classes, 512 * expansion), "fc.bias": (classes,)}


def test_the_written_layouts_are_torchvisions() -> None:
    """The expected layouts above hold torchvision's parameter counts and a few of its shapes, by hand."""
    for arch, (*_, parameters) in TORCHVISION_ARCHS.items():
        layout = torchvision_layout(arch, 1000)
        counted = sum(torch.Size(shape).numel() for key, shape in layout.items()
                      if not key.endswith(("running_mean", "running_var", "num_batches_tracked")))
        assert counted == parameters, arch
    assert len(torchvision_layout("resnet18", 1000)) == 122 and len(torchvision_layout("resnet50", 1000)) == 320
    assert torchvision_layout("resnet50", 1000)["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert torchvision_layout("resnext50_32x4d", 1000)["layer1.0.conv2.weight"] == (128, 4, 3, 3)
    assert torchvision_layout("resnext101_32x8d", 1000)["layer4.0.conv2.weight"] == (2048, 64, 3, 3)
    assert "layer1.0.downsample.0.weight" not in torchvision_layout("resnet18", 1000)


@pytest.mark.parametrize("arch", sorted(TORCHVISION_ARCHS))
def test_the_torchvision_format_has_torchvisions_names_and_shapes(arch: str) -> None:
    config = load_config(None, ["data.name=image_folder", "model.family=imagenet", f"model.arch={arch}",
                                "model.classes=1000", "local.modules=2"])
    spec = folder_spec(config.data, config.model, 1000)
    cuts = resolve_cuts(config, spec, CPU)
    state = torchvision_state_dict(build_inference_net(make_layout(config, spec, cuts), config.local), config, cuts)
    assert [(key, tuple(tensor.shape)) for key, tensor in state.items()] == list(torchvision_layout(arch, 1000).items())


def test_the_resnet50_runs_torchvision_export_holds_its_trained_weights(
        infopro: TrainedRun, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    written = export(infopro.out_dir, tmp_path / "resnet50.pth", "torchvision")
    state = torch.load(written, weights_only=True)
    assert {key: tuple(value.shape) for key, value in state.items()} == torchvision_layout("resnet50", 3)
    model = pipeline.load_model(exported(tmp_path_factory, "infopro_resnet50")).state_dict()
    last_block = max(int(key.split(".")[3]) for key in model if key.startswith("stages.1.body."))
    assert torch.equal(state["fc.weight"], model["stages.1.head.2.weight"])
    assert torch.equal(state["conv1.weight"], model["stages.0.body.0.0.weight"])
    assert torch.equal(state["layer4.2.bn3.running_var"], model[f"stages.1.body.{last_block}.bn3.running_var"])


def test_a_network_with_context_encoders_has_no_torchvision_form(contsup: TrainedRun, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="CIFAR ResNet"):
        export(contsup.out_dir, tmp_path / "tv.pth", "torchvision")
    config = load_config(None, ["data.name=image_folder", "model.family=imagenet", "model.arch=resnet18",
                                "model.classes=10", "local.modules=2", "local.context=R1E"])
    spec = folder_spec(config.data, config.model, 10)
    cuts = resolve_cuts(config, spec, CPU)
    with pytest.raises(BadInput, match="context encoders that feed later modules at inference"):
        torchvision_state_dict(build_inference_net(make_layout(config, spec, cuts), config.local), config, cuts)


def test_deeplab_v3_has_no_torchvision_form(seg_config_builder) -> None:
    from pipeline.data.specs import segmentation_spec

    config = seg_config_builder("local.modules=1", "local.context=R0", "data.crop=[32, 64]")  # any crop is refused
    spec = segmentation_spec(config.data, config.model)
    with pytest.raises(BadInput, match="torchvision's deeplabv3 has a 256-channel head"):
        torchvision_state_dict(build_inference_net(make_layout(config, spec, []), config.local), config, [])


# ---- bad input -----------------------------------------------------------------------------------------

def one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert "Traceback" not in err


def test_bad_run_folders_are_one_line(contsup: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "m.pt")]
    one_line_exit_2(capsys, [str(tmp_path), *out], "holds no checkpoints")
    copy = tmp_path / "copy"
    shutil.copytree(contsup.out_dir, copy)
    for _, folder in checkpoint.complete_sets(copy):
        (folder / checkpoint.MARKER).unlink()
    one_line_exit_2(capsys, [str(copy), *out], "holds only unfinished checkpoint sets")
    (step_folder,) = [path for path in checkpoint.checkpoints_dir(copy).iterdir()]
    one_line_exit_2(capsys, [str(step_folder), *out], "is an unfinished checkpoint set")
    one_line_exit_2(capsys, [str(contsup.out_dir), "--step", "99", *out], "has no complete set at --step 99")
    one_line_exit_2(capsys, [str(contsup.out_dir), "--set", "local.context=R0", *out],
                    "the config gives context = 'R0' but")
    assert not (tmp_path / "m.pt").exists()


def test_a_run_without_its_summary_needs_its_config(contsup: TrainedRun, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(contsup.out_dir, copy)
    (copy / "summary.json").unlink()
    one_line_exit_2(capsys, [str(copy), "--out", str(tmp_path / "m.pt")], "pass the config it was trained with")
    sets = [f"--set={item}" for item in contsup.overrides]
    assert main([str(copy), "--out", str(tmp_path / "m.pt"), *sets]) == 0
    assert torch.equal(read_run(copy, 0, None, list(contsup.overrides))[0](evaluation_batches(contsup)[0]),
                       contsup.logits[0])


def test_onnx_without_its_extra_is_one_line(contsup: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    finding = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name in ("onnx", "onnxscript") else finding(name, *rest))
    one_line_exit_2(capsys, [str(contsup.out_dir), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"],
                    "--format onnx needs the onnx extra")


@pytest.mark.slow
def test_the_onnx_file_gives_the_same_logits(contsup: TrainedRun, tmp_path: Path) -> None:
    """Where the onnx extra is installed (setup.cfg's dev extra has it): the file passes onnx's checker and
    onnx's reference evaluator gives the run's logits."""
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    from onnx.reference import ReferenceEvaluator

    graph = onnx.load(str(export(contsup.out_dir, tmp_path / "model.onnx", "onnx")))
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]  # the weights inside, no side file
    onnx.checker.check_model(graph)
    images = evaluation_batches(contsup)[0]
    (logits,) = ReferenceEvaluator(graph).run(None, {"images": images.numpy()})
    assert (torch.from_numpy(logits) - contsup.logits[0]).abs().max() <= 1e-5


def test_the_cli_writes_the_model(contsup: TrainedRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(contsup.out_dir), "--out", str(tmp_path / "model.pt")]) == 0
    assert "wrote" in capsys.readouterr().out
    model = pipeline.load_model(tmp_path / "model.pt")
    with torch.no_grad():
        assert torch.equal(model(evaluation_batches(contsup)[0]), contsup.logits[0])


def test_a_run_trained_before_the_rate_0_rule_stays_readable(tmp_path: Path) -> None:
    """The cosine rate-0 refusal guards training: a recorded 15-epoch cosine config still reads for export."""
    with pytest.raises(BadInput, match="cosine-step"):
        config_from_dict({"train": {"epochs": 15}})
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"train": {"epochs": 15, "schedule": "cosine"}}}))
    assert run_config(tmp_path, None, []).train.epochs == 15


@pytest.mark.parametrize("form", ["model", "torchvision", "export"])
def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(infopro: TrainedRun, tmp_path: Path, form: str,
                                                               capsys: pytest.CaptureFixture[str],
                                                               file_size_limit) -> None:
    """torch's zip writer reports a full disk as "unexpected pos": the line still names --out and the reason."""
    target = tmp_path / ("m.pt2" if form == "export" else "m.pt")
    with file_size_limit(16 * 1024):
        one_line_exit_2(capsys, [str(infopro.out_dir), "--format", form, "--out", str(target)],
                        f"--out {str(target)!r} cannot be written (file too large)")
    assert list(tmp_path.iterdir()) == []
