"""python -m pipeline.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]

Draws training curves from each run's metrics.jsonl against the step: the loss of every module,
the learning rate, samples/s and the test accuracy. Several runs share the axes, each named by
its folder, e.g. the K = 16 comparison in one picture:
  python -m pipeline.plot runs/fashion_mnist/* --out k16.png
Needs matplotlib: pip install -e '.[plot]'.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import ArgumentParser, run_main
from pipeline.errors import BadInput
from pipeline.runtime.metrics_files import METRICS, metrics_files

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL = "pip install -e '.[plot]' (or pip install matplotlib)"


@dataclass
class Curves:
    """One run's series, each a list of (step, value) in step order."""

    name: str
    loss: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # module -> series
    lr: list[tuple[int, float]] = field(default_factory=list)
    samples_per_s: list[tuple[int, float]] = field(default_factory=list)
    test_accuracy: list[tuple[int, float]] = field(default_factory=list)


def _lines(paths: list[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = None
            if not isinstance(item, dict):
                raise BadInput(f"{path}:{number} is not a JSON object line; was the file cut short? Remove that line")
            yield item


def read_curves(run_dir: Path, name: str) -> Curves:
    path = run_dir / METRICS
    if not path.is_file():
        raise BadInput(f"{str(path)!r} does not exist: pass the run.out_dir of a run, the folder that holds "
                       f"metrics.jsonl")
    curves = Curves(name)
    train: list[dict[str, Any]] = []
    for item in _lines(metrics_files(run_dir)):  # a job over several hosts: one file per host
        if item.get("event") == "train" and "loss" in item:
            train.append(item)
        elif item.get("event") == "eval" and "test_accuracy" in item:
            curves.test_accuracy.append((int(item["step"]), float(item["test_accuracy"])))
    train.sort(key=lambda item: int(item.get("step", 0)))
    if not train and not curves.test_accuracy:
        raise BadInput(f"{path} holds no train or eval lines yet; plot once the run has logged (run.log_every)")
    last = max((int(item["module"]) for item in train), default=0)
    for item in train:
        step, module = int(item["step"]), int(item["module"])
        curves.loss.setdefault(module, []).append((step, float(item["loss"])))
        # lr and samples/s from the last module: its rate is the whole pipeline's throughput
        if module == last:
            if "lr" in item:
                curves.lr.append((step, float(item["lr"])))
            if "samples_per_s" in item:
                curves.samples_per_s.append((step, float(item["samples_per_s"])))
    for series in (*curves.loss.values(), curves.lr, curves.samples_per_s, curves.test_accuracy):
        series.sort()
    return curves


def run_names(run_dirs: list[str]) -> list[str]:
    """Each run's folder name; the path as given where two runs share a folder name."""
    names = [Path(run_dir).name or run_dir for run_dir in run_dirs]
    return [name if names.count(name) == 1 else run_dir for name, run_dir in zip(names, run_dirs)]


def pyplot() -> Any | None:
    """matplotlib's pyplot drawing to files (no display needed); None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def optional_pyplot(tool: str, picture: str) -> Any | None:
    """pyplot for a tool whose picture is a bonus: without matplotlib it says so and draws nothing."""
    plt = pyplot()
    if plt is None:
        print(f"[{tool}] matplotlib not installed: no {picture} ({INSTALL})", flush=True)
    return plt


def draw(runs: list[Curves]) -> Figure:
    plt = pyplot()
    if plt is None:
        raise BadInput(f"python -m pipeline.plot needs matplotlib: {INSTALL}")
    figure: Figure
    # One step axis for all four panels: a run's one evaluation sits at its end, not alone on an axis of its own.
    figure, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    loss_ax, lr_ax, rate_ax, accuracy_ax = axes.flat
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    single = len(runs) == 1
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        last = max(run.loss, default=0)
        for module, series in sorted(run.loss.items()):
            steps, values = zip(*series)
            if single:  # one run: a colour per module
                loss_ax.plot(steps, values, label=f"module {module}")
            else:  # several: a colour per run, its last module (the classifier's loss) solid, the others dashed
                loss_ax.plot(steps, values, color=colour, linewidth=2.0 if module == last else 1.0,
                             linestyle="-" if module == last else "--", alpha=1.0 if module == last else 0.7,
                             label=run.name if module == last else None)
        accuracy = [(step, 100.0 * value) for step, value in run.test_accuracy]  # in %, as the terminal prints it
        for ax, series in ((lr_ax, run.lr), (rate_ax, run.samples_per_s), (accuracy_ax, accuracy)):
            if series:
                steps, values = zip(*series)
                ax.plot(steps, values, color=colour, marker="o" if ax is accuracy_ax else None, label=run.name)
    loss_ax.set_title("training loss per module" + ("" if single else " (solid: last module)"))
    lr_ax.set_title("learning rate")
    rate_ax.set_title("samples / s")
    accuracy_ax.set_title("test accuracy (%)")
    loss_ax.set_xlim(left=0)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)  # sharex hides the upper panels' step labels
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle(", ".join(run.name for run in runs))
    figure.tight_layout()
    return figure


def plot_runs(run_dirs: list[str], out: Path) -> Path:
    runs = [read_curves(Path(run_dir), name) for run_dir, name in zip(run_dirs, run_names(run_dirs))]
    figure = draw(runs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    except OSError as err:
        raise BadInput(f"--out {str(out)!r} cannot be written ({err.strerror}); choose a writable path") from None
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    def body() -> None:
        parser = ArgumentParser(prog="python -m pipeline.plot", description=__doc__.split("\n\n")[1])
        parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's run.out_dir (holds metrics.jsonl)")
        parser.add_argument("--out", metavar="FILE.png",
                            help="where to write the picture (default: RUN_DIR/curves.png for one run, "
                                 "curves.png here for several)")
        args = parser.parse_args(argv)
        default = Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png")
        written = plot_runs(args.run_dirs, Path(args.out) if args.out else default)
        print(f"wrote {written}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
