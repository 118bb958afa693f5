"""Typed experiment configuration: TOML file + ``--set`` overrides, validated in one place.

Every key (the "Configs" table of docs/usage.md) lives in one dataclass below; choices are ``Literal``
types. ``load_config`` is the only way a ``Config`` is built from user input, and every problem
it finds is a ``BadInput`` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pipeline.errors import BadInput, clip
from pipeline.model.arch import SEGMENTATION_ARCHS, SEGMENTATION_DATASETS, aux_block
from pipeline.model.methods.registry import method_named, method_names
from pipeline.model.networks.registry import NetworkSpec, family_named, resolve_network

Mode = Literal["sequential", "pipeline", "ddp"]
Device = Literal["auto", "cpu", "cuda"]
Dataset = Literal["fashion_mnist", "cifar10", "cifar100", "svhn", "stl10", "synthetic", "image_folder", "cityscapes",
                  "segmentation_folder"]
Partition = Literal["equal", "balanced-memory", "balanced-time", "balanced"]
AuxHead = Literal["0c1f", "0c2f", "1c1f", "1c2f", "1c3f", "2c2f"]
Schedule = Literal["cosine", "cosine-step", "poly", "constant"]
WireDtype = Literal["fp32", "bf16"]
Placement = Literal["chain", "stage"]
Amp = Literal["none", "bf16"]
PipelineSchedule = Literal["lockstep", "buffered"]
StopSignal = Literal["SIGTERM", "SIGUSR1", "SIGUSR2"]

MODES: tuple[str, ...] = get_args(Mode)
DATASETS: tuple[str, ...] = get_args(Dataset)
PARTITIONS: tuple[str, ...] = get_args(Partition)
AUX_HEADS: tuple[str, ...] = get_args(AuxHead)

# Deepest Rn: each packet carries n earlier module inputs, a bound that keeps messages sane.
MAX_CONTEXT_DEPTH = 21
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MIN_IMAGE_SIZE = 8

# Cut points: [stage, block] pairs (stage 0 = the stem) for the ResNets, as in docs/reference.md's
# tables; flat block indices for every other network.
Cut = int | list[int]


@dataclass
class RunConfig:
    mode: Mode = "sequential"
    seed: int = 0
    out_dir: str = "runs/default"
    resume: str = ""
    resume_step: int = 0  # which complete checkpoint of run.resume: its step, 0 = the newest
    keep_checkpoints: int = 2  # complete checkpoint sets kept in out_dir/checkpoints, newest first
    overwrite: bool = False  # replace another run's outputs in out_dir (without it, such a folder is refused)
    device: Device = "auto"
    log_every: int = 50
    tensorboard: bool = False  # also write RUN_DIR/tensorboard/rank_<r> event files (the tensorboard extra)
    checkpoint_every: int = 0  # also a complete set every N steps; 0: at epoch ends (and the end) only
    checkpoint_minutes: float = 0.0  # also a complete set once this many minutes passed since the last; 0: never
    stop_signal: StopSignal = "SIGTERM"  # ends the run with a complete set and exit code 3 (docs/failures.md)


@dataclass
class DataConfig:
    name: Dataset = "fashion_mnist"
    root: str = ""
    batch_size: int = 128
    augment: bool = True
    download: bool = False
    # image_folder only: the training crop's side, and the side evaluation images are resized to
    # before their centre crop of image_size.
    image_size: int = 224
    eval_resize: int = 256
    # Streamed datasets (image_folder, cityscapes, segmentation_folder): decoding worker processes
    # of each reading process.
    workers: int = 4
    # cityscapes and segmentation_folder: [height, width] of the training crop (MMSegmentation's
    # Cityscapes crop); evaluation reads whole images.
    crop: list[int] = field(default_factory=lambda: [512, 1024])


@dataclass
class ModelConfig:
    arch: str = "resnet32"
    # 0 means "take it from the dataset"; a non-zero value must agree with the dataset.
    in_channels: int = 0
    classes: int = 0
    # Which registered family model.arch is (resnet50 is both a CIFAR depth and torchvision's): auto = the
    # one that knows the name, the dataset's first (imagenet for image folders, segmentation for label-map
    # datasets, cifar for the resident ones); cifar, imagenet, segmentation, vit, vgg or a registered one.
    family: str = "auto"
    zero_init_residual: bool = False  # the last batch norm of each residual block starts at 0
    deep_stem: bool = False  # segmentation: ResNet-V1c's stem of three 3x3 convs instead of the 7x7 conv
    # An ImageNet checkpoint whose backbone replaces the initial weights: torchvision's or
    # MMSegmentation's ResNet state dict, or a checkpoint folder / out_dir of this trainer ("": none).
    pretrained: str = ""


@dataclass
class LocalConfig:
    modules: int = 1
    partition: Partition | list[Cut] = "equal"
    # balanced: the largest module's activation memory at most this fraction of E2E's, or a size
    # such as "2GiB"; 0: no cap
    memory_cap: float | str = 0.0
    context: str = "R0"
    loss: str = "softmax"  # a registered local method: softmax, contrast, predsim (pipeline/model/methods/)
    aux: AuxHead = "1c2f"
    aux_widen: int = 1
    aux_hidden: int = 128  # width of the head's hidden linear layers (times aux_widen)
    aux_feature_dim: int = 128  # what a head outputs for the contrastive loss
    reconstruct: bool = False
    ixx_1: float = 1.0
    ixy_1: float = 1.0
    ixx_2: float = 1.0
    ixy_2: float = 1.0

    @property
    def context_depth(self) -> int:
        """n of Rn / RnE: how many earlier module inputs a module receives."""
        return parse_context(self.context)[0]

    @property
    def context_image(self) -> bool:
        """True for E and RnE: the normalised image is encoded into every later module."""
        return parse_context(self.context)[1]


@dataclass
class TrainConfig:
    epochs: int = 160  # the published recipe (docs/reference.md)
    max_steps: int = 0  # 0: no cap, run every epoch in full
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: int = 10
    schedule: Schedule = "cosine"
    # poly (the segmentation recipe): (lr - min_lr) * (1 - (step - 1) / steps) ** poly_power + min_lr
    poly_power: float = 0.9
    min_lr: float = 0.0


@dataclass
class PipelineConfig:
    queue_depth: int = 2
    wire_dtype: WireDtype = "fp32"
    timeout_s: float = 300.0
    threads_per_stage: int = 0  # 0: this process's equal share of the cores
    replicas: int = 0  # R: data-parallel copies of the chain of K stages; 0: WORLD_SIZE / K
    placement: Placement = "chain"  # rank order: each replica's K stages together, or each stage's R replicas
    sync_batchnorm: bool = False  # GPU only: batch statistics over the replicas of a stage
    schedule: PipelineSchedule = "lockstep"  # buffered: each module at its own pace on a replay buffer
    buffer_batches: int = 30  # M, the batches each receiving module keeps (DGL's buffer experiments: 30)
    max_reuse: int = 0  # times one buffered batch may be trained on; 0 = unlimited (DGL's default)
    slowdown: list[float] = field(default_factory=list)  # per stage, >= 1: a straggler for experiments; [] = none
    replay: str = ""  # sequential + buffered: a recorded metrics.jsonl whose schedule the simulator replays


@dataclass
class PrecisionConfig:
    amp: Amp = "none"
    channels_last: bool = False
    # E2E (local.modules = 1): the blocks in S segments, the first S - 1 recomputed in backward
    # (activation checkpointing, pipeline/model/recompute.py); 0: off
    checkpoint_segments: int = 0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def arch(self) -> NetworkSpec:
        """The network model.arch names (in the family model.family, or the dataset's, picks)."""
        return resolve_network(self.model.arch, self.model.family, self.data.name, self._data_shape)

    def _data_shape(self) -> Any:
        from pipeline.data.specs import dataset_spec  # the specs read this module

        return dataset_spec(self)


# Keys that leave a run's result alone: where it writes, how often it reports or saves, how long it
# waits, where the data lives. Every other key changes the result, so a folder's checkpoints are
# continued only by a run that agrees on all of them (an unknown new key counts as result-changing).
NOT_RESULT_KEYS = frozenset({
    "run.mode",  # every mode ends bit for bit where the sequential reference does
    "run.out_dir", "run.resume", "run.resume_step", "run.keep_checkpoints", "run.overwrite", "run.log_every",
    "run.tensorboard", "run.checkpoint_every", "run.checkpoint_minutes", "run.stop_signal",
    "data.root", "data.download", "data.workers",
    "pipeline.queue_depth", "pipeline.timeout_s", "pipeline.threads_per_stage", "pipeline.placement",
})


def result_config(config: Config) -> dict[str, Any]:
    """The keys that change what a run computes, as table.key -> value (recorded with each checkpoint set)."""
    return {f"{table}.{key}": value for table, values in config.to_dict().items() for key, value in values.items()
            if f"{table}.{key}" not in NOT_RESULT_KEYS}


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """table.key of every result-changing key two runs disagree on (one missing on a side counts)."""
    return sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))


