"""The configuration's schema: every key (the "Configs" table of docs/usage.md) in one dataclass per table.

Choices are ``Literal`` types; loading.py builds a ``Config`` from user input and validation.py holds
every rule about values.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pipeline.config.cuts import Cut
from pipeline.data.specs import DatasetSpec, dataset_spec
from pipeline.errors import BadInput, clip
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.networks.registry import resolve_network

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
    replay: str = ""  # sequential + buffered: a recorded metrics.jsonl whose schedule one process replays


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

    def _data_shape(self) -> DatasetSpec:
        return dataset_spec(self.data, self.model)


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


