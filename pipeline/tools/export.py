"""python -m pipeline.export RUN_DIR [--step N] --out FILE [--format FORMAT] [--config FILE] [--set ...]

The trained network of a run as one ordinary model: the module bodies in order, ContSup's context
encoders and the last module's classifier, from a complete checkpoint set (no local heads, decoders
or optimizer state). Formats: model (this package's file: pipeline.load_model, pipeline.evaluate,
pipeline.predict), torchvision (a state dict that torchvision's resnet / resnext takes strictly),
export (a torch.export program, .pt2, that runs without this package) and onnx (with the onnx extra).
docs/export.md has the details.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config.loading import config_from_dict, load_config
from pipeline.config.schema import Config, DataConfig, ModelConfig
from pipeline.data.image_file import evaluation_preprocess
from pipeline.data.image_folder import class_names
from pipeline.data.specs import DatasetSpec, dataset_spec, folder_root, folder_spec
from pipeline.errors import BadInput, clip
from pipeline.model.inference import InferenceNet, build_inference_net, network_identity, stage_key
from pipeline.model.local_module import LocalModule
from pipeline.model.network import make_layout
from pipeline.model.partition import module_ranges
from pipeline.model.pretrained import resnet_key
from pipeline.model.resnet import Classifier
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import save_tensors
from pipeline.tools.model_file import Recipe, save_model, write

FORMATS = ("model", "torchvision", "export", "onnx")
ONNX_EXTRA = ("onnx", "onnxscript")  # torch's ONNX exporter needs both (setup.cfg's onnx extra)
_EXAMPLE_BATCH = 2  # torch.export traces at a batch of 2 (a batch of 1 would be specialised) and keeps it dynamic


def _run_problem(path: Path, problem: str, fix: str = "pass a run's out_dir (it holds checkpoints/step_<N>/) or "
                                                     "one complete set in it") -> BadInput:
    return BadInput(f"{clip(str(path), 200)!r} {problem}; {fix}")


def complete_set(path: Path, step: int) -> Path:
    """The complete checkpoint set that ``path`` names: a set folder, or a run's out_dir (with ``step``: the
    set of that step, else the newest)."""
    if path.is_dir() and ((path / checkpoint.MARKER).exists() or any(path.glob("module_*.pt"))):  # a set folder
        if checkpoint.read_marker(path) is None:
            raise _run_problem(path, f"is an unfinished checkpoint set (no {checkpoint.MARKER} marker: the run "
                                     "stopped while writing it)", "pass the run's out_dir for its newest complete set")
        return path
    if not path.is_dir():
        raise _run_problem(path, "is not a folder")
    sets = checkpoint.complete_sets(path)
    if not sets:
        unfinished = checkpoint.checkpoints_dir(path).is_dir() and any(checkpoint.checkpoints_dir(path).iterdir())
        problem = (f"holds only unfinished checkpoint sets (none has its {checkpoint.MARKER} marker)" if unfinished
                   else "holds no checkpoints")
        raise _run_problem(path, problem, "export a run that saved a complete set (at an epoch end or when it "
                                          "stopped), or resume this one to write one")
    if step == 0:
        return sets[-1][1]
    for saved, folder in sets:
        if saved == step:
            return folder
    raise _run_problem(path, f"has no complete set at --step {step} (complete: {[saved for saved, _ in sets]})",
                       "choose one of those steps, or leave --step out for the newest")


def run_config(run_dir: Path, config_path: str | None, overrides: list[str]) -> Config:
    """The run's config: --config (with --set); else the one its summary.json recorded (with --set); a run
    that did not finish has none: then the defaults with --set, as pipeline.train reads them."""
    if config_path is not None:
        return load_config(config_path, overrides, training=False)
    summary = run_dir / "summary.json"
    if not summary.is_file():
        if overrides:
            return load_config(None, overrides, training=False)
        raise BadInput(f"{clip(str(run_dir), 200)} has no summary.json (the run did not finish) to read its config "
                       f"from; pass the config it was trained with: --config FILE [--set ...]")
    try:
        raw = json.loads(summary.read_text())["config"]
        if not isinstance(raw, dict):
            raise TypeError("config is not a table")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInput(f"{clip(str(summary), 200)} cannot give the run's config ({type(err).__name__}: "
                       f"{clip(str(err), 80)}); pass the config it was trained with: --config FILE "
                       f"[--set ...]") from None
    return config_from_dict(trained_config(raw), overrides, training=False)


def trained_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A run's config tables as an export keeps them: model.pretrained is spent (its weights were trained
    on, and the file need not exist where the model is used), run.resume likewise."""
    tables = {table: dict(values) if isinstance(values, dict) else values for table, values in raw.items()}
    tables.setdefault("model", {})["pretrained"] = ""
    tables.setdefault("run", {})["resume"] = ""
    return tables


