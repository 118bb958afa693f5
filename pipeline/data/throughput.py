"""python -m pipeline.data.throughput --root DIR [--make N --classes C] [--workers 2 --batch 64 --image-size 224]

Images per second of the streaming image-folder loader alone: decoding and augmenting training
batches in its worker processes, normalised on the CPU, no network. With --make, first writes
a synthetic folder of N training JPEGs (ImageNet-sized photos, 500 x 375) under DIR.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cli import ArgumentParser, run_main
from pipeline.errors import BadInput

PHOTO = (500, 375)  # about ImageNet's average image


def write_folder(root: Path, train: int, classes: int, size: tuple[int, int] = PHOTO, seed: int = 0,
                 png_every: int = 0) -> None:
    """``train`` images over ``classes`` class folders in root/train, a tenth as many (one per class
    at least) in root/val. Each class has its own colour under noise, so the images are learnable;
    every ``png_every``-th image is a PNG (0: all JPEG)."""
    draws = np.random.default_rng(seed)
    colours = draws.integers(0, 256, (classes, 3))
    for split, count in (("train", train), ("val", max(classes, train // 10))):
        for number in range(count):
            label = number % classes
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = draws.integers(-60, 61, (size[1], size[0], 3))
            pixels = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
            suffix = "png" if png_every and number % png_every == png_every - 1 else "jpg"
            Image.fromarray(pixels).save(folder / f"{split}_{number:06d}.{suffix}")


def measure(root: Path, workers: int, batch: int, image_size: int, batches: int) -> tuple[float, int]:
    """(training images per second, images timed) after one warm-up batch (the workers' start)."""
    import torch

    from pipeline.config.loading import load_config
    from pipeline.data.streaming import make_folder_loaders

    # model.arch: any network valid for the folder (no network is built); resnet50 is one in every family
    config = load_config(None, ["data.name=image_folder", f"data.root={str(root)!r}", f"data.batch_size={batch}",
                                f"data.image_size={image_size}", f"data.workers={workers}", "run.device=cpu",
                                "model.arch=resnet50"])
    train, _ = make_folder_loaders(config.data, config.model, config.run.seed, torch.device("cpu"))
    stream = train.batches(1)
    next(stream)
    started, images = time.perf_counter(), 0
    for pictures, _labels in itertools.islice(stream, batches):
        images += len(pictures)
    return images / (time.perf_counter() - started), images


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m pipeline.data.throughput", description=__doc__.split("\n\n")[1])
    parser.add_argument("--root", required=True, help="the image folder (train/<class>/*, val/<class>/*)")
    parser.add_argument("--make", type=int, default=0, metavar="N", help="first write N synthetic training JPEGs")
    parser.add_argument("--classes", type=int, default=10, help="class folders of --make")
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes (data.workers)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (data.batch_size)")
    parser.add_argument("--image-size", type=int, default=224, help="training crop side (data.image_size)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed after one warm-up batch")

    def body() -> None:
        args = parser.parse_args(argv)
        root = Path(args.root)
        if args.make:
            if args.make < args.classes or args.classes < 1:
                raise BadInput(f"--make {args.make} --classes {args.classes}: give every class at least one image "
                               "(--make >= --classes >= 1)")
            write_folder(root, args.make, args.classes)
        rate, images = measure(root, args.workers, args.batch, args.image_size, args.batches)
        print(f"{rate:.1f} images/s: {images} training images of {root} (decode + RandomResizedCrop "
              f"{args.image_size} + flip), batch {args.batch}, {args.workers} worker(s)")

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())