_UNIONS = (Union, types.UnionType)  # typing.Union[...] and the X | Y of builtin types
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)\s*$")
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000; BadInput for anything else."""
    match = _SIZE_RE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise BadInput(f"{clip(text)!r} is not a size; write a positive number and a unit, for example '2GiB' "
                       f"or '512MB' (units: {', '.join(_SIZE_UNITS)})")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


_CONTEXT_RE = re.compile(r"^(?:R(\d+)(E?)|E)$")


def parse_context(context: str) -> tuple[int, bool]:
    """'R0' -> (0, False), 'E' -> (0, True), 'R1E' -> (1, True), 'R4' -> (4, False)."""
    match = _CONTEXT_RE.match(context)
    if match is None:
        raise BadInput(
            f"local.context = {context!r} is not a context mode; allowed: R0, E, Rn or RnE "
            "with n a whole number (R1, R1E, R2E, ...)"
        )
    if context == "E":
        return 0, True
    return int(match.group(1)), match.group(2) == "E"


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                training: bool = True) -> Config:
    """Read a TOML file (or the defaults when path is None), apply overrides, validate (``training``:
    for a run; a trained model's readers skip what only training needs)."""
    return config_from_dict(_read_toml(Path(path)) if path is not None else {}, overrides, training)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
                     training: bool = True) -> Config:
    """A config from its tables (a TOML file's, or the ``to_dict`` a run or an export recorded), with
    ``--set`` overrides applied, validated as a file's."""
    raw = {table: dict(values) if isinstance(values, dict) else values for table, values in raw.items()}
    for item in overrides:
        key, value = _parse_override(item)
        table, _, name = key.partition(".")
        if not name or "." in name:
            raise BadInput(f"--set {item!r}: keys look like table.key (for example run.mode=pipeline)")
        section = raw.setdefault(table, {})
        if not isinstance(section, dict):
            raise BadInput(f"--set {item!r}: {table!r} is not a table")
        section[name] = value
    config = _build(raw)
    validate(config, training)
    from pipeline.data.specs import check_model_fits  # specs import this module: resolve late

    check_model_fits(config)
    return config


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise BadInput(f"{path}: the 'base' chain loops back to this file; remove one 'base' key")
    if not path.is_file():
        raise BadInput(f"config file {str(path)!r} does not exist; pass an existing TOML file with --config "
                       "(see configs/)")
    try:
        text = path.read_text()
    except OSError as err:
        raise BadInput(f"config file {str(path)!r} cannot be read ({err.strerror}); pass a readable TOML "
                       "file") from None
    except UnicodeDecodeError as err:
        raise BadInput(f"config file {str(path)!r} is not valid TOML: {err}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise BadInput(f"config file {str(path)!r} is not valid TOML: {err}") from None
    except (ValueError, RecursionError) as err:
        raise BadInput(f"config file {str(path)!r} cannot be read: {_beyond_limits(err)}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise BadInput(f"{path}: 'base' must be the path of another TOML file, relative to this one")
    merged = _read_toml(path.parent / base, (*seen, path.resolve()))
    for table, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(table), dict):
            merged[table].update(values)
        else:
            merged[table] = values
    return merged


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--set {item!r}: expected key=value, for example --set local.modules=4")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word such as pipeline or R1E
    except (ValueError, RecursionError) as err:
        raise BadInput(f"--set {clip(item)!r}: {_beyond_limits(err)}") from None
    return key.strip(), value


def _beyond_limits(err: ValueError | RecursionError) -> str:
    """What a parser limit tomllib hit means: Python's digit cap on ints, or its recursion limit."""
    if isinstance(err, RecursionError):
        return ("arrays or inline tables are nested too deep to read; "
                "no setting nests deeper than local.partition = [[1, 0], [2, 3]]")
    return f"a number is too long to read ({str(err).split(';')[0]}); no setting needs more than a few digits"


def _build(raw: dict[str, Any]) -> Config:
    sections = {}
    classes = get_type_hints(Config)
    for spec in dataclasses.fields(Config):
        values = raw.get(spec.name, {})
        if not isinstance(values, dict):
            raise BadInput(f"[{spec.name}] must be a table, got {type(values).__name__}")
        sections[spec.name] = _build_section(spec.name, classes[spec.name], values)
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise BadInput(f"unknown config table [{unknown[0]}]; allowed tables: {', '.join(sections)}")
    return Config(**sections)


def _build_section(table: str, cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise BadInput(f"unknown config key {table}.{key}; allowed keys in [{table}]: {', '.join(allowed)}")
        kwargs[key] = _coerce(f"{table}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if get_origin(hint) in _UNIONS:
        if isinstance(value, str):  # a word: say which words are allowed, not which types
            for option in get_args(hint):
                if get_origin(option) is Literal:
                    return _coerce(name, option, value)
        for option in get_args(hint):
            try:
                return _coerce(name, option, value)
            except BadInput:
                continue
        raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise BadInput(f"{name} = {value!r} is not allowed; allowed: {', '.join(allowed)}")
        return value
    if get_origin(hint) is list:
        (inner,) = get_args(hint)
        if not isinstance(value, list):
            raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")
        return [_coerce(name, inner, item) for item in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str and isinstance(value, str):
        return value
    raise BadInput(f"{name} = {value!r} has the wrong type; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    if get_origin(hint) in _UNIONS:
        return " or ".join(_describe(option) for option in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_describe(get_args(hint)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# --------------------------------------------------------------------------------------------
# Validation: every rule about values, in one place.


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise BadInput(message)


def validate(config: Config, training: bool = True) -> None:
    run, data, model, local, train = config.run, config.data, config.model, config.local, config.train
    _require(0 <= run.seed < 2**32, f"run.seed = {run.seed} must be in [0, 2**32)")
    _require(run.log_every >= 1, f"run.log_every = {run.log_every} must be >= 1")
    _require(bool(run.out_dir), "run.out_dir must name a directory for the outputs")
    _require(run.keep_checkpoints >= 1, f"run.keep_checkpoints = {run.keep_checkpoints} must be >= 1")
    _require(run.resume_step >= 0, f"run.resume_step = {run.resume_step} must be >= 0 (0: the newest checkpoint)")
    _require(run.resume_step == 0 or bool(run.resume),
             f"run.resume_step = {run.resume_step} needs run.resume = DIR, the out_dir to resume from")
    _require(run.checkpoint_every >= 0,
             f"run.checkpoint_every = {run.checkpoint_every} must be >= 0 (0: epoch ends only)")
    _require(run.checkpoint_minutes >= 0,
             f"run.checkpoint_minutes = {run.checkpoint_minutes} must be >= 0 (0: no timed checkpoints)")

    _require(data.batch_size >= 2, f"data.batch_size = {data.batch_size} must be >= 2 (batch norm needs two samples)")
    _require(data.image_size >= MIN_IMAGE_SIZE, f"data.image_size = {data.image_size} must be >= {MIN_IMAGE_SIZE} "
                                               "(the networks halve it several times)")
    _require(data.eval_resize >= data.image_size, f"data.eval_resize = {data.eval_resize} must be >= data.image_size "
                                                  f"= {data.image_size} (evaluation crops image_size out of it)")
    _require(len(data.crop) == 2 and min(data.crop) >= MIN_IMAGE_SIZE,
             f"data.crop = {data.crop} must be [height, width], two whole numbers >= {MIN_IMAGE_SIZE} (the networks "
             "halve them several times)")
    _require(data.workers >= 0, f"data.workers = {data.workers} must be >= 0 (0: decode in the training process)")

    arch = config.arch
    blocks = arch.units
    if arch.family == "segmentation" and data.name not in SEGMENTATION_DATASETS:
        raise BadInput(f"model.family = 'segmentation' needs per-pixel labels, but data.name = {data.name!r} has one "
                       f"label per image; use data.name = {' or '.join(map(repr, SEGMENTATION_DATASETS))}")
    if data.name in SEGMENTATION_DATASETS and arch.family != "segmentation":
        raise BadInput(f"data.name = {data.name!r} has per-pixel labels, but model.arch = {model.arch!r} is a "
                       f"{arch.family} classifier (one label per image); use model.arch = "
                       f"{' or '.join(map(repr, SEGMENTATION_ARCHS))} (model.family = 'segmentation')")
    _require(model.in_channels in (0, 1, 3), f"model.in_channels = {model.in_channels} must be 1 or 3 (or 0: "
                                             "from the dataset)")
    _require(model.classes == 0 or model.classes >= 2, f"model.classes = {model.classes} must be >= 2 (or 0: "
                                                       "from the dataset)")
    if model.pretrained:
        _require(family_named(arch.family).pretrained,
                 f"model.pretrained loads ImageNet ResNets, not the "
                 f"{'CIFAR' if arch.family == 'cifar' else arch.family + '-family'} {model.arch}; set "
                 "model.family = 'imagenet' or leave model.pretrained empty")
        _require(Path(model.pretrained).exists(),
                 f"model.pretrained = {clip(model.pretrained, 200)!r} does not exist; give an ImageNet checkpoint: a "
                 "torchvision or MMSegmentation ResNet .pth file, or a checkpoint folder or out_dir of this trainer "
                 "(docs/segmentation.md)")

    _require(
        1 <= local.modules <= blocks,
        f"local.modules = {local.modules} is out of range; {model.arch} has {blocks} blocks "
        f"(stem + residual), so K must be between 1 and {blocks}",
    )
    depth, _ = parse_context(local.context)
    if local.modules == 1:
        _require(local.context == "R0", f"local.context = {local.context!r} needs local.modules >= 2; use R0 "
                                        "for end-to-end training")
    _require(
        depth < local.modules,
        f"local.context = {local.context!r} looks back {depth} modules but there are only "
        f"{local.modules}; n in Rn must be < local.modules",
    )
    _require(depth <= MAX_CONTEXT_DEPTH, f"local.context = {local.context!r}: n in Rn must be <= {MAX_CONTEXT_DEPTH}")
    if not isinstance(local.partition, str):
        validate_cuts(local.partition, local.modules, arch.blocks, arch.units)
    method_named(local.loss)  # an unknown name is refused, the registered ones listed
    if arch.family == "segmentation":
        validate_segmentation(config, arch)
    if isinstance(local.memory_cap, str):
        try:
            parse_size(local.memory_cap)
        except BadInput as err:
            raise BadInput(f"local.memory_cap = {err}; or a fraction of E2E activation memory such as 0.6") from None
    else:
        _require(0 <= local.memory_cap <= 1,
                 f"local.memory_cap = {local.memory_cap} must be a fraction of E2E activation memory in [0, 1] "
                 "(0: no cap) or a size such as '2GiB'")
    _require(local.aux_widen >= 1, f"local.aux_widen = {local.aux_widen} must be >= 1")
    _require(local.aux_hidden >= 1, f"local.aux_hidden = {local.aux_hidden} must be >= 1")
    _require(local.aux_feature_dim >= 1, f"local.aux_feature_dim = {local.aux_feature_dim} must be >= 1")
    for key in ("ixx_1", "ixy_1", "ixx_2", "ixy_2"):
        _require(getattr(local, key) >= 0, f"local.{key} = {getattr(local, key)} must be >= 0")

    _require(train.epochs >= 1, f"train.epochs = {train.epochs} must be >= 1")
    _require(train.max_steps >= 0, f"train.max_steps = {train.max_steps} must be >= 0 (0: no cap)")
    _require(train.lr > 0, f"train.lr = {train.lr} must be > 0")
    _require(train.poly_power > 0, f"train.poly_power = {train.poly_power} must be > 0")
    _require(0 <= train.min_lr < train.lr, f"train.min_lr = {train.min_lr} must be in [0, train.lr = {train.lr})")
    _require(0 <= train.momentum < 1, f"train.momentum = {train.momentum} must be in [0, 1)")
    _require(train.weight_decay >= 0, f"train.weight_decay = {train.weight_decay} must be >= 0")
    _require(train.warmup_epochs >= 0, f"train.warmup_epochs = {train.warmup_epochs} must be >= 0")
    _require(not train.nesterov or train.momentum > 0, "train.nesterov = true needs train.momentum > 0")
    if train.schedule == "cosine":
        _require(
            train.warmup_epochs < train.epochs,
            f"train.warmup_epochs = {train.warmup_epochs} must be < train.epochs = {train.epochs} with the cosine "
            f"schedule (the run would never leave warm-up); for short runs use train.schedule = 'cosine-step'",
        )
        # Every epoch runs in full: the share at rate 0 needs no epoch length. Readers of a trained
        # model (export, evaluate) train nothing, so a run trained before this rule stays readable.
        if training and not train.max_steps:
            from pipeline.optim import check_schedule  # optim reads TrainConfig from here: resolve late

            check_schedule(train)

    pipe = config.pipeline
    _require(pipe.queue_depth >= 1, f"pipeline.queue_depth = {pipe.queue_depth} must be >= 1")
    _require(0 < pipe.timeout_s <= MAX_TIMEOUT_S, f"pipeline.timeout_s = {pipe.timeout_s} must be in (0, "
                                                  f"{MAX_TIMEOUT_S:.0f}]")
    _require(pipe.replicas >= 0, f"pipeline.replicas = {pipe.replicas} must be >= 0 (0: WORLD_SIZE / local.modules)")
    _require(pipe.threads_per_stage >= 0, f"pipeline.threads_per_stage = {pipe.threads_per_stage} must be >= 0 "
                                          "(0: automatic)")

    _require(pipe.buffer_batches >= 1, f"pipeline.buffer_batches = {pipe.buffer_batches} must be >= 1")
    _require(pipe.max_reuse >= 0, f"pipeline.max_reuse = {pipe.max_reuse} must be >= 0 (0: unlimited)")
    _require(
        not pipe.slowdown or (len(pipe.slowdown) == local.modules and all(f >= 1.0 for f in pipe.slowdown)),
        f"pipeline.slowdown = {pipe.slowdown} must list one factor >= 1.0 per module ({local.modules}), "
        f"e.g. [1.0, 1.5]; [] slows nothing",
    )
    if pipe.schedule == "buffered":
        _require(local.modules >= 2, "pipeline.schedule = 'buffered' buffers batches between modules; it needs "
                                     f"local.modules >= 2 (it is {local.modules})")
        _require(pipe.replicas <= 1, f"pipeline.schedule = 'buffered' runs one chain; set pipeline.replicas = 1 "
                                     f"(it is {pipe.replicas}) or use the lockstep schedule")
    _require(not pipe.replay or (pipe.schedule == "buffered" and run.mode == "sequential"),
             "pipeline.replay replays a buffered run in one process; set pipeline.schedule = 'buffered' and "
             "run.mode = 'sequential' with it")

    segments = config.precision.checkpoint_segments
    if segments:
        _require(2 <= segments <= blocks, f"precision.checkpoint_segments = {segments} must be between 2 and the "
                                          f"{blocks} blocks of {model.arch} (0: no recomputation)")
        _require(local.modules == 1, f"precision.checkpoint_segments recomputes the end-to-end network's blocks; "
                                     f"set local.modules = 1 (it is {local.modules}) or checkpoint_segments = 0")
        _require(arch.family != "segmentation", "precision.checkpoint_segments covers classification networks; "
                                                "set it to 0 for segmentation")

    if run.mode == "ddp":
        _require(local.modules == 1, "run.mode = 'ddp' trains end to end; set local.modules = 1 (it is "
                                     f"{local.modules})")


def validate_cuts(cuts: list[Cut], modules: int, blocks: tuple[int, ...] | None, units: int) -> None:
    """An explicit cut list: K-1 increasing cuts, none after the last block ([stage, block] pairs for the
    ResNets, ``blocks`` per stage; flat block indices otherwise)."""
    _require(
        len(cuts) == modules - 1,
        f"local.partition lists {len(cuts)} cuts but local.modules = {modules} needs {modules - 1}",
    )
    previous = -1
    for cut in cuts:
        if blocks is None:
            _require(isinstance(cut, int) and 0 <= cut < units - 1,
                     f"local.partition cut {cut} is out of range; cuts are block indices 0..{units - 2} (a cut "
                     f"follows that block; the last of the {units} blocks ends the last module)")
        else:
            stages = len(blocks)
            in_stage = (isinstance(cut, list) and len(cut) == 2 and 1 <= cut[0] <= stages
                        and 0 <= cut[1] < blocks[cut[0] - 1])
            _require(
                in_stage or cut == [0, 0],
                f"local.partition cut {cut} is out of range; cuts are [stage, block] with [0, 0] (after the stem) "
                "or " + ", ".join(f"[{stage + 1}, 0..{count - 1}]" for stage, count in enumerate(blocks)),
            )
            _require(cut_to_flat(cut, blocks) < units - 1, f"local.partition cut {cut} leaves the last module "
                                                           f"empty; cut before [{stages}, {blocks[-1] - 1}]")
        flat = cut_to_flat(cut, blocks)
        _require(flat > previous, f"local.partition cuts must be strictly increasing; {cut} is not after the "
                                  "one before")
        previous = flat


def validate_segmentation(config: Config, arch: NetworkSpec) -> None:
    """What a DeepLab-V3 network trained as local modules needs of local.*."""
    local = config.local
    if local.modules == 1:
        return
    _require(local.context == "R0",
             f"local.context = {local.context!r} is not supported with model.family = 'segmentation': the "
             "context encoders pool to a fixed square size, while segmentation crops are rectangular and "
             "evaluation runs on whole images; use local.context = 'R0' (InfoPro's setting)")
    _require(local.loss == "softmax",
             f"local.loss = {local.loss!r} needs one label per image, but segmentation labels are per-pixel maps; "
             "use local.loss = 'softmax' (per-pixel cross-entropy, InfoPro's setting)")
    _require(isinstance(local.partition, list) or local.partition == "equal",
             f"local.partition = {local.partition!r} is not supported with model.family = 'segmentation' (the "
             "profiler does not model the segmentation heads); use 'equal' or list the cuts, e.g. [[3, 12]]")
    from pipeline.model.partition import default_cuts, flat_to_cut  # partition imports this module

    tap = aux_block(arch.layout)
    last = flat_to_cut(tap, arch.blocks)
    if isinstance(local.partition, list):
        late = [cut for cut in local.partition if cut_to_flat(cut, arch.blocks) >= tap]
        how = "cut before it"
    else:
        late = [flat_to_cut(cut, arch.blocks) for cut in default_cuts(arch.layout, local.modules) if cut >= tap]
        how = f"use fewer modules than {local.modules} or list cuts before it in local.partition"
    if late:
        raise BadInput(f"local.partition cut {late[0]} is at or after layer3's last block {last}: the last "
                       "module's FCN auxiliary head reads layer3's output, so that block must be in the last "
                       f"module; {how} (InfoPro's cut is [3, 12])")


def cut_to_flat(cut: Cut, blocks: tuple[int, ...] | None) -> int:
    """A cut as config writes it -> index in the flat block list: [stage, block] of a ResNet (``blocks`` per
    stage; [0, 0] is the stem), or already a flat index (``blocks`` None)."""
    if isinstance(cut, int):
        return cut
    assert blocks is not None, "validate_cuts refuses a [stage, block] pair for a flat-indexed network"
    stage, block = cut
    return 0 if stage == 0 else 1 + sum(blocks[: stage - 1]) + block


# --------------------------------------------------------------------------------------------
# Keys set to no effect: legal, but probably not what the user meant.


def ineffective_keys(config: Config) -> list[str]:
    """One line per key changed from its default that the chosen mode, schedule or method ignores."""
    defaults = Config()
    notes: list[str] = []

    def ignored(section: str, keys: tuple[str, ...], because: str) -> None:
        for key in keys:
            if getattr(getattr(config, section), key) != getattr(getattr(defaults, section), key):
                notes.append(f"{section}.{key} has no effect {because}")

    run, local = config.run, config.local
    if run.resume:
        ignored("model", ("pretrained",), "with run.resume set (the checkpoint restores every weight)")
    if config.data.name == "synthetic":
        ignored("data", ("download", "root"), "with data.name = 'synthetic' (nothing is read)")
    name = config.data.name
    streamed = name == "image_folder" or name in SEGMENTATION_DATASETS
    if streamed:
        ignored("data", ("download",), f"with data.name = {name!r} (the folder is read as it is)")
    else:
        ignored("data", ("workers",), f"with data.name = {name!r} (streamed datasets only: image_folder, "
                                      f"{', '.join(SEGMENTATION_DATASETS)})")
    if name != "image_folder":
        ignored("data", ("image_size", "eval_resize"), f"with data.name = {name!r} (image folders only)")
    if name not in SEGMENTATION_DATASETS:
        ignored("data", ("crop",), f"with data.name = {name!r} (segmentation datasets only: "
                                   f"{', '.join(SEGMENTATION_DATASETS)})")
    if config.arch.family != "segmentation":
        ignored("model", ("deep_stem",), "unless model.family = 'segmentation' (the stem of DeepLab-V3's backbone)")
    if config.train.schedule != "cosine":
        ignored("train", ("warmup_epochs",), f"with train.schedule = {config.train.schedule!r} (only 'cosine' "
                                             "warms up)")
    if config.train.schedule != "poly":
        ignored("train", ("poly_power", "min_lr"), f"with train.schedule = {config.train.schedule!r} (only 'poly' "
                                                   "uses them)")
    if run.mode != "pipeline":
        ignored("pipeline", ("queue_depth", "wire_dtype"), f"with run.mode = {run.mode!r} (no links between stages)")
    if run.mode == "sequential":
        ignored("pipeline", ("timeout_s", "threads_per_stage", "replicas", "placement", "sync_batchnorm"),
                "with run.mode = 'sequential' (one process)")
    if config.pipeline.schedule == "lockstep":
        ignored("pipeline", ("buffer_batches", "max_reuse"), "with pipeline.schedule = 'lockstep' (no buffers)")
    elif config.pipeline.replay:
        ignored("pipeline", ("buffer_batches", "max_reuse", "slowdown"),
                "with pipeline.replay set (the record fixes what each module trained on)")
    if run.mode == "sequential" and config.pipeline.schedule == "lockstep":
        ignored("pipeline", ("slowdown",), "with run.mode = 'sequential' and the lockstep schedule (one process "
                                           "runs every module in turn)")
    if local.modules == 1:
        ignored("local", ("partition", "memory_cap", "context", "loss", "aux", "aux_widen", "aux_hidden",
                          "aux_feature_dim", "reconstruct", "ixx_1", "ixy_1", "ixx_2", "ixy_2"),
                "with local.modules = 1 (end-to-end training has no local heads)")
        return notes
    if local.partition != "balanced":
        ignored("local", ("memory_cap",), "unless local.partition = 'balanced'")
    if config.arch.family == "imagenet":
        ignored("local", ("aux", "aux_hidden"), "with an ImageNet network (its heads are InfoPro's ImageNet head)")
    if config.arch.family == "segmentation":
        ignored("local", ("aux", "aux_hidden", "aux_widen"),
                "with a segmentation network (its heads and decoder are InfoPro's segmentation ones)")
    if config.arch.family == "vit":
        ignored("local", ("aux",), "with a ViT (a token feature's head is LayerNorm, mean pool and two linear layers)")
    readers: dict[str, list[str]] = {}  # a method's own keys, and which methods read each
    for method in method_names():
        for key in method_named(method).identity_keys:
            readers.setdefault(key, []).append(method)
    for key, names in sorted(readers.items()):
        if key not in method_named(local.loss).identity_keys:
            ignored("local", (key,), f"with local.loss = {local.loss!r} (read only by {', '.join(names)})")
    if not local.reconstruct:
        ignored("local", ("ixx_1", "ixy_1", "ixx_2", "ixy_2"), "with local.reconstruct = false (no decoder to weigh)")
    return notes
