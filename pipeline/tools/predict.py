"""python -m pipeline.predict MODEL --images PATH [PATH ...] [--top 5]

The classes an exported model (python -m pipeline.export's default format) gives image files, with
their probabilities: each file prepared as the run's evaluation prepared its test images (recorded in
the model: pipeline/data/image_file.py), one line per file and class, names where the dataset has them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.cli import ArgumentParser, run_main
from pipeline.errors import BadInput
from pipeline.runtime.metrics import percent
from pipeline.tools.model_file import read_model


@dataclass(frozen=True)
class Prediction:
    image: str
    classes: list[int]  # most probable first
    probabilities: list[float]
    names: list[str] | None


def predict(model: str | Path, images: list[str], top: int = 5) -> list[Prediction]:
    """The ``top`` most probable classes of each image file."""
    if top < 1:
        raise BadInput(f"--top {top}: give at least 1")
    net, recipe = read_model(model)
    if recipe.spec.dense:
        raise BadInput(f"{model} is a segmentation model (one class per pixel, not per image); score it with "
                       f"python -m pipeline.evaluate")
    batch = torch.stack([recipe.preprocess(path) for path in images])
    with torch.no_grad():
        probabilities = torch.softmax(net(batch).float(), dim=1)
    best = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    names = recipe.class_names
    return [Prediction(path, classes.tolist(), values.tolist(),
                       [names[index] for index in classes.tolist()] if names is not None else None)
            for path, values, classes in zip(images, best.values, best.indices)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[1])
    parser.add_argument("model", metavar="MODEL", help="a model file of python -m pipeline.export")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files (.jpg, .png, ...)")
    parser.add_argument("--top", type=int, default=5, help="classes shown per image")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        args = parse_args(argv)
        for prediction in predict(args.model, args.images, args.top):
            for rank, (index, probability) in enumerate(zip(prediction.classes, prediction.probabilities)):
                name = f" {prediction.names[rank]}" if prediction.names is not None else ""
                print(f"{prediction.image}\t{rank + 1}\tclass {index}{name}\t{percent(probability)}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
