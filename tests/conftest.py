"""Shared fixtures: tiny synthetic configs, layouts and module chains; the tiers' rule.

Everything here is sized for a shared 2-core machine: resnet8/resnet14 by default, batches of
8, a few steps, one intra-op thread. The fast tier (`pytest -m "not slow"`) launches no torchrun
job: a test that does, itself or through a fixture, fails until it is marked slow.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from forked_torchrun import FORKED_TORCHRUN

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.config.loading import load_config  # noqa: E402
from pipeline.config.schema import Config, DataConfig, ModelConfig, RunConfig  # noqa: E402
from pipeline.config.validation import validate  # noqa: E402
from pipeline.data.specs import dataset_spec  # noqa: E402
from pipeline.errors import BadInput  # noqa: E402
from pipeline.model.network import build_module, make_layout  # noqa: E402
from pipeline.performance.profile import resolve_cuts  # noqa: E402
from pipeline.runtime.packet import Packet  # noqa: E402

torch.set_num_threads(1)

CPU = torch.device("cpu")

_fast_test: list[str] = []  # the node id of the test running now where it is in the fast tier
_start_process = subprocess.Popen.__init__


def _launches_torchrun(args: object) -> bool:
    argv = [args] if isinstance(args, (str, os.PathLike)) else list(args)  # type: ignore[call-overload]
    return any(str(arg) in ("torch.distributed.run", FORKED_TORCHRUN[1]) or os.path.basename(str(arg)) == "torchrun"
               for arg in argv)


def _start_unless_a_fast_torchrun(self: subprocess.Popen[str], args: object, *rest: object, **options: object) -> None:
    if _fast_test and _launches_torchrun(args):
        raise AssertionError(f"{_fast_test[0]} launches torchrun: mark it (or the tests of its fixture) slow")
    _start_process(self, args, *rest, **options)  # type: ignore[arg-type]


subprocess.Popen.__init__ = _start_unless_a_fast_torchrun  # type: ignore[method-assign]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``-n 2`` (the suite's command, two pytest-xdist workers): the slow tests first, so that the last to be
    handed out are short ones and neither worker finishes long before the other; the tests of the session's shared
    torchrun launches (tests/runtime/conftest.py, pipeline_job) on one worker, so each launch still runs once."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: each tier keeps its order
    for item in items:
        if "pipeline_job" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("shared_torchrun_launches"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    """Set up, run and tear down ``item`` knowing its tier (a wider fixture starts in its first test's setup)."""
    _fast_test[:] = [] if item.get_closest_marker("slow") else [item.nodeid]
    try:
        return (yield)
    finally:
        _fast_test.clear()

# The smallest run that exercises the whole core: synthetic data, resnet8, batch 8, 3 steps.
TINY = (
    "data.name=synthetic",
    "model.arch=resnet8",
    "data.batch_size=8",
    "run.device=cpu",
    "run.log_every=1",
    "train.max_steps=3",
)


def tiny_config(*overrides: str, out_dir: str | Path | None = None) -> Config:
    items = list(TINY)
    if out_dir is not None:
        items.append(f"run.out_dir='{out_dir}'")
    return load_config(None, [*items, *overrides])


def segmentation_config(*overrides: str) -> Config:
    """A validated DeepLab-V3 R101 config on Cityscapes, with 'section.key=value' overrides.

    Built and validated directly: load_config would also resolve the dataset, which these
    model-side tests neither read nor need.
    """
    config = Config(run=RunConfig(device="cpu"), data=DataConfig(name="cityscapes"),
                    model=ModelConfig(arch="deeplabv3_resnet101"))
    for item in overrides:
        key, _, text = item.partition("=")
        section, name = key.split(".")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare word such as R0 or contrast
        setattr(getattr(config, section), name, value)
    validate(config)
    return config


@pytest.fixture(scope="session")
def shipped_configs() -> dict[str, Config]:
    """Every TOML file under configs/ (a base file too: each loads as a config of its own), by its path from
    the repository, loaded and validated once per session. The checks of what the files hold loop over these
    (one test per fact, not one per file); they read the configs and must not change them."""
    return {str(path.relative_to(REPO)): load_config(path) for path in sorted((REPO / "configs").rglob("*.toml"))}


ConfigCheck = Callable[[str, Config], None]  # (path from the repository, its config) -> None, or it raises


@pytest.fixture(scope="session")
def check_shipped(shipped_configs: dict[str, Config]) -> Callable[[ConfigCheck, Callable[[str], bool]], int]:
    """(check, which paths) -> how many shipped configs it checked: runs ``check`` on each and fails once,
    naming every config it fails for and why, so one test per fact still reports every file that breaks it."""

    def check_each(check: ConfigCheck, which: Callable[[str], bool]) -> int:
        failed, checked = [], 0
        for path, config in shipped_configs.items():
            if which(path):
                checked += 1
                try:
                    check(path, config)
                except (AssertionError, BadInput) as err:  # named with its file
                    failed.append(f"{path}: {type(err).__name__}: {err}")
        assert not failed, "\n".join(failed)
        return checked

    return check_each


@pytest.fixture(scope="session")
def seg_config_builder():
    """segmentation_config itself."""
    return segmentation_config


@pytest.fixture(scope="session")
def config_builder():
    """tiny_config itself, for fixtures wider than one test (they cannot use tmp_path)."""
    return tiny_config


@pytest.fixture
def make_config(tmp_path):
    """make_config('local.modules=2', ...) -> a validated tiny synthetic Config."""

    def build(*overrides: str, out_dir: str | Path | None = None) -> Config:
        return tiny_config(*overrides, out_dir=out_dir if out_dir is not None else tmp_path / "run")

    return build


@pytest.fixture
def build_modules():
    """config -> (spec, cuts, layout, [LocalModule k built from seed run.seed + k])."""

    def build(config: Config):
        spec = dataset_spec(config.data, config.model)
        cuts = resolve_cuts(config, spec, CPU)
        layout = make_layout(config, spec, cuts)
        modules = [build_module(config, layout, index, CPU) for index in range(config.local.modules)]
        return spec, cuts, layout, modules

    return build


@pytest.fixture
def image_batch():
    """(spec, batch size, seed) -> (normalised-looking images, labels) with every class present twice."""

    def build(spec, batch: int = 4, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch, spec.channels, spec.image_size, spec.image_size, generator=generator)
        labels = torch.arange(batch) % max(1, batch // 2)
        return images, labels

    return build


@pytest.fixture
def run_chain():
    """Push one batch through modules 0..K-1 in eval mode, recording what each one saw.

    Returns a list of dicts per module: packet (what it received), inputs (its input with
    context added), output (h), aux (head output), and the packet it produced (None on the last).
    """

    @torch.no_grad()
    def run(modules, images, labels):
        records = []
        packet = Packet.from_batch(images, labels)
        for module in modules:
            module.eval()
            inputs, output = module.features(packet)
            produced = None if module.last else module.next_packet(packet, inputs, output)
            records.append({"packet": packet, "inputs": inputs, "output": output,
                            "aux": module.head(output), "produced": produced})
            packet = produced
        return records

    return run


@pytest.fixture
def file_size_limit() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """limit -> a block in which this process cannot grow a file past ``limit`` bytes (RLIMIT_FSIZE):
    a write past it fails with EFBIG ("file too large"), a real OS failure at the write layer, as a
    full disk's ENOSPC, without mounting anything."""

    @contextlib.contextmanager
    def limited(limit: int) -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, before)

    return limited
