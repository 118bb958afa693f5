"""Every rule about a configuration's values, in one place, and the keys set to no effect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.config.cuts import cut_to_flat, flat_to_cut, validate_cuts
from pipeline.config.schema import MAX_CONTEXT_DEPTH, MAX_TIMEOUT_S, MIN_IMAGE_SIZE, Config, parse_context, parse_size
from pipeline.errors import BadInput, clip, require
from pipeline.model.arch import SEGMENTATION_ARCHS, SEGMENTATION_DATASETS, aux_block
from pipeline.model.methods.registry import method_named, method_names
from pipeline.model.networks.family import NetworkSpec
from pipeline.model.networks.registry import family_named
from pipeline.model.partition import default_cuts
from pipeline.runtime.optim import check_schedule


def validate(config: Config, training: bool = True) -> None:
    """Every rule about values, table by table (``training``: for a run; a trained model's readers skip
    what only training needs)."""
    _validate_run(config)
    _validate_data(config)
    arch = config.arch  # after the tables it may read (a factory network is called with the data's shape)
    _validate_model(config, arch)
    _validate_local(config, arch)
    _validate_train(config, training)
    _validate_pipeline(config)
    _validate_precision(config, arch)
    if config.run.mode == "ddp":
        require(config.local.modules == 1, "run.mode = 'ddp' trains end to end; set local.modules = 1 (it is "
                                           f"{config.local.modules})")


def _validate_run(config: Config) -> None:
    run = config.run
    require(0 <= run.seed < 2**32, f"run.seed = {run.seed} must be in [0, 2**32)")
    require(run.log_every >= 1, f"run.log_every = {run.log_every} must be >= 1")
    require(bool(run.out_dir), "run.out_dir must name a directory for the outputs")
    require(run.keep_checkpoints >= 1, f"run.keep_checkpoints = {run.keep_checkpoints} must be >= 1")
    require(run.resume_step >= 0, f"run.resume_step = {run.resume_step} must be >= 0 (0: the newest checkpoint)")
    require(run.resume_step == 0 or bool(run.resume),
            f"run.resume_step = {run.resume_step} needs run.resume = DIR, the out_dir to resume from")
    require(run.checkpoint_every >= 0,
            f"run.checkpoint_every = {run.checkpoint_every} must be >= 0 (0: epoch ends only)")
    require(run.checkpoint_minutes >= 0,
            f"run.checkpoint_minutes = {run.checkpoint_minutes} must be >= 0 (0: no timed checkpoints)")


def _validate_data(config: Config) -> None:
    data = config.data
    require(data.batch_size >= 2, f"data.batch_size = {data.batch_size} must be >= 2 (batch norm needs two samples)")
    require(data.image_size >= MIN_IMAGE_SIZE, f"data.image_size = {data.image_size} must be >= {MIN_IMAGE_SIZE} "
                                              "(the networks halve it several times)")
    require(data.eval_resize >= data.image_size, f"data.eval_resize = {data.eval_resize} must be >= data.image_size "
                                                 f"= {data.image_size} (evaluation crops image_size out of it)")
    require(len(data.crop) == 2 and min(data.crop) >= MIN_IMAGE_SIZE,
            f"data.crop = {data.crop} must be [height, width], two whole numbers >= {MIN_IMAGE_SIZE} (the networks "
            "halve them several times)")
    require(data.workers >= 0, f"data.workers = {data.workers} must be >= 0 (0: decode in the training process)")


def _validate_model(config: Config, arch: NetworkSpec) -> None:
    data, model = config.data, config.model
    if arch.family == "segmentation" and data.name not in SEGMENTATION_DATASETS:
        raise BadInput(f"model.family = 'segmentation' needs per-pixel labels, but data.name = {data.name!r} has one "
                       f"label per image; use data.name = {' or '.join(map(repr, SEGMENTATION_DATASETS))}")
    if data.name in SEGMENTATION_DATASETS and arch.family != "segmentation":
        raise BadInput(f"data.name = {data.name!r} has per-pixel labels, but model.arch = {model.arch!r} is a "
                       f"{arch.family} classifier (one label per image); use model.arch = "
                       f"{' or '.join(map(repr, SEGMENTATION_ARCHS))} (model.family = 'segmentation')")
    require(model.in_channels in (0, 1, 3), f"model.in_channels = {model.in_channels} must be 1 or 3 (or 0: "
                                            "from the dataset)")
    require(model.classes == 0 or model.classes >= 2, f"model.classes = {model.classes} must be >= 2 (or 0: "
                                                      "from the dataset)")
    if model.pretrained:
        require(family_named(arch.family).pretrained,
                f"model.pretrained loads ImageNet ResNets, not the "
                f"{'CIFAR' if arch.family == 'cifar' else arch.family + '-family'} {model.arch}; set "
                "model.family = 'imagenet' or leave model.pretrained empty")
        require(Path(model.pretrained).exists(),
                f"model.pretrained = {clip(model.pretrained, 200)!r} does not exist; give an ImageNet checkpoint: a "
                "torchvision or MMSegmentation ResNet .pth file, or a checkpoint folder or out_dir of this trainer "
                "(docs/segmentation.md)")


def _validate_local(config: Config, arch: NetworkSpec) -> None:
    model, local = config.model, config.local
    blocks = arch.units
    require(
        1 <= local.modules <= blocks,
        f"local.modules = {local.modules} is out of range; {model.arch} has {blocks} blocks "
        f"(stem + residual), so K must be between 1 and {blocks}",
    )
    depth, _ = parse_context(local.context)
    if local.modules == 1:
        require(local.context == "R0", f"local.context = {local.context!r} needs local.modules >= 2; use R0 "
                                       "for end-to-end training")
    require(
        depth < local.modules,
        f"local.context = {local.context!r} looks back {depth} modules but there are only "
        f"{local.modules}; n in Rn must be < local.modules",
    )
    require(depth <= MAX_CONTEXT_DEPTH, f"local.context = {local.context!r}: n in Rn must be <= {MAX_CONTEXT_DEPTH}")
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
        require(0 <= local.memory_cap <= 1,
                f"local.memory_cap = {local.memory_cap} must be a fraction of E2E activation memory in [0, 1] "
                "(0: no cap) or a size such as '2GiB'")
    require(local.aux_widen >= 1, f"local.aux_widen = {local.aux_widen} must be >= 1")
    require(local.aux_hidden >= 1, f"local.aux_hidden = {local.aux_hidden} must be >= 1")
    require(local.aux_feature_dim >= 1, f"local.aux_feature_dim = {local.aux_feature_dim} must be >= 1")
    for key in ("ixx_1", "ixy_1", "ixx_2", "ixy_2"):
        require(getattr(local, key) >= 0, f"local.{key} = {getattr(local, key)} must be >= 0")


def _validate_train(config: Config, training: bool) -> None:
    train = config.train
    require(train.epochs >= 1, f"train.epochs = {train.epochs} must be >= 1")
    require(train.max_steps >= 0, f"train.max_steps = {train.max_steps} must be >= 0 (0: no cap)")
    require(train.lr > 0, f"train.lr = {train.lr} must be > 0")
    require(train.poly_power > 0, f"train.poly_power = {train.poly_power} must be > 0")
    require(0 <= train.min_lr < train.lr, f"train.min_lr = {train.min_lr} must be in [0, train.lr = {train.lr})")
    require(0 <= train.momentum < 1, f"train.momentum = {train.momentum} must be in [0, 1)")
    require(train.weight_decay >= 0, f"train.weight_decay = {train.weight_decay} must be >= 0")
    require(train.warmup_epochs >= 0, f"train.warmup_epochs = {train.warmup_epochs} must be >= 0")
    require(not train.nesterov or train.momentum > 0, "train.nesterov = true needs train.momentum > 0")
    if train.schedule == "cosine":
        require(
            train.warmup_epochs < train.epochs,
            f"train.warmup_epochs = {train.warmup_epochs} must be < train.epochs = {train.epochs} with the cosine "
            f"schedule (the run would never leave warm-up); for short runs use train.schedule = 'cosine-step'",
        )
        # Every epoch runs in full: the share at rate 0 needs no epoch length. Readers of a trained
        # model (export, evaluate) train nothing, so a run trained before this rule stays readable.
        if training and not train.max_steps:
            check_schedule(train)


def _validate_pipeline(config: Config) -> None:
    run, local, pipe = config.run, config.local, config.pipeline
    require(pipe.queue_depth >= 1, f"pipeline.queue_depth = {pipe.queue_depth} must be >= 1")
    require(0 < pipe.timeout_s <= MAX_TIMEOUT_S, f"pipeline.timeout_s = {pipe.timeout_s} must be in (0, "
                                                 f"{MAX_TIMEOUT_S:.0f}]")
    require(pipe.replicas >= 0, f"pipeline.replicas = {pipe.replicas} must be >= 0 (0: WORLD_SIZE / local.modules)")
    require(pipe.threads_per_stage >= 0, f"pipeline.threads_per_stage = {pipe.threads_per_stage} must be >= 0 "
                                         "(0: automatic)")

    require(pipe.buffer_batches >= 1, f"pipeline.buffer_batches = {pipe.buffer_batches} must be >= 1")
    require(pipe.max_reuse >= 0, f"pipeline.max_reuse = {pipe.max_reuse} must be >= 0 (0: unlimited)")
    require(
        not pipe.slowdown or (len(pipe.slowdown) == local.modules and all(f >= 1.0 for f in pipe.slowdown)),
        f"pipeline.slowdown = {pipe.slowdown} must list one factor >= 1.0 per module ({local.modules}), "
        f"e.g. [1.0, 1.5]; [] slows nothing",
    )
    if pipe.schedule == "buffered":
        require(local.modules >= 2, "pipeline.schedule = 'buffered' buffers batches between modules; it needs "
                                    f"local.modules >= 2 (it is {local.modules})")
        require(pipe.replicas <= 1, f"pipeline.schedule = 'buffered' runs one chain; set pipeline.replicas = 1 "
                                    f"(it is {pipe.replicas}) or use the lockstep schedule")
    require(not pipe.replay or (pipe.schedule == "buffered" and run.mode == "sequential"),
            "pipeline.replay replays a buffered run in one process; set pipeline.schedule = 'buffered' and "
            "run.mode = 'sequential' with it")


def _validate_precision(config: Config, arch: NetworkSpec) -> None:
    model, local = config.model, config.local
    blocks = arch.units
    segments = config.precision.checkpoint_segments
    if segments:
        require(2 <= segments <= blocks, f"precision.checkpoint_segments = {segments} must be between 2 and the "
                                         f"{blocks} blocks of {model.arch} (0: no recomputation)")
        require(local.modules == 1, f"precision.checkpoint_segments recomputes the end-to-end network's blocks; "
                                    f"set local.modules = 1 (it is {local.modules}) or checkpoint_segments = 0")
        require(arch.family != "segmentation", "precision.checkpoint_segments covers classification networks; "
                                               "set it to 0 for segmentation")


def validate_segmentation(config: Config, arch: NetworkSpec) -> None:
    """What a DeepLab-V3 network trained as local modules needs of local.*."""
    local = config.local
    if local.modules == 1:
        return
    require(local.context == "R0",
            f"local.context = {local.context!r} is not supported with model.family = 'segmentation': the "
            "context encoders pool to a fixed square size, while segmentation crops are rectangular and "
            "evaluation runs on whole images; use local.context = 'R0' (InfoPro's setting)")
    require(local.loss == "softmax",
            f"local.loss = {local.loss!r} needs one label per image, but segmentation labels are per-pixel maps; "
            "use local.loss = 'softmax' (per-pixel cross-entropy, InfoPro's setting)")
    require(isinstance(local.partition, list) or local.partition == "equal",
            f"local.partition = {local.partition!r} is not supported with model.family = 'segmentation' (the "
            "profiler does not model the segmentation heads); use 'equal' or list the cuts, e.g. [[3, 12]]")
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






def ineffective_keys(config: Config) -> list[str]:
    """One line per key changed from its default that the chosen mode, schedule or method ignores."""
    defaults = Config()
    notes: list[str] = []

    def ignored(section: str, keys: tuple[str, ...], because: str) -> None:
        for key in keys:
            if getattr(getattr(config, section), key) != getattr(getattr(defaults, section), key):
                notes.append(f"{section}.{key} has no effect {because}")

    _unread_by_data_and_mode(config, ignored)
    _unread_by_method(config, ignored)
    return notes


_Ignored = Callable[[str, tuple[str, ...], str], None]


def _unread_by_data_and_mode(config: Config, ignored: _Ignored) -> None:
    run = config.run
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


def _unread_by_method(config: Config, ignored: _Ignored) -> None:
    local = config.local
    if local.modules == 1:
        ignored("local", ("partition", "memory_cap", "context", "loss", "aux", "aux_widen", "aux_hidden",
                         "aux_feature_dim", "reconstruct", "ixx_1", "ixy_1", "ixx_2", "ixy_2"),
               "with local.modules = 1 (end-to-end training has no local heads)")
        return
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