def data_spec(data: DataConfig, model: ModelConfig) -> tuple[DatasetSpec, list[str] | None]:
    """The dataset spec the network was built for, and its class names where the dataset has them (an image
    folder's class folders; without the folder, model.classes alone)."""
    if data.name != "image_folder":
        return dataset_spec(data, model), None
    root = folder_root(data)
    if model.classes and not root.is_dir():
        return folder_spec(data, model, model.classes), None
    names = list(class_names(root))
    return folder_spec(data, model, len(names)), names


def check_identity(folder: Path, identity: dict[str, Any], config: Config, cuts: list[int]) -> None:
    """The config must build the network the set was trained as (what of it the marker records)."""
    ours = network_identity(config.arch, config.data.name, config.local, config.model, cuts)
    for key, value in ours.items():
        if key in identity and identity[key] != value:
            raise BadInput(f"the config gives {key} = {value!r} but {folder} was trained with "
                           f"{identity[key]!r}; pass the config the run was trained with (--config, --set)")


def read_run(path: str | Path, step: int = 0, config_path: str | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> tuple[InferenceNet, Recipe, Config]:
    """The inference network of a run's complete checkpoint set (eval mode, CPU), its recipe and config."""
    folder = complete_set(Path(path), step)
    run_dir = folder.parent.parent
    marker = checkpoint.read_marker(folder)
    identity = marker.get("identity") if marker is not None else None
    if marker is None or not isinstance(identity, dict) or not isinstance(identity.get("cuts"), list):
        raise _run_problem(folder, f"has a damaged {checkpoint.MARKER} marker (no identity or cuts)")
    cuts = [int(cut) for cut in identity["cuts"]]
    config = run_config(run_dir, config_path, list(overrides))
    check_identity(folder, identity, config, cuts)
    spec, names = data_spec(config.data, config.model)
    net = build_inference_net(make_layout(config, spec, cuts), config.local)
    state: dict[str, torch.Tensor] = {}
    for index, module in enumerate(net.stages):
        weights = checkpoint.module_weights(folder, index)
        for name in module.state_dict():
            if name not in weights:
                raise BadInput(f"{checkpoint.module_file(folder, index)} lacks {name} that module {index} of "
                               f"this network has; pass the config the run was trained with (--config, --set)")
            state[stage_key(index, name)] = weights[name]
    try:
        net.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise BadInput(f"{folder} does not fit the config's network ({clip(' '.join(str(err).split()), 200)}); "
                       f"pass the config the run was trained with (--config, --set)") from err
    recipe = Recipe(trained_config(config.to_dict()), spec, cuts, int(marker.get("step", 0)), names,
                    evaluation_preprocess(config.data, spec))
    return net.eval(), recipe, config


def torchvision_state_dict(net: InferenceNet, config: Config, cuts: list[int]) -> dict[str, torch.Tensor]:
    """The network under torchvision's resnet / resnext keys (conv1, bn1, layer<s>.<b>..., fc)."""
    arch = config.arch
    if arch.family not in ("imagenet", "segmentation"):
        what = "a CIFAR ResNet" if arch.family == "cifar" else f"a network of model.family = {arch.family!r}"
        raise BadInput(f"--format torchvision writes torchvision's resnet / resnext only, and {config.model.arch} is "
                       f"{what}; use --format model or export")
    if arch.family == "segmentation":
        raise BadInput(f"--format torchvision: {config.model.arch}'s decode head is MMSegmentation's (ASPP of 512 "
                       f"channels and a 3x3 bottleneck), torchvision's deeplabv3 has a 256-channel head with a 1x1 "
                       f"projection, so its classifier.* cannot take it; use --format model or export (docs/export.md)")
    stages = cast(list[LocalModule], list(net.stages))
    if any(module.image_encoder is not None or len(module.input_encoders) for module in stages):
        raise BadInput(f"--format torchvision: local.context = {config.local.context!r} adds context encoders "
                       f"that feed later modules at inference, and torchvision's resnet has no place for them; use "
                       f"--format model or export")
    ranges, blocks = module_ranges(cuts, arch.units), arch.blocks
    assert blocks is not None, "an ImageNet ResNet's cuts are [stage, block]"
    state: dict[str, torch.Tensor] = {}
    for (start, _), module in zip(ranges, stages):
        for name, tensor in module.body.state_dict().items():
            position, _, inner = name.partition(".")
            state[resnet_key(start + int(position), inner, blocks)] = tensor
    head = stages[-1].head
    assert isinstance(head, Classifier)
    linear = head[-1]  # pool, flatten, linear: torchvision's fc
    assert isinstance(linear, nn.Linear)
    for name, tensor in linear.state_dict().items():
        state[f"fc.{name}"] = tensor
    return state


def example_input(spec: DatasetSpec) -> torch.Tensor:
    return torch.zeros(_EXAMPLE_BATCH, spec.channels, *spec.image_shape)


def export_program(net: InferenceNet, spec: DatasetSpec) -> torch.export.ExportedProgram:
    """The network as a torch.export program of ATen operations, its batch dynamic; a segmentation net's
    height and width too (it evaluates whole images of any size)."""
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if spec.dense:
        dims |= {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}  # export finds the sizes the net allows
    with torch.no_grad():
        return torch.export.export(net, (example_input(spec),), dynamic_shapes=(dims,))


def require_onnx() -> None:
    if any(importlib.util.find_spec(name) is None for name in ONNX_EXTRA):
        raise BadInput("--format onnx needs the onnx extra, which is not installed: pip install -e '.[onnx]' "
                       "(onnx and onnxscript), or use --format export")


def export_onnx(net: InferenceNet, spec: DatasetSpec, out: Path) -> None:
    program = export_program(net, spec)
    # external_data=False: the weights inside the one file (a side file would be named after the temporary)
    write(out, lambda temporary: torch.onnx.export(program, (example_input(spec),), str(temporary),
                                                   dynamo=True, verbose=False, external_data=False))


def export(path: str | Path, out: str | Path, fmt: str = "model", step: int = 0, config_path: str | None = None,
           overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Write the run's network to ``out`` in ``fmt``; returns the path written."""
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()  # before the run is read: a missing extra is known at once
    net, recipe, config = read_run(path, step, config_path, overrides)
    target = Path(out)
    if fmt == "model":
        return save_model(target, net, recipe)
    if fmt == "torchvision":
        state = torchvision_state_dict(net, config, recipe.cuts)
        write(target, lambda temporary: save_tensors(state, temporary))
    elif fmt == "export":
        program = export_program(net, recipe.spec)
        write(target, lambda temporary: _save_program(program, temporary))
    else:
        export_onnx(net, recipe.spec, target)
    return target


def _save_program(program: Any, temporary: Path) -> None:
    """torch.export.save into memory, then one Python write: on a full disk torch's writer, given a
    file, throws from its destructor and aborts the process (torch 2.13); a Python write raises the
    OSError."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    temporary.write_bytes(buffer.getvalue())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("run", metavar="RUN_DIR", help="a run's out_dir (its newest complete checkpoint set) or a "
                                                      "set folder RUN_DIR/checkpoints/step_<N>")
    parser.add_argument("--step", type=int, default=0, help="the complete set of this step (0: the newest)")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the model")
    parser.add_argument("--format", default="model", choices=FORMATS, help="what to write")
    parser.add_argument("--config", help="the TOML the run was trained with (default: the config its summary.json "
                                         "recorded)")
    add_set_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        started = time.perf_counter()
        written = export(args.run, args.out, args.format, args.step, args.config, args.set)
        size = written.stat().st_size / 2**20
        print(f"wrote {written} ({args.format}, {size:.1f} MiB, {time.perf_counter() - started:.1f} s)")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
