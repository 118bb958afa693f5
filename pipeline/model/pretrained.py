"""model.pretrained: an ImageNet checkpoint's backbone, loaded into the blocks each module owns.

Three layouts are read, each mapped onto the flat block list (block 0 = the stem, then
layer1 .. layer4's residual blocks; names inside a block are this project's):
- torchvision's ResNets: conv1 / bn1 (the 7x7 stem), layer<s>.<b>.{conv,bn}<n>, downsample.{0,1};
- MMSegmentation's (mmcv's) ResNet-V1c: the same blocks under the deep stem stem.{0,1,3,4,6,7},
  three conv + batch-norm pairs numbered as one Sequential (conv, bn, relu) x 3, max pool;
- this trainer's checkpoints: a complete set checkpoints/step_<N>/ or a run's out_dir (its
  newest complete set); each module_<k>.pt holds body.<i> for the blocks after cut k - 1, and
  the cuts are in its identity.
A classifier (torchvision's and V1c's fc.*, the local heads, decoders and context encoders of a
checkpoint set) has no place in another network and is dropped; any other key the backbone has no
place for, a key of the backbone's blocks the file lacks, or a shape that differs is an error.
The file is read once per process; each module then copies in only its own blocks.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import torch
from torch import nn

from pipeline.config.cuts import cut_to_flat, stage_and_block
from pipeline.config.schema import ModelConfig
from pipeline.errors import BadInput, clip
from pipeline.model.arch import IMAGENET_ARCHS, ArchSpec, Family, resolve_arch
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.partition import module_ranges
from pipeline.runtime import checkpoint

TORCHVISION = "torchvision's ResNet layout"
V1C = "MMSegmentation's ResNet-V1c layout"
OWN = "this trainer's checkpoint"

# Stem names in a file -> names inside the stem block (an nn.Sequential: conv, bn, relu, ...).
_TORCHVISION_STEM = {"conv1": "0", "bn1": "1"}
_V1C_STEM = {f"stem.{index}": str(index) for index in (0, 1, 3, 4, 6, 7)}
_LAYER = re.compile(r"layer([1-4])\.(\d+)\.(.+)")
_CLASSIFIER = re.compile(r"fc\.(weight|bias)")
_BODY = re.compile(r"body\.(\d+)\.(.+)")
_DDP_PREFIX = "module."
_WRAPPERS = ("state_dict", "model")  # mmcv / Lightning and several training scripts nest the weights
_SHOWN = 3  # offending keys named in a message
_OPTIONAL = "num_batches_tracked"  # torchvision's older files lack it; the model keeps its own count


@dataclass(frozen=True)
class Structure:
    """What decides a backbone's tensor shapes: block kind, blocks per stage, ResNeXt grouping."""

    block: str
    blocks: tuple[int, ...]
    groups: int
    width_per_group: int

    def describe(self) -> str:
        for name in IMAGENET_ARCHS:
            if structure_of(resolve_arch("imagenet", name)) == self:
                return name
        return f"ResNet of {self.block} blocks {list(self.blocks)} per stage"


def structure_of(arch: ArchSpec) -> Structure:
    return Structure(arch.block, arch.blocks, arch.groups, arch.width_per_group)


@dataclass(frozen=True)
class Backbone:
    """A checkpoint's backbone: flat block index -> {name inside the block: tensor}."""

    path: str
    layout: str
    structure: Structure
    blocks: dict[int, dict[str, torch.Tensor]]

    def file_key(self, block: int, name: str) -> str:
        """The file's own name of ``name`` in flat block ``block``, for messages."""
        if self.layout == OWN:
            return f"block {block} {name}"
        return resnet_key(block, name, self.structure.blocks, _V1C_STEM if self.layout == V1C else _TORCHVISION_STEM)


def resnet_key(block: int, name: str, blocks: tuple[int, ...], stem: dict[str, str] = _TORCHVISION_STEM) -> str:
    """The name a ResNet state dict (torchvision's, or with ``stem`` V1c's) gives ``name`` inside flat block
    ``block`` of a network of ``blocks`` per stage: the inverse of the mapping this module reads."""
    if block == 0:
        index, _, rest = name.partition(".")
        prefix = next((key for key, value in stem.items() if value == index), f"stem.{index}")
        return f"{prefix}.{rest}"
    stage, within = stage_and_block(block, blocks)
    inner = "downsample." + name.removeprefix("shortcut.") if name.startswith("shortcut.") else name
    return f"layer{stage}.{within}.{inner}"


def _bad(path: str | Path, problem: str, fix: str) -> BadInput:
    return BadInput(f"model.pretrained = {clip(str(path), 200)!r} {problem}; {fix}")


_ACCEPTED = ("pass torchvision's ResNet state dict (conv1.weight, layer1.0.conv1.weight, ...), MMSegmentation's "
             "ResNet-V1c one (stem.0.weight, ...) or a checkpoint folder / out_dir of this trainer "
             "(docs/segmentation.md)")


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated, corrupt or foreign file
        raise _bad(path, f"is not a readable checkpoint ({type(err).__name__}: {checkpoint.load_error_line(err)})",
                   _ACCEPTED) from err


