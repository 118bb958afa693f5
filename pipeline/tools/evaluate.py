"""python -m pipeline.evaluate MODEL_OR_RUN_DIR [--step N] [--config FILE] [--set table.key=value ...]

Test scores of an exported model (python -m pipeline.export's default format) or of a run's complete
checkpoint set, on the config's test split, in one process: accuracy, or for segmentation mIoU,
per-class IoU and pixel accuracy, counted as the run counts them (pipeline/runtime/scoring.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.cli import ArgumentParser, add_set_argument, run_main
from pipeline.config.loading import load_config
from pipeline.config.schema import Config
from pipeline.data.loader import make_loaders
from pipeline.data.specs import DatasetSpec
from pipeline.errors import BadInput
from pipeline.model.inference import InferenceNet, network_identity
from pipeline.runtime.host import resolve_device
from pipeline.runtime.metrics import percent
from pipeline.runtime.scoring import score_line, scoring_for
from pipeline.tools.export import read_run
from pipeline.tools.model_file import read_model


def load_for_evaluation(path: str | Path, step: int = 0, config_path: str | None = None,
                        overrides: list[str] | tuple[str, ...] = ()) -> tuple[InferenceNet, Config, DatasetSpec]:
    """The network of a run folder or a model file, and the config whose test split scores it.

    A model file's own recorded config is the default; another config (--config) must build the same
    network on the same dataset. Returns the network, the config and the dataset spec it was built for."""
    if Path(path).is_dir():
        net, recipe, config = read_run(path, step, config_path, overrides)
        return net, config, recipe.spec
    net, recipe = read_model(path)
    if config_path is not None:
        config = load_config(config_path, overrides, training=False)
    else:
        config = recipe.build_config(overrides)
    trained = recipe.build_config()
    recorded = network_identity(trained.arch, trained.data.name, trained.local, trained.model, recipe.cuts)
    given = network_identity(config.arch, config.data.name, config.local, config.model, recipe.cuts)
    given["cuts"] = recorded["cuts"]  # a config's own partition may be profiled: the model's cuts are the ones
    for key, value in recorded.items():
        if given[key] != value:
            raise BadInput(f"the config gives {key} = {given[key]!r} but {path} was exported with {value!r}; "
                           f"evaluate it with its own config (leave --config out) or one that matches")
    return net, config, recipe.spec


def evaluate(net: InferenceNet, config: Config, expected: DatasetSpec) -> dict[str, Any]:
    """summary.json's test scores of ``net``, built for the dataset ``expected``, on config's test split."""
    device = resolve_device(config.run.device, amp=config.precision.amp)
    _, test = make_loaders(config.data, config.model, config.run.seed, device)
    scoring = scoring_for(test.spec)
    if (test.spec.classes, test.spec.channels) != (expected.classes, expected.channels):
        raise BadInput(f"{config.data.name}'s test split has {test.spec.classes} classes of "
                       f"{test.spec.channels}-channel images, but the network takes {expected.channels} channels "
                       f"and predicts {expected.classes} classes; evaluate it on the dataset it was trained on")
    net = net.to(device)
    if config.precision.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if config.precision.amp == "bf16":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    total, images = scoring.zeros(device), 0
    with torch.no_grad(), autocast:
        for batch, labels in test.batches(0):
            if config.precision.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            total += scoring.count(net(batch), labels)
            images += len(labels)
    return scoring.scores(total, images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument("model", metavar="MODEL_OR_RUN_DIR",
                        help="a model file of python -m pipeline.export, or a run's out_dir (its newest complete "
                             "checkpoint set) or one set folder RUN_DIR/checkpoints/step_<N>")
    parser.add_argument("--step", type=int, default=0, help="a run: the complete set of this step (0: the newest)")
    parser.add_argument("--config", help="TOML config whose test split to use (default: the one the model or run "
                                         "recorded)")
    add_set_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        started = time.perf_counter()
        net, config, spec = load_for_evaluation(args.model, args.step, args.config, args.set)
        scores = evaluate(net, config, spec)
        print(f"{args.model}: {score_line(scores)} on {config.data.name}'s test split "
              f"({time.perf_counter() - started:.1f} s)")
        if scores.get("test_iou") is not None:
            print("per-class IoU: " + ", ".join("-" if value is None else percent(value)
                                                for value in scores["test_iou"]))
        print(json.dumps(scores))

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
