"""pipeline.config: TOML + --set overrides, typed coercion and every validation message."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.config.cuts import cut_to_flat
from pipeline.config.loading import load_config
from pipeline.config.schema import Config, parse_context
from pipeline.errors import BadInput
from pipeline.model.arch import cifar_blocks_per_stage


def bad(overrides=(), path=None) -> str:
    """The BadInput message load_config gives; fails the test if it accepts the input."""
    with pytest.raises(BadInput) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"a BadInput message must be one line: {message!r}"
    return message


# ---- good input -----------------------------------------------------------------------------


def test_defaults_follow_the_design():
    config = load_config(None)
    assert isinstance(config, Config)
    assert config.run.mode == "sequential"
    assert config.data.name == "fashion_mnist"
    assert config.model.arch == "resnet32"
    assert config.arch.blocks == (5, 5, 5) and config.arch.family == "cifar"
    assert config.local.modules == 1 and config.local.context == "R0"
    assert config.local.aux == "1c2f" and config.local.aux_feature_dim == 128 and config.local.aux_widen == 1
    assert config.train.nesterov is True and config.train.momentum == 0.9
    assert config.train.weight_decay == 1e-4
    assert config.pipeline.wire_dtype == "fp32" and config.precision.amp == "none"
    assert config.pipeline.schedule == "lockstep"  # the pipeline equals the sequential run unless asked otherwise
    assert config.pipeline.buffer_batches == 30 and config.pipeline.max_reuse == 0  # DGL's buffer experiments


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(
        "[run]\nseed = 3\nout_dir = \"runs/x\"\n"
        "[data]\nname = \"cifar10\"\nbatch_size = 64\n"
        "[local]\nmodules = 4\npartition = [[1, 2], [2, 1], [3, 0]]\ncontext = \"R1E\"\nixx_1 = 5\n"
        "[train]\nlr = 0.8\n"
    )
    config = load_config(path)
    assert config.run.seed == 3 and config.run.out_dir == "runs/x"
    assert config.data.name == "cifar10" and config.data.batch_size == 64
    assert config.local.partition == [[1, 2], [2, 1], [3, 0]]
    assert config.local.context == "R1E"
    assert config.local.context_depth == 1 and config.local.context_image is True
    assert config.local.ixx_1 == 5.0 and isinstance(config.local.ixx_1, float)  # int -> float
    assert config.train.lr == 0.8

    config = load_config(path, ["run.seed=7", "local.context=R2", "train.lr=1", "data.augment=false",
                                "data.root=/some/where", "local.partition=equal"])
    assert config.run.seed == 7
    assert config.local.context == "R2"  # a bare word is a string
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.augment is False
    assert config.data.root == "/some/where"
    assert config.local.partition == "equal"
    assert config.data.batch_size == 64  # untouched keys keep the file's values


def test_base_file_is_merged_per_table(tmp_path):
    (tmp_path / "base.toml").write_text("[run]\nseed = 5\nlog_every = 7\n[train]\nepochs = 30\nwarmup_epochs = 1\n")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"
    child.write_text("base = \"../base.toml\"\n[run]\nseed = 9\n")
    config = load_config(child)
    assert config.run.seed == 9  # the child's value wins
    assert config.run.log_every == 7  # the base's other keys in the same table stay
    assert config.train.epochs == 30


def test_set_wins_over_file_and_to_dict_round_trips(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text("[local]\nmodules = 2\n")
    config = load_config(path, ["local.modules=3", "local.partition=[[1, 0], [2, 0]]"])
    assert config.local.modules == 3
    assert config.local.partition == [[1, 0], [2, 0]]
    assert config.to_dict()["local"]["modules"] == 3


@pytest.mark.parametrize(
    "text, expected",
    [("R0", (0, False)), ("E", (0, True)), ("R1", (1, False)), ("R1E", (1, True)), ("R2E", (2, True)),
     ("R16", (16, False))],
)
def test_parse_context(text, expected):
    assert parse_context(text) == expected


@pytest.mark.parametrize("arch, n", [("resnet8", 1), ("resnet14", 2), ("resnet20", 3), ("resnet32", 5),
                                      ("resnet56", 9), ("resnet110", 18)])
def test_blocks_per_stage(arch, n):
    assert cifar_blocks_per_stage(arch) == n


def test_cut_to_flat():
    assert cut_to_flat([0, 0], (5, 5, 5)) == 0
    assert cut_to_flat([1, 0], (5, 5, 5)) == 1
    assert cut_to_flat([2, 1], (5, 5, 5)) == 7
    assert cut_to_flat([3, 4], (5, 5, 5)) == 15
    assert cut_to_flat([2, 0], (3, 4, 23, 3)) == 4  # ResNet-101: stem + layer1's 3 blocks, then layer2[0]
    assert cut_to_flat([4, 2], (3, 4, 23, 3)) == 33


def test_every_shipped_config_describes_a_network_it_can_cut(check_shipped: Callable[..., int]) -> None:
    """Loading validates each key (every file under configs/ loaded: shipped_configs); the layout shows the cuts
    give K non-empty modules over every block."""
    assert check_shipped(check_cuts, lambda path: True) >= 130


def check_cuts(path: str, config: Config) -> None:
    import torch

    from pipeline.data.specs import dataset_spec
    from pipeline.model.network import make_layout, make_net
    from pipeline.performance.profile import resolve_cuts

    spec = dataset_spec(config.data, config.model)
    ranges = make_layout(config, spec, resolve_cuts(config, spec, torch.device("cpu"))).ranges
    assert len(ranges) == config.local.modules
    assert ranges[0][0] == 0 and ranges[-1][1] == len(make_net(config.arch, spec, config.model.deep_stem))
    assert all(start < end for start, end in ranges)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


# ---- bad input: each kind names its key -------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # unknown table / key / wrong type
        (["bogus.key=1"], ["[bogus]", "allowed tables"]),
        (["local.modulez=2"], ["local.modulez", "allowed keys"]),
        (["run.seed=abc"], ["run.seed", "wrong type", "integer"]),
        (["data.augment=1"], ["data.augment", "wrong type", "true or false"]),
        (["train.lr=true"], ["train.lr", "wrong type"]),
        (["train.epochs=1.5"], ["train.epochs", "wrong type"]),
        (["local.partition=5"], ["local.partition", "wrong type"]),
        (["local.modules=2", "local.partition=[[1, 'a']]"], ["local.partition", "wrong type"]),
        # K above the number of blocks (resnet8: stem + 3 residual blocks)
        (["model.arch=resnet8", "local.modules=5"], ["local.modules", "between 1 and 4"]),
        (["local.modules=17"], ["local.modules", "between 1 and 16"]),
        (["local.modules=0"], ["local.modules"]),
        # Rn with n >= K
        (["local.modules=2", "local.context=R2"], ["local.context", "'R2'", "local.modules"]),
        (["local.modules=4", "local.context=R4E"], ["local.context", "'R4E'"]),
        # explicit cuts: out of range, not increasing, wrong count
        (["local.modules=2", "local.partition=[[4, 0]]"], ["local.partition", "[4, 0]", "out of range"]),
        (["local.modules=2", "local.partition=[[1, 5]]"], ["local.partition", "[1, 5]", "out of range"]),
        (["local.modules=2", "local.partition=[[0, 1]]"], ["local.partition", "out of range"]),
        (["local.modules=2", "local.partition=[[1]]"], ["local.partition", "out of range"]),
        (["local.modules=2", "local.partition=[[3, 4]]"], ["local.partition", "[3, 4]", "last module"]),
        (["local.modules=3", "local.partition=[[2, 1], [1, 0]]"], ["local.partition", "increasing"]),
        (["local.modules=3", "local.partition=[[1, 0], [1, 0]]"], ["local.partition", "increasing"]),
        (["local.modules=3", "local.partition=[[1, 0]]"], ["local.partition", "1 cuts", "needs 2"]),
        (["local.modules=2", "local.partition=[[1, 0], [2, 0]]"], ["local.partition", "2 cuts", "needs 1"]),
        (["local.partition=fastest"], ["local.partition", "'fastest'", "balanced-memory"]),
        # unknown context / aux / arch
        (["local.modules=2", "local.context=X1"], ["local.context", "'X1'", "R1E"]),
        (["local.modules=2", "local.context=R"], ["local.context", "'R'"]),
        (["local.modules=2", "local.context=R1EE"], ["local.context"]),
        (["local.modules=2", "local.context=e"], ["local.context"]),
        (["local.aux=3c1f"], ["local.aux", "'3c1f'", "1c2f"]),
        (["local.loss=hinge"], ["local.loss", "'hinge'", "contrast"]),
        (["model.arch=resnet10"], ["model.arch", "'resnet10'", "6n+2"]),
        (["model.arch=vgg16"], ["model.arch", "'vgg16'"]),
        (["model.arch=resnet2"], ["model.arch"]),
        # modes
        (["run.mode=ddp", "local.modules=2"], ["local.modules", "ddp"]),
        (["local.context=E"], ["local.context", "'E'", "local.modules"]),
        (["local.context=R1"], ["local.context", "'R1'"]),
        (["run.mode=serial"], ["run.mode", "'serial'", "pipeline"]),
        (["run.device=tpu"], ["run.device", "'tpu'"]),
        (["data.name=imagenet"], ["data.name", "'imagenet'", "cifar10"]),
        (["data.batch_size=1"], ["data.batch_size"]),
        (["train.schedule=step"], ["train.schedule", "'step'", "cosine"]),
        (["train.lr=0"], ["train.lr"]),
        (["train.momentum=1.0"], ["train.momentum"]),
        (["train.momentum=0.0"], ["train.nesterov", "train.momentum"]),
        (["pipeline.wire_dtype=fp8"], ["pipeline.wire_dtype", "bf16"]),
        (["pipeline.queue_depth=0"], ["pipeline.queue_depth"]),
        (["precision.amp=fp16"], ["precision.amp", "'fp16'"]),
        (["local.ixy_2=-1"], ["local.ixy_2"]),
        # the buffered schedule
        (["pipeline.schedule=async"], ["pipeline.schedule", "'async'", "buffered"]),
        (["pipeline.schedule=buffered"], ["pipeline.schedule", "local.modules >= 2"]),
        (["local.modules=2", "pipeline.schedule=buffered", "pipeline.replicas=2"], ["pipeline.replicas = 1"]),
        (["pipeline.buffer_batches=0"], ["pipeline.buffer_batches", ">= 1"]),
        (["pipeline.max_reuse=-1"], ["pipeline.max_reuse", "unlimited"]),
        (["local.modules=2", "pipeline.slowdown=[1.0]"], ["pipeline.slowdown", "one factor >= 1.0 per module (2)"]),
        (["local.modules=2", "pipeline.slowdown=[1.0, 0.5]"], ["pipeline.slowdown", "[1.0, 0.5]"]),
        (["local.modules=2", "pipeline.replay=x.jsonl"], ["pipeline.replay", "pipeline.schedule = 'buffered'"]),
        (["local.modules=2", "pipeline.schedule=buffered", "run.mode=pipeline", "pipeline.replay=x.jsonl"],
         ["pipeline.replay", "run.mode = 'sequential'"]),
        (["run.seed=-1"], ["run.seed"]),
    ],
)
def test_bad_values_name_their_key(overrides, needles):
    message = bad(overrides)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize(
    "item, needle",
    [
        ("nonsense", "expected key=value"),
        ("=3", "expected key=value"),
        ("run=3", "table.key"),
        ("run.mode.deep=x", "table.key"),
        ("modules=4", "table.key"),
    ],
)
def test_set_syntax_errors(item, needle):
    message = bad([item])
    assert needle in message
    assert repr(item) in message  # the offending --set is quoted back


def test_set_into_a_non_table(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text("run = 3\n")
    assert "[run] must be a table" in bad(path=path)
    assert "'run' is not a table" in bad(["run.seed=1"], path=path)


def test_unknown_table_in_a_file(tmp_path):
    path = tmp_path / "extra.toml"
    path.write_text("[run]\nseed = 1\n[optimizer]\nlr = 0.1\n")
    assert "unknown config table [optimizer]" in bad(path=path)


def test_unknown_key_in_a_file(tmp_path):
    path = tmp_path / "extra.toml"
    path.write_text("[train]\nlearning_rate = 0.1\n")
    message = bad(path=path)
    assert "train.learning_rate" in message and "lr" in message


def test_missing_and_invalid_files(tmp_path):
    missing = tmp_path / "nope.toml"
    message = bad(path=missing)
    assert str(missing) in message and "does not exist" in message
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\nseed = \n")
    message = bad(path=broken)
    assert str(broken) in message and "not valid TOML" in message
    based = tmp_path / "based.toml"
    based.write_text("base = 3\n")
    assert "'base'" in bad(path=based)


def test_base_cycle_is_bad_input(tmp_path):
    """A config whose base chain loops back must be a BadInput, not a RecursionError."""
    (tmp_path / "a.toml").write_text("base = \"b.toml\"\n[run]\nseed = 1\n")
    (tmp_path / "b.toml").write_text("base = \"a.toml\"\n[run]\nseed = 2\n")
    message = bad(path=tmp_path / "a.toml")
    assert "base" in message


@pytest.mark.parametrize(
    "overrides",
    [["data.name=cifar10", "model.in_channels=1"], ["model.in_channels=3"]],  # fashion_mnist has 1 channel
    ids=["cifar10-1ch", "fashion-3ch"],
)
def test_in_channels_mismatch_with_dataset(overrides):
    """The data-set/model agreement is a config error and is reported when the config loads."""
    message = bad(overrides)
    assert "model.in_channels" in message


def test_in_channels_mismatch_is_caught_by_the_dataset_spec():
    from pipeline.data.specs import dataset_spec

    for overrides, key in ((["data.name=cifar10", "model.in_channels=1"], "model.in_channels"),
                           (["data.name=cifar10", "model.classes=100"], "model.classes"),
                           (["data.name=stl10", "model.in_channels=1"], "model.in_channels")):
        try:
            config = load_config(None, overrides)
        except BadInput as err:  # caught already at load time: also fine
            assert key in str(err)
            continue
        with pytest.raises(BadInput, match=key):
            dataset_spec(config.data, config.model)


def test_one_class_is_rejected():
    """validate() says model.classes must be >= 2 (or 0 = from the dataset)."""
    assert "model.classes" in bad(["data.name=synthetic", "model.classes=1"])


def test_two_image_channels_are_rejected():
    """validate() says model.in_channels must be 1 or 3 (or 0 = from the dataset)."""
    assert "model.in_channels" in bad(["data.name=synthetic", "model.in_channels=2"])


@pytest.mark.parametrize("overrides, expected", [
    (["train.schedule=cosine-step", "train.warmup_epochs=3"], ["train.warmup_epochs has no effect with "
                                                               "train.schedule = 'cosine-step'"]),
    (["pipeline.queue_depth=4"], ["pipeline.queue_depth has no effect with run.mode = 'sequential'"]),
    (["run.mode=ddp", "pipeline.wire_dtype=bf16", "pipeline.timeout_s=60"], ["pipeline.wire_dtype has no effect "
                                                                             "with run.mode = 'ddp'"]),
    (["local.modules=1", "local.aux=2c2f"], ["local.aux has no effect with local.modules = 1"]),
    (["local.modules=2", "local.aux_feature_dim=64"], ["local.aux_feature_dim has no effect with local.loss = "
                                                       "'softmax'"]),
    (["local.modules=2", "local.ixx_1=3.0"], ["local.ixx_1 has no effect with local.reconstruct = false"]),
    (["local.modules=2", "local.memory_cap=0.5"], ["local.memory_cap has no effect unless local.partition = "
                                                   "'balanced'"]),
    (["local.modules=2", "local.partition=balanced", "local.memory_cap=0.5"], []),
    (["local.modules=2", "pipeline.max_reuse=2"], ["pipeline.max_reuse has no effect with pipeline.schedule = "
                                                   "'lockstep'"]),
    (["local.modules=2", "pipeline.slowdown=[1.0, 2.0]"], ["pipeline.slowdown has no effect with run.mode = "
                                                           "'sequential' and the lockstep schedule"]),
    (["local.modules=2", "pipeline.schedule=buffered", "pipeline.replay=x.jsonl", "pipeline.buffer_batches=5"],
     ["pipeline.buffer_batches has no effect with pipeline.replay set"]),
    (["local.modules=2", "pipeline.schedule=buffered", "pipeline.slowdown=[1.0, 2.0]", "pipeline.max_reuse=3"], []),
    (["local.modules=2", "local.loss=contrast", "local.aux_feature_dim=64", "train.warmup_epochs=3",
      "run.mode=pipeline", "pipeline.queue_depth=4"], []),
])
def test_keys_set_to_no_effect_are_named(overrides: list[str], expected: list[str]) -> None:
    from pipeline.config.validation import ineffective_keys

    notes = ineffective_keys(load_config(None, overrides))
    assert len(notes) == len(expected)
    for note, start in zip(notes, expected):
        assert note.startswith(start)


def test_choices_are_literal_types_checked_at_load() -> None:
    with pytest.raises(BadInput, match=r"run.mode = 'pipe' is not allowed; allowed: sequential, pipeline, ddp"):
        load_config(None, ["run.mode=pipe"])
    with pytest.raises(BadInput, match=r"local.partition = 'fastest' is not allowed; allowed: equal, balanced-memory, "
                                       r"balanced-time, balanced$"):
        load_config(None, ["local.partition=fastest"])


@pytest.mark.parametrize("text, size", [("2GiB", 2 << 30), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), ("7B", 7)])
def test_sizes_are_read_with_their_unit(text: str, size: int) -> None:
    from pipeline.config.schema import parse_size

    assert parse_size(text) == size
    assert load_config(None, ["local.partition=balanced", f"local.memory_cap='{text}'"]).local.memory_cap == text


def test_memory_cap_is_a_fraction_or_a_size() -> None:
    assert load_config(None, ["local.memory_cap=0.6"]).local.memory_cap == 0.6
    assert load_config(None, ["local.memory_cap=1"]).local.memory_cap == 1.0
    assert load_config(None, ["local.memory_cap=2GiB"]).local.memory_cap == "2GiB"  # a bare word on --set
    with pytest.raises(BadInput, match=r"^local.memory_cap = '2G' is not a size; .*'2GiB'.*fraction of E2E"):
        load_config(None, ["local.memory_cap=2G"])
    with pytest.raises(BadInput, match=r"^local.memory_cap = 2000000000.0 must be a fraction of E2E activation "
                                       r"memory in \[0, 1\] \(0: no cap\) or a size such as '2GiB'$"):
        load_config(None, ["local.memory_cap=2000000000"])
    with pytest.raises(BadInput, match=r"^local.memory_cap = True has the wrong type; expected a number or a string$"):
        load_config(None, ["local.memory_cap=true"])


def test_aux_hidden_sets_the_head_width_and_aux_feature_dim_its_contrastive_output() -> None:
    import torch
    from torch import nn

    from pipeline.data.specs import dataset_spec
    from pipeline.model.network import build_module, make_layout
    from pipeline.performance.profile import resolve_cuts

    config = load_config(None, ["data.name=synthetic", "model.arch=resnet8", "local.modules=2",
                                "local.loss=contrast", "local.aux_hidden=24", "local.aux_feature_dim=40"])
    spec = dataset_spec(config.data, config.model)
    layout = make_layout(config, spec, resolve_cuts(config, spec, torch.device("cpu")))
    head = build_module(config, layout, 0, torch.device("cpu")).head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears][-2:] == [(linears[0].in_features, 24), (24, 40)]


# ---- parser limits: huge numbers, deep nesting, networks too deep to build ------------------------------

HUGE_INT = "9" * 5000  # past Python's 4300-digit cap on int(str)
DEEP_ARRAY = "[" * 5000 + "]" * 5000  # past the recursion limit of a recursive-descent parser
DEEP_TABLE = "{a = " * 5000 + "1" + "}" * 5000


@pytest.mark.parametrize("value, needle", [(HUGE_INT, "too long to read"), (DEEP_ARRAY, "nested too deep"),
                                           (DEEP_TABLE, "nested too deep")], ids=["int", "array", "table"])
def test_parser_limits_in_a_file(tmp_path, value, needle):
    path = tmp_path / "limits.toml"
    path.write_text(f"[local]\npartition = {value}\n")
    message = bad(path=path)
    assert str(path) in message and needle in message and len(message) < 300


@pytest.mark.parametrize("value, needle", [(HUGE_INT, "too long to read"), (DEEP_ARRAY, "nested too deep"),
                                           (DEEP_TABLE, "nested too deep")], ids=["int", "array", "table"])
def test_parser_limits_in_a_set(value, needle):
    message = bad([f"run.seed={value}"])
    assert "--set 'run.seed=" in message and needle in message and len(message) < 300


@pytest.mark.parametrize("arch", ["resnet6000002", "resnet1208", "resnet" + "9" * 5000])
def test_a_network_too_deep_to_build(arch):
    message = bad([f"model.arch={arch}"])
    assert "model.arch" in message and "resnet1202" in message and len(message) < 300


def test_the_deepest_published_resnet_still_loads():
    assert load_config(None, ["model.arch=resnet1202"]).arch.blocks == (200, 200, 200)