def _state_dict(path: Path, payload: Any) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save'd state dict, unwrapped and without DDP's module. prefix."""
    if isinstance(payload, dict) and payload.get("format") == checkpoint.FORMAT and "state" in payload:
        raise _bad(path, "is one module's file of this trainer's checkpoint",
                   "pass its folder (OUT_DIR/checkpoints/step_<N>) or the run's out_dir, so every module's "
                   "blocks and the cuts are read")
    if isinstance(payload, dict):
        for wrapper in _WRAPPERS:
            if isinstance(payload.get(wrapper), dict):
                payload = payload[wrapper]
                break
    if not isinstance(payload, dict) or not payload or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in payload.items()):
        what = f"a {type(payload).__name__}"
        if isinstance(payload, dict):
            what = f"a table of {_listed(sorted(map(str, payload)))}" if payload else "an empty table"
        raise _bad(path, f"holds {what}, not a state dict of tensors", _ACCEPTED)
    prefix = _DDP_PREFIX if all(key.startswith(_DDP_PREFIX) for key in payload) else ""
    return {key.removeprefix(prefix): value for key, value in payload.items()}


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _read_state_dict(path: Path) -> Backbone:
    state = _state_dict(path, _load(path))
    layout = V1C if any(key.startswith("stem.") for key in state) else TORCHVISION
    stem = _V1C_STEM if layout == V1C else _TORCHVISION_STEM
    layers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    stem_state: dict[str, torch.Tensor] = {}
    foreign = []
    for key, value in state.items():
        if _CLASSIFIER.fullmatch(key):
            continue  # ImageNet's 1000-class classifier: nothing in a segmentation or other net takes it
        match = _LAYER.fullmatch(key)
        if match is not None:
            name = match.group(3)
            if name.startswith("downsample."):
                name = "shortcut." + name.removeprefix("downsample.")
            layers.setdefault((int(match.group(1)), int(match.group(2))), {})[name] = value
            continue
        prefix, _, rest = key.rpartition(".")
        if prefix in stem and rest:
            stem_state[f"{stem[prefix]}.{rest}"] = value
            continue
        foreign.append(key)
    if not layers and not stem_state:
        raise _bad(path, f"holds no ResNet backbone (its first keys: {_listed(sorted(state))})", _ACCEPTED)
    if foreign:
        raise _bad(path, f"holds keys no ResNet backbone has: {_listed(sorted(foreign))}",
                   "pass an ImageNet classification checkpoint (its fc.* classifier is dropped), not a whole "
                   "detection or segmentation model")
    blocks = tuple(max((block + 1 for stage, block in layers if stage == number), default=0) for number in range(1, 5))
    kind = "bottleneck" if any("conv3.weight" in names for names in layers.values()) else "basic"
    groups, width_per_group = 1, 64
    first = layers.get((1, 0), {}).get("conv2.weight")
    if kind == "bottleneck" and first is not None and first.dim() == 4 and first.shape[1] > 0:
        groups = max(first.shape[0] // first.shape[1], 1)
        width_per_group = first.shape[0] // groups
    structure = Structure(kind, blocks, groups, width_per_group)
    flat: dict[int, dict[str, torch.Tensor]] = {0: stem_state} if stem_state else {}
    for (stage, block), names in layers.items():
        flat[cut_to_flat([stage, block], blocks)] = names
    return Backbone(str(path), layout, structure, flat)


def _set_folder(path: Path) -> Path:
    """The complete checkpoint set that ``path`` (a set folder or a run's out_dir) names."""
    if (path / checkpoint.MARKER).exists():
        return path
    if checkpoint.checkpoints_dir(path).is_dir():
        sets = checkpoint.complete_sets(path)
        if sets:
            return sets[-1][1]
        raise _bad(path, f"has no complete checkpoint set in {checkpoint.checkpoints_dir(path)}",
                   "pass the out_dir of a run that wrote one (at an epoch end or when it stopped)")
    if any(path.glob("module_*.pt")):
        raise _bad(path, f"is a checkpoint set without its {checkpoint.MARKER} marker (a run stopped while writing "
                         "it)", "pass a complete set, or the run's out_dir for its newest complete one")
    raise _bad(path, "is a folder but neither a checkpoint set (OUT_DIR/checkpoints/step_<N>) nor a run's out_dir",
               _ACCEPTED)


def _read_checkpoint_set(path: Path) -> Backbone:
    folder = _set_folder(path)
    marker = checkpoint.read_marker(folder)
    identity = marker.get("identity") if marker is not None else None
    modules = marker.get("modules") if marker is not None else None
    if (not isinstance(identity, dict) or not isinstance(modules, list) or not isinstance(identity.get("cuts"), list)
            or len(identity["cuts"]) != len(modules) - 1):
        raise _bad(folder, f"has a damaged {checkpoint.MARKER} marker (no modules, cuts or identity)",
                   "pass another complete set, or the out_dir of a run of this trainer")
    arch, family = identity.get("arch"), identity.get("family")
    if family == "cifar":
        raise _bad(folder, f"holds a CIFAR {arch}, not an ImageNet network",
                   "pass a checkpoint of a run with model.family = 'imagenet' (or 'segmentation')")
    try:
        if family not in get_args(Family):
            raise BadInput(f"model.family {family!r} is unknown")
        spec = resolve_arch(cast(Family, family), str(arch))
    except BadInput as err:
        raise _bad(folder, f"holds a network this version does not know ({family} {arch})", _ACCEPTED) from err
    ranges = module_ranges(identity["cuts"], spec.units)
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for module in modules:
        file = checkpoint.module_file(folder, module)
        payload = _load(file)
        payload = payload if isinstance(payload, dict) else {}
        state = payload.get("state")
        weights = state.get("module") if isinstance(state, dict) else None
        if payload.get("module_index") != module or not isinstance(weights, dict):
            raise _bad(file, f"is not module {module}'s file of this trainer's checkpoint",
                       "pass a complete set written by this trainer, or its out_dir")
        start = ranges[module][0]
        for key, value in weights.items():
            match = _BODY.fullmatch(key)
            # Local heads, decoders and context encoders belong to that run's cut; the blocks
            # past the backbone (a segmentation run's decode heads) to its task.
            if match is not None and start + int(match.group(1)) < spec.units:
                blocks.setdefault(start + int(match.group(1)), {})[match.group(2)] = value
    return Backbone(str(folder), OWN, structure_of(spec), blocks)


_CACHE: dict[tuple[str, int, int], Backbone] = {}
_READING = threading.Lock()  # modules built on threads of one process share one read


def read_backbone(path: str) -> Backbone:
    """The backbone in ``path``, read once per process (the newest path only is kept)."""
    where = Path(path)
    stat = os.stat(where)
    key = (str(where.resolve()), stat.st_mtime_ns, stat.st_size)
    with _READING:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = _read_checkpoint_set(where) if where.is_dir() else _read_state_dict(where)
        return _CACHE[key]


def _stem_hint(backbone: Backbone, stem: nn.Module) -> str:
    deep = "3.weight" in stem.state_dict()  # the V1c stem's second conv; the 7x7 stem has a ReLU there
    if backbone.layout == V1C and not deep:
        return "the file's stem is V1c's three 3x3 convs: set model.deep_stem = true, or pass torchvision's weights"
    if backbone.layout == TORCHVISION and deep:
        return "the file's stem is torchvision's 7x7 conv: set model.deep_stem = false, or pass a V1c file"
    return ""


def load_pretrained(body: nn.Sequential, model: ModelConfig, arch: NetworkSpec, start: int, end: int) -> None:
    """Copy a module's backbone blocks from model.pretrained into ``arch`` (model.arch resolved): body[i] is
    flat block start + i, up to end - 1.

    Blocks past the backbone (decode heads) keep their seeded initialisation, as do the module's
    heads and decoder; num_batches_tracked is copied where the file has it.
    """
    backbone = read_backbone(model.pretrained)
    wanted = structure_of(arch.layout)
    if backbone.structure != wanted:
        have, need = backbone.structure.describe(), wanted.describe()
        suggestion = model.arch.replace(need, have) if need in model.arch else have
        raise _bad(backbone.path, f"holds a {have} ({backbone.layout}) but model.arch = {model.arch!r} is a "
                                  f"{need}", f"set model.arch = {suggestion!r}, or pass a {need} checkpoint")
    missing, unexpected, shapes = [], [], []
    for block in range(start, min(end, arch.units)):
        target = body[block - start]
        own = target.state_dict()
        given = backbone.blocks.get(block, {})
        missing += [backbone.file_key(block, name) for name in own
                    if name not in given and not name.endswith(_OPTIONAL)]
        unexpected += [backbone.file_key(block, name) for name in given if name not in own]
        shapes += [f"{backbone.file_key(block, name)} is {list(given[name].shape)} in the file, "
                   f"{list(tensor.shape)} in the model" for name, tensor in own.items()
                   if name in given and given[name].shape != tensor.shape]
    if missing or unexpected or shapes:
        problems = [f"lacks {_listed(missing)}" if missing else "",
                    f"has {_listed(unexpected)} that the model has no place for" if unexpected else "",
                    f"{_listed(shapes)}" if shapes else ""]
        hint = _stem_hint(backbone, body[0]) if start == 0 and arch.units > 0 else ""
        raise _bad(backbone.path, f"does not fit model.arch = {model.arch!r}: "
                                  + "; ".join(problem for problem in problems if problem),
                   hint or f"pass a complete {wanted.describe()} checkpoint of 3-channel images "
                           f"({backbone.layout})")
    with torch.no_grad():
        for block in range(start, min(end, arch.units)):
            given = backbone.blocks[block]
            for name, tensor in body[block - start].state_dict().items():
                if name in given:
                    tensor.copy_(given[name])
